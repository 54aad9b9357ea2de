"""A matrix commit's cells on the dashboard: a small badge per cell in
the overview, a section per cell on the commit page, and their JSON.

What is known of the cells comes from two places.  A finished commit's
result header has one ``cells:`` field (``py3.9=failed py3.12=passed``:
the commit's verdict is the worst of them), and each cell's own result
lies beside it as ``<commit>.cell.<name>`` (with ``.xml``; see
docs/results.md).  A commit still in the dispatcher's hands has its cells
in the ``state`` reply: queued ones (with the reason one waits, when no
runner can take it: "waiting for a runner with python3.9") and running
ones.  A commit without a matrix has neither, and shows as before.
"""

from __future__ import annotations

from ci.dashboard.pages import Safe, join, pill, render, seconds, since_note, verdict_class

# What a cell's section shows of its own header.
CELL_FIELDS = ("tests", "failures", "errors", "skipped", "flaky", "quarantined",
               "quarantined_failed", "duration", "runner", "reason", "setup", "started")


def live_cells(state: dict | None, commit: str) -> list[dict]:
    """The commit's cells the dispatcher holds: each ``{name, verdict,
    reason}`` (``queued`` or ``running``)."""
    cells = []
    for kind, verdict in (("running", "running"), ("queue", "queued")):
        for job in (state or {}).get(kind, []):
            if job.get("commit") != commit:
                continue
            for name in str(job.get("cell") or "").split(", "):
                if name:
                    cells.append({"name": name, "verdict": verdict,
                                  "reason": job.get("waiting") or "",
                                  "runner": job.get("runner") or ""})
    return cells


# --------------------------------------------------------------------------
# HTML.

def badge(name: str, verdict: str, title: str = "") -> Safe:
    return render('<span class="cell v-{cls}" title="{title}">{name}</span>',
                  cls=verdict_class(verdict), name=name,
                  title=title or f"{name}: {verdict}")


def badges(cells: list[tuple[str, str]]) -> Safe:
    """The overview's small badges, one per cell (nothing without cells)."""
    if not cells:
        return Safe("")
    return render('<span class="cells">{badges}</span>',
                  badges=join(badge(name, verdict) for name, verdict in cells))


def cells_section(cells: list[dict]) -> Safe:
    """The commit page's part: one section per cell, each with its
    verdict, counts, reason, failing tests and output (folded)."""
    if not cells:
        return Safe("")
    parts = [render('<h2>Cells ({count})</h2><div class="cell-strip">{strip}</div>',
                    count=len(cells), strip=join(badge(c["name"], c["verdict"]) for c in cells))]
    parts += [one_cell(cell) for cell in cells]
    return join(parts)


def one_cell(cell: dict) -> Safe:
    fields = cell.get("fields") or {}
    rows = []
    for key in CELL_FIELDS:
        value = fields.get(key)
        if value in (None, ""):
            continue
        shown = seconds(value) if key == "duration" and seconds(value) else value
        rows.append(render("<dt>{key}</dt><dd>{value}</dd>", key=key, value=shown))
    if cell.get("reason") and not fields.get("reason"):
        rows.append(render('<dt>waiting</dt><dd class="waiting">{reason}</dd>',
                           reason=cell["reason"]))
    tests = cell.get("failing_tests") or []
    failing = render('<ul class="tests">{rows}</ul>', rows=join(
        render('<li class="t-{kind}"><span class="tkind">{kind}</span> <code>{name}</code>'
               '{since}</li>', kind=t["kind"], name=t["name"], since=since_note(t))
        for t in tests)) if tests else Safe("")
    output = render('<details><summary>output</summary><pre class="output">{text}</pre>'
                    '</details>', text=cell["output"]) if cell.get("output") else Safe("")
    return render('<div class="cell-box c-{cls}" id="cell-{name}"><h3>{name} {pill}</h3>'
                  '<dl class="fields">{rows}</dl>{failing}{output}</div>',
                  cls=verdict_class(cell["verdict"]), name=cell["name"],
                  pill=pill(cell["verdict"]), rows=join(rows), failing=failing, output=output)


CSS = """
.cells { display:inline-flex; flex-wrap:wrap; gap:3px; margin-left:6px; vertical-align:middle; }
.cell { display:inline-block; font-size:10px; font-weight:600; line-height:14px; padding:0 5px;
  border-radius:4px; border:1px solid var(--line); white-space:nowrap; }
.cell-strip { display:flex; flex-wrap:wrap; gap:6px; margin-bottom:12px; }
.cell-strip .cell { font-size:12px; line-height:18px; padding:0 8px; }
.cell-box { border:1px solid var(--line); border-left-width:4px; border-radius:6px;
  padding:8px 14px; margin:10px 0; background:#fff; }
.cell-box h3 { margin:4px 0 6px; font-size:15px; }
.cell-box.c-passed { border-left-color:var(--green); }
.cell-box.c-failed { border-left-color:var(--red); }
.cell-box.c-error { border-left-color:var(--amber); }
.cell-box.c-timeout { border-left-color:var(--purple); }
.cell-box.c-running { border-left-color:var(--blue); }
.waiting { color:var(--amber); }
.cell-box details pre { max-height:300px; overflow:auto; }
.labels { font-size:12px; color:var(--muted); }
"""
