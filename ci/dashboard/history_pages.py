"""HTML sections of the test history pages: ``/tests`` (the most often
failing, the flakiest, the quarantined with their state, the slowest) and ``/test?id=...`` (one test across the last
commits of a branch: a strip of outcomes, its durations, its failure
rate).  Built with ``pages.render`` like every other section, so escaping
stays at that one boundary; the data are ci/history/queries.py's dicts,
the same the JSON API answers with.
"""

from __future__ import annotations

import urllib.parse

from ci.dashboard.pages import (BRANCH_RE, Safe, commit_link, join, render, seconds, stamp,
                                when)

# Outcomes with a colour of their own on the strip; anything else is grey.
OUTCOME_CLASSES = ("passed", "failed", "error", "skipped", "xfail", "xpass", "flaky")
# A link names the test itself while it is short enough for a URL.
MAX_ID_IN_URL = 600
CHART_HEIGHT = 80
BAR_WIDTH = 10


def outcome_class(outcome) -> str:
    return outcome if outcome in OUTCOME_CLASSES else "unknown"


def test_url(name: str, key: str | None = None, branch: str | None = None,
             cell: str | None = None) -> str:
    """``/test?id=<name>``, or by its key when the name is too long for a URL;
    ``cell``: only that matrix cell's runs."""
    params = {"id": name} if len(name) <= MAX_ID_IN_URL or key is None else {"key": key}
    if branch:
        params["branch"] = branch
    if cell:
        params["cell"] = cell
    return "/test?" + urllib.parse.urlencode(params)


def api_links(data: dict) -> dict:
    """A JSON answer's tests each with the URL of its page; a quarantined
    one's commits with theirs, and its latest run's time in ISO 8601."""
    lists = ("slowest", "failing", "flakiest", "quarantined")
    for test in [data, *(t for name in lists for t in data.get(name, []))]:
        if "key" in test:
            test["url"] = test_url(test["id"], test["key"])
    for test in data.get("quarantined", []):
        test["commit_url"] = f"/commit/{test['commit']}"
        test["finished"] = stamp(test["finished"])
        if test["quarantined_since"]:
            test["quarantined_since_url"] = f"/commit/{test['quarantined_since']}"
    return data


def rate(value) -> str:
    return f"{100 * float(value or 0):.1f}%"


def unavailable_section(reason: str) -> Safe:
    return render('<h2>Test history</h2><p class="empty">{reason}</p>', reason=reason)


# --------------------------------------------------------------------------
# /tests

def tests_table(title: str, rows: list[dict], empty: str) -> Safe:
    if not rows:
        return render('<h2>{title}</h2><p class="empty">{empty}</p>', title=title, empty=empty)
    body = join(render(
        '<tr><td class="test-id"><a href="{href}">{name}</a></td>'
        '<td class="num">{mean}</td><td class="num">{runs}</td>'
        '<td class="num">{failures}</td><td class="num">{rate}</td></tr>',
        href=test_url(t["id"], t["key"]), name=t["id"], mean=seconds(t["mean_duration"]),
        runs=t["runs"], failures=t["failures"], rate=rate(t["failure_rate"])) for t in rows)
    return render('<h2>{title}</h2><table class="grid history"><thead><tr><th>test</th>'
                  '<th class="num">mean duration</th><th class="num">runs</th>'
                  '<th class="num">failures</th><th class="num">failure rate</th></tr></thead>'
                  '<tbody>{body}</tbody></table>', title=title, body=body)


def flaky_table(rows: list[dict]) -> Safe:
    """The flakiest tests: most runs that failed, then passed on a rerun."""
    if not rows:
        return render('<h2>Flakiest</h2><p class="empty">No test has been flaky.</p>')
    body = join(render(
        '<tr><td class="test-id"><a href="{href}">{name}</a></td>'
        '<td class="num">{flaky}</td><td class="num">{runs}</td><td class="num">{rate}</td>'
        '<td class="num">{failures}</td></tr>',
        href=test_url(t["id"], t["key"]), name=t["id"], flaky=t["flaky"], runs=t["runs"],
        rate=rate(t["flake_rate"]), failures=t["failures"]) for t in rows)
    return render('<h2>Flakiest</h2><table class="grid history"><thead><tr><th>test</th>'
                  '<th class="num">flaky runs</th><th class="num">runs</th>'
                  '<th class="num">flake rate</th><th class="num">failures</th></tr></thead>'
                  '<tbody>{body}</tbody></table>', body=body)


def quarantine_state(test: dict) -> str:
    """What a quarantined test's latest run says of it, in a word."""
    if test["failing"]:
        return "failing"
    return "skipped" if test["outcome"] in ("skipped", "unknown") else "passing"


def quarantined_table(rows: list[dict]) -> Safe:
    """The tests quarantined in their latest run, most recently quarantined
    first: whether they fail there, that run's commit and branch, and the
    first commit of their current quarantine."""
    if not rows:
        return render('<h2>Quarantined</h2><p class="empty">No test is quarantined.</p>')
    body = join(render(
        '<tr><td class="test-id"><a href="{href}">{name}</a></td>'
        '<td><span class="ostate o-{cls}" title="{outcome}">{state}</span></td>'
        '<td>{commit}</td><td><span class="branch">{branch}</span></td><td>{since}</td>'
        '<td class="num">{runs}</td><td class="num">{rate}</td></tr>',
        href=test_url(t["id"], t["key"]), name=t["id"], cls=outcome_class(t["outcome"]),
        outcome=t["outcome"], state=quarantine_state(t), commit=commit_link(t["commit"]),
        branch=t["branch"] or "(none)",
        since=commit_link(t["quarantined_since"]) if t["quarantined_since"] else "",
        runs=t["runs"], rate=rate(t["failure_rate"])) for t in rows)
    return render('<h2>Quarantined ({count})</h2><table class="grid history"><thead><tr>'
                  '<th>test</th><th>latest run</th><th>commit</th><th>branch</th>'
                  '<th>quarantined since</th><th class="num">runs</th>'
                  '<th class="num">failure rate</th></tr></thead><tbody>{body}</tbody></table>',
                  count=len(rows), body=body)


def tests_sections(overview: dict) -> dict[str, Safe]:
    summary = render('<div class="commit-head"><h1>Tests</h1><p class="full-id">{tests} '
                     'tests seen in {results} results</p></div>',
                     tests=overview["tests_seen"], results=overview["results"])
    return {"sec-tests-summary": summary,
            "sec-failing": tests_table("Most often failing", overview["failing"],
                                       "No test has failed."),
            "sec-flakiest": flaky_table(overview.get("flakiest") or []),
            "sec-quarantined": quarantined_table(overview.get("quarantined") or []),
            "sec-slowest": tests_table("Slowest (mean duration)", overview["slowest"],
                                       "No test has run yet.")}


# --------------------------------------------------------------------------
# /test?id=...

def test_sections(test: dict) -> dict[str, Safe]:
    recent = test["recent"]
    return {"sec-test-head": head_section(test),
            "sec-strip": strip_section(recent[::-1], test["branch"]),
            "sec-durations": durations_section(recent[::-1]),
            "sec-runs": runs_section(recent)}


def head_section(test: dict) -> Safe:
    window = test["window"]
    links = join((render('<a class="branch{current}" href="{href}">{branch}</a>',
                         current=" current" if b == test["branch"] else "",
                         href=test_url(test["id"], test["key"], b), branch=b)
                  for b in test["branches"] if BRANCH_RE.fullmatch(b)), " ")
    facts = [("branch", render('<span class="branch">{b}</span>', b=test["branch"] or "(none)")),
             ("last runs", window["runs"]), ("failed", window["failures"]),
             ("failure rate", rate(window["failure_rate"])),
             ("flaky", window.get("flaky", 0)), ("flake rate", rate(window.get("flake_rate", 0))),
             ("mean duration", seconds(window["mean_duration"])),
             ("longest", seconds(window["max_duration"])),
             ("all runs", test["runs"]), ("all failures", test["failures"]),
             ("overall failure rate", rate(test["failure_rate"]))]
    rows = join(render("<dt>{k}</dt><dd>{v}</dd>", k=k, v=v) for k, v in facts)
    return render('<div class="commit-head"><h1 class="test-title">{name}</h1>'
                  '<p class="full-id">test history &middot; branches: {links}{cells}</p></div>'
                  '<dl class="fields">{rows}</dl>', name=test["id"], links=links or "none",
                  cells=cell_links(test), rows=rows)


def cell_links(test: dict) -> Safe:
    """`` · cells: all py3.9 py3.12``: the matrix cells of the runs shown,
    each a link to that cell's runs only; nothing outside a matrix."""
    chosen = test.get("cell")
    names = sorted(set(test.get("cells") or ()) | ({chosen} if chosen else set()))
    if not names:
        return Safe("")
    links = [render('<a class="branch{current}" href="{href}">all</a>',
                    current="" if chosen else " current",
                    href=test_url(test["id"], test["key"], test["branch"]))]
    links += [render('<a class="branch{current}" href="{href}">{cell}</a>',
                     current=" current" if name == chosen else "",
                     href=test_url(test["id"], test["key"], test["branch"], name), cell=name)
              for name in names]
    return render(" &middot; cells: {links}", links=join(links, " "))


def strip_section(oldest_first: list[dict], branch: str) -> Safe:
    if not oldest_first:
        return render('<h2>Outcomes</h2><p class="empty">No run of this test on {branch}.</p>',
                      branch=branch or "(no branch)")
    cells = join(render('<a class="cell o-{cls}" href="/commit/{commit}" '
                        'title="{short}{cell} {outcome} {duration}"></a>',
                        cls=outcome_class(r["outcome"]), commit=r["commit"],
                        short=r["commit"][:10], cell=cell_label(r), outcome=r["outcome"],
                        duration=seconds(r["duration"])) for r in oldest_first)
    return render('<h2>Outcomes on {branch}, oldest to newest ({count})</h2>'
                  '<div class="strip" id="strip">{cells}</div>',
                  branch=branch or "(no branch)", count=len(oldest_first), cells=cells)


def cell_label(run: dict) -> str:
    """`` [py3.9]`` for a run in a matrix cell, else nothing."""
    return f" [{run['cell']}]" if run.get("cell") else ""


def durations_section(oldest_first: list[dict]) -> Safe:
    if not oldest_first:
        return Safe("")
    longest = max((r["duration"] for r in oldest_first), default=0.0) or 1.0
    bars = []
    for i, r in enumerate(oldest_first):
        height = max(1, round(CHART_HEIGHT * r["duration"] / longest))
        bars.append(render('<rect class="o-{cls}" x="{x}" y="{y}" width="{w}" height="{h}">'
                           '<title>{short}: {duration}</title></rect>',
                           cls=outcome_class(r["outcome"]), x=i * BAR_WIDTH,
                           y=CHART_HEIGHT - height, w=BAR_WIDTH - 2, h=height,
                           short=r["commit"][:10] + cell_label(r),
                           duration=seconds(r["duration"])))
    return render('<h2>Durations (longest {longest})</h2><svg class="durations" '
                  'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
                  'role="img" aria-label="durations">{bars}</svg>',
                  longest=seconds(longest), width=len(oldest_first) * BAR_WIDTH,
                  height=CHART_HEIGHT, bars=join(bars))


def runs_section(newest_first: list[dict]) -> Safe:
    if not newest_first:
        return Safe("")
    rows = join(render('<tr><td>{link}</td><td class="cellname">{cell}</td>'
                       '<td><span class="ostate o-{cls}">{outcome}</span>'
                       '</td><td class="num">{duration}</td><td class="runner">{runner}</td>'
                       '<td class="time">{finished}</td></tr>',
                       link=commit_link(r["commit"]), cell=r.get("cell") or "",
                       cls=outcome_class(r["outcome"]),
                       outcome=r["outcome"], duration=seconds(r["duration"]),
                       runner=r["runner"], finished=when(r["finished"]))
                for r in newest_first)
    return render('<h2>Runs</h2><table class="grid"><thead><tr><th>commit</th><th>cell</th>'
                  '<th>outcome</th>'
                  '<th class="num">duration</th><th>runner</th><th>finished (UTC)</th></tr>'
                  '</thead><tbody>{rows}</tbody></table>', rows=rows)


CSS = """
.strip { display:flex; flex-wrap:wrap; gap:3px; background:var(--card); border:1px solid var(--line);
  border-radius:8px; padding:12px; }
.strip .cell { display:block; width:14px; height:28px; border-radius:3px; }
.o-passed { background:#2da44e; fill:#2da44e; } .o-failed { background:var(--red); fill:var(--red); }
.o-error { background:#bf8700; fill:#bf8700; } .o-xpass { background:var(--purple); fill:var(--purple); }
.o-skipped, .o-xfail, .o-unknown { background:#afb8c1; fill:#afb8c1; }
.o-flaky { background:repeating-linear-gradient(135deg, #2da44e 0 4px, #d4a72c 4px 8px);
  fill:#d4a72c; }
span.ostate { background:none; font-weight:600; font-size:12px; }
span.o-passed { color:var(--green); } span.o-failed { color:var(--red); }
span.o-error { color:var(--amber); } span.o-xpass { color:var(--purple); }
span.o-skipped, span.o-xfail, span.o-unknown { color:var(--muted); }
span.o-flaky { color:var(--amber); }
svg.durations { background:var(--card); border:1px solid var(--line); border-radius:8px;
  padding:8px; max-width:100%; height:auto; }
.test-title, .test-id { overflow-wrap:anywhere; font-family:ui-monospace, Menlo, Consolas, monospace; }
.test-title { font-size:16px; } .branch.current { background:#0969da; color:#fff; }
"""
