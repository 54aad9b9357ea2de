"""HTML sections of the land queue page ``/queue`` (issue 22): per target
its head and depth and the entries in line, each with its state (a pill,
coloured like the verdicts), what it is tested on, who asked and when, and
why it was turned down; the recent landed and rejected entries below.

Built with ``pages.render`` like every other section: branch names,
reasons and who asked are user input, escaped at that one boundary.  The
data are the checked snapshot (ci/queue_snapshot.py); ``api_view`` is the
same data as /api/queue answers it.
"""

from __future__ import annotations

from ci.dashboard.pages import (BRANCH_RE, Safe, branch_query, commit_link, join, render,
                                stamp, when)

# Each queue state shown in the colour of the verdict it is closest to.
STATE_CLASSES = {"waiting": "queued", "merging": "running", "testing": "running",
                 "passed": "passed", "failing": "failed", "blocked": "error",
                 "landing": "timeout", "landed": "passed", "rejected": "failed",
                 "cancelled": "queued"}
# What each state means, as the pill's tooltip.
STATE_HELP = {
    "waiting": "not built yet: beyond the queue depth",
    "merging": "its merge on top of the entries ahead is being made",
    "testing": "its merge is being tested",
    "passed": "tested green; lands when every entry ahead has landed",
    "failing": "tested red while an entry ahead is undecided: judged at the front",
    "blocked": "conflicts with an entry ahead",
    "landing": "the push to the target is under way",
    "landed": "the target now holds its tested commit",
    "rejected": "turned down: see the reason",
    "cancelled": "taken out of the queue",
}


def state_pill(state: str) -> Safe:
    return render('<span class="pill v-{cls}" title="{help}">{state}</span>',
                  cls=STATE_CLASSES.get(state, "unknown"), help=STATE_HELP.get(state, ""),
                  state=state)


def by_target(snapshot: dict) -> list[tuple[str, dict, list[dict]]]:
    """(target, its head and depth, its entries in line order), targets by
    name; a target the entries name but ``targets`` lacks still shows."""
    names = set(snapshot["targets"]) | {e["target"] for e in snapshot["entries"]}
    groups = []
    for name in sorted(names):
        entries = [e for e in snapshot["entries"] if e["target"] == name]
        entries.sort(key=lambda e: (e["position"] is None, e["position"] or 0, e["id"]))
        groups.append((name, snapshot["targets"].get(name, {}), entries))
    return groups


def api_view(snapshot: dict | None, error: str | None) -> dict:
    """/api/queue: the snapshot grouped per target, times in ISO 8601,
    with links to the commits' pages."""
    def item(entry: dict) -> dict:
        out = dict(entry, asked=stamp(entry["asked"]), updated=stamp(entry["updated"]))
        for key in ("head", "tested", "base"):
            if entry[key]:
                out[f"{key}_url"] = f"/commit/{entry[key]}"
        return out
    data = {"dispatcher": {"reachable": error is None, "error": error}}
    if snapshot is None:
        return data
    data["updated"] = stamp(snapshot["updated"])
    data["targets"] = {name: {"head": info.get("head"), "depth": info.get("depth"),
                              "entries": [item(e) for e in entries]}
                       for name, info, entries in by_target(snapshot)}
    data["recent"] = [item(e) for e in snapshot["recent"]]
    return data


# --------------------------------------------------------------------------
# Sections.

def banner_section(snapshot: dict | None, error: str | None) -> Safe:
    if error:
        return render('<div class="banner" role="alert"><strong>Dispatcher unavailable:</strong> '
                      '{error}. The land queue cannot be shown.</div>', error=error)
    if snapshot is not None and snapshot["updated"] is None:
        return Safe('<div class="banner info">The observer has not reported a land queue to '
                    'the dispatcher yet.</div>')
    return Safe("")


def branch_tag(branch: str) -> Safe:
    """A branch, linked to its results when its name fits in a URL."""
    if BRANCH_RE.fullmatch(branch):
        return render('<a class="branch" href="{href}">{branch}</a>',
                      href=branch_query(branch), branch=branch)
    return render('<span class="branch">{branch}</span>', branch=branch)


def tested_on(entry: dict) -> Safe:
    """Its tested commit and the base it was merged onto ("on main at ...")."""
    parts = []
    if entry["tested"]:
        parts.append(commit_link(entry["tested"]))
    if entry["base"]:
        parts.append(render('<span class="on">on</span> {base}', base=commit_link(entry["base"])))
    if not parts:
        return Safe('<span class="muted">not yet</span>')
    return join(parts, " ")


def asked_cell(entry: dict) -> Safe:
    return render('<span class="who">{by}</span><span class="time">{when}</span>',
                  by=entry["by"] or "?", when=when(entry["asked"]))


def reason_cell(entry: dict) -> Safe:
    if not entry["reason"]:
        return Safe("")
    return render('<span class="reason">{reason}</span>', reason=entry["reason"])


def entry_row(entry: dict) -> Safe:
    return render(
        '<tr class="q-{state}"><td class="num pos">{position}</td><td>{branch}</td>'
        '<td>{pill}</td><td class="sha-cell">{head}</td><td class="sha-cell">{tested}</td>'
        '<td class="asked">{asked}</td><td class="why">{reason}</td></tr>',
        state=entry["state"], position="" if entry["position"] is None else entry["position"],
        branch=branch_tag(entry["branch"]), pill=state_pill(entry["state"]),
        head=commit_link(entry["head"]), tested=tested_on(entry), asked=asked_cell(entry),
        reason=reason_cell(entry))


ENTRY_HEAD = ('<thead><tr><th class="num c-pos">#</th><th class="c-branch">branch</th>'
              '<th class="c-state">state</th><th class="c-sha">head</th>'
              '<th class="c-tested">tested commit (on base)</th>'
              '<th class="c-asked">asked by (UTC)</th><th>reason</th></tr></thead>')
RECENT_HEAD = ('<thead><tr><th class="c-branch">branch</th><th class="c-into">into</th>'
               '<th class="c-state">state</th><th class="c-sha">head</th>'
               '<th class="c-tested">tested commit (on base)</th>'
               '<th class="c-asked">asked by (UTC)</th><th class="c-done">decided (UTC)</th>'
               '<th>reason</th></tr></thead>')


def targets_section(snapshot: dict | None) -> Safe:
    if snapshot is None:
        return Safe("")
    groups = by_target(snapshot)
    if not groups:
        return Safe('<h2>Land queue</h2><p class="empty">Nothing is queued to land.</p>')
    blocks = []
    for name, info, entries in groups:
        head = render(' &middot; head {link}', link=commit_link(info["head"])) \
            if info.get("head") else Safe("")
        depth = render(' &middot; depth {depth}', depth=info["depth"]) \
            if info.get("depth") is not None else Safe("")
        table = render('<table class="grid queue">{head}<tbody>{rows}</tbody></table>',
                       head=Safe(ENTRY_HEAD), rows=join(entry_row(e) for e in entries)) \
            if entries else Safe('<p class="empty">No entry waits to land here.</p>')
        blocks.append(render(
            '<div class="target"><h2>Land queue into {target} <span class="count">{count}</span></h2>'
            '<p class="target-facts">{n} in line{head}{depth}</p>{table}</div>',
            target=branch_tag(name), count=len(entries),
            n=f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}", head=head,
            depth=depth, table=table))
    updated = render('<p class="updated">Queue as the observer last told it, '
                     '{when} UTC.</p>', when=when(snapshot["updated"])) \
        if snapshot["updated"] else Safe("")
    return join([*blocks, updated])


def recent_section(snapshot: dict | None) -> Safe:
    if snapshot is None:
        return Safe("")
    if not snapshot["recent"]:
        return Safe('<h2>Recently landed or rejected</h2><p class="empty">None yet.</p>')
    rows = join(render(
        '<tr class="q-{state}"><td>{branch}</td><td>{target}</td><td>{pill}</td>'
        '<td class="sha-cell">{head}</td><td class="sha-cell">{tested}</td>'
        '<td class="asked">{asked}</td><td class="done">{done}</td>'
        '<td class="why">{reason}</td></tr>',
        state=e["state"], branch=branch_tag(e["branch"]), target=branch_tag(e["target"]),
        pill=state_pill(e["state"]), head=commit_link(e["head"]), tested=tested_on(e),
        asked=asked_cell(e), done=when(e["updated"]), reason=reason_cell(e))
        for e in snapshot["recent"])
    return render('<h2>Recently landed or rejected</h2><table class="grid queue recent">'
                  '{head}<tbody>{rows}</tbody></table>', head=Safe(RECENT_HEAD), rows=rows)


def sections(snapshot: dict | None, error: str | None) -> dict[str, Safe]:
    return {"sec-queue-banner": banner_section(snapshot, error),
            "sec-queue": targets_section(snapshot),
            "sec-queue-recent": recent_section(snapshot)}


CSS = """
.banner.info { background:var(--blue-bg); border-color:#b6e3ff; color:#0a3069; }
.target { margin-bottom:22px; }
.target h2 { display:flex; align-items:center; gap:8px; margin-bottom:2px; }
.target h2 .branch { font-size:13px; }
.count { font-size:12px; font-weight:600; color:var(--muted); background:#eaeef2;
  border-radius:999px; padding:0 8px; }
.target-facts, .updated { color:var(--muted); font-size:12px; margin:0 0 8px; }
.updated { margin-top:-10px; }
.grid.queue { table-layout:fixed; }
.grid.queue td { vertical-align:top; }
.grid.queue .c-pos { width:44px; } .grid.queue .c-branch { width:17%; }
.grid.queue .c-into { width:10%; } .grid.queue .c-state { width:96px; }
.grid.queue .c-sha { width:112px; } .grid.queue .c-tested { width:230px; }
.grid.queue .c-asked { width:190px; } .grid.queue .c-done { width:150px; }
.grid.queue.recent .c-branch { width:14%; } .grid.queue.recent .c-into { width:8%; }
.grid.queue.recent .c-tested { width:212px; } .grid.queue.recent .c-asked { width:170px; }
.grid.queue.recent .c-done { width:140px; }
.grid.queue .pos { color:var(--muted); }
.grid.queue .branch { max-width:100%; }
.grid.queue .sha-cell { white-space:nowrap; overflow:hidden; text-overflow:ellipsis; }
.grid.queue .on, .grid.queue .muted { color:var(--muted); font-size:12px; }
.grid.queue .asked .who { display:block; overflow:hidden; text-overflow:ellipsis;
  white-space:nowrap; }
.grid.queue .asked .time { display:block; color:var(--muted); font-size:12px; white-space:nowrap; }
.grid.queue td.done { color:var(--muted); font-size:12px; white-space:nowrap; }
.grid.queue .why { overflow-wrap:anywhere; }
.grid.queue .reason { color:var(--text); }
.grid.queue tr.q-rejected td:first-child, .grid.queue tr.q-failing td:first-child
  { box-shadow:inset 3px 0 0 var(--red); }
.grid.queue tr.q-landed td:first-child, .grid.queue tr.q-passed td:first-child
  { box-shadow:inset 3px 0 0 #2da44e; }
.grid.queue tr.q-blocked td:first-child { box-shadow:inset 3px 0 0 #d4a72c; }
"""
