"""HTML for the dashboard: every page is built from named sections, and the
same section functions feed the page and its JSON twin (which the page's
script polls to patch itself), so the two cannot disagree.

Escaping happens at one boundary: ``render(template, **values)`` escapes
every value unless it is a ``Safe`` (the output of another ``render``).
No handler builds HTML by concatenating strings of untrusted text.
"""

from __future__ import annotations

import html
import re
import time
import urllib.parse

from ci import mergeinfo, wire
from ci import state_schema
from ci.dashboard.assets import BADGE, CSS, LAYOUT, SCRIPT

VERDICT_CLASSES = ("passed", "failed", "error", "timeout", "conflict", "running", "queued")
SHORT = 10


class Safe(str):
    """Text that is already HTML (made by ``render`` or ``join``)."""


def escape(value) -> Safe:
    if isinstance(value, Safe):
        return value
    return Safe(html.escape("" if value is None else str(value), quote=True))


def render(template: str, **values) -> Safe:
    return Safe(template.format(**{key: escape(value) for key, value in values.items()}))


def join(parts, sep: str = "") -> Safe:
    return Safe(sep.join(escape(part) for part in parts))


def verdict_class(verdict) -> str:
    return verdict if verdict in VERDICT_CLASSES else "unknown"


# Branch names that may appear in a URL (git allows more; those are shown
# but get no badge or filter link).
BRANCH_RE = re.compile(r"[A-Za-z0-9._/\-+@]{1,200}")


def branch_query(branch: str) -> str:
    return "/?" + urllib.parse.urlencode({"branch": branch})


def badge_path(branch: str) -> str:
    return "/badge/" + urllib.parse.quote(branch, safe="") + ".svg"


def when(timestamp) -> str:
    if not timestamp:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))


def stamp(timestamp) -> str | None:
    """A unix time as the API gives times (ISO 8601, UTC)."""
    return when(timestamp).replace(" ", "T") + "Z" if timestamp else None


def seconds(value) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return ""
    if number < 60:
        return f"{number:.1f} s"
    return f"{int(number // 60)} min {int(number % 60)} s"


def author_name(author) -> str:
    """``Name <mail>`` shown as its name; the whole value stays in a title."""
    text = str(author or "")
    name = text.split("<", 1)[0].strip()
    return name or text


def pill(verdict) -> Safe:
    return render('<span class="pill v-{cls}">{text}</span>',
                  cls=verdict_class(verdict), text=verdict or "unknown")


def mark_tag(mark, branch) -> Safe:
    if mark == "broke":
        return render('<span class="mark broke">broke {branch}</span>', branch=branch or "?")
    if mark == "fixed":
        return render('<span class="mark fixed">fixed {branch}</span>', branch=branch or "?")
    return Safe("")


def commit_link(commit) -> Safe:
    return render('<a class="sha" href="/commit/{commit}">{short}</a>',
                  commit=commit, short=str(commit)[:SHORT])


# --------------------------------------------------------------------------
# Sections of the overview page.

def banner_section(live_error) -> Safe:
    if not live_error:
        return Safe("")
    return render('<div class="banner" role="alert"><strong>Dispatcher unavailable:</strong> '
                  '{error}. Results on disk are still shown; queue, running jobs and runners '
                  'are not.</div>', error=live_error)


def branches_section(branches: list[dict]) -> Safe:
    if not branches:
        return Safe('<h2>Branches</h2><p class="empty">No branch has a result yet.</p>')
    cards = []
    for item in branches:
        state = item["state"]
        if item.get("failing_now"):
            # The run goes on, but a test already failed: failing, now.
            state = "failing"
            detail = render('failing now: <span class="failing-now">{test}</span>',
                            test=item["failing_now"])
        elif state == "failing":
            detail = render("failing since {link}", link=commit_link(item["since"]))
        else:
            detail = Safe(state)
        running = render(' <span class="pill v-running">running</span>') \
            if item.get("running") else Safe("")
        cards.append(render(
            '<div class="branch-card s-{cls}"><div class="branch-top">'
            '<a class="branch-name" href="{href}">{branch}</a>'
            '{badge}</div>'
            '<div class="branch-state">{detail}{running}</div>'
            '<div class="branch-head">head {head}{pruned}</div></div>',
            cls="failed" if state == "failing" else "passed", href=branch_query(item["branch"]),
            branch=item["branch"], detail=detail,
            # The state in the URL: a section patched in place keeps an
            # image whose URL did not change (the browser's image cache).
            badge=render('<img class="badge" alt="{state}" src="{src}?state={state}">',
                         state=state, src=badge_path(item["branch"]))
            if BRANCH_RE.fullmatch(item["branch"]) else Safe(""),
            running=running, head=commit_link(item["head"]), pruned=pruned_note(item)))
    return render('<h2>Branches</h2><div class="branches">{cards}</div>', cards=join(cards))


def pruned_note(item: dict) -> Safe:
    """A branch card's word on retention: how many results were pruned,
    and the oldest kept."""
    if not item.get("pruned"):
        return Safe("")
    oldest = render(", oldest kept {link}", link=commit_link(item["oldest_kept"])) \
        if item.get("oldest_kept") else Safe("")
    return render(' <span class="pruned">&middot; {n} pruned{oldest}</span>',
                  n=item["pruned"], oldest=oldest)


def active_section(state: dict | None) -> Safe:
    if state is None:
        return Safe("")
    rows = []
    for job in state.get("running", []):
        rows.append(render(
            '<tr><td>{link}{cell}</td><td><span class="branch">{branch}</span></td>'
            '<td>{pill}</td><td>{elapsed}</td><td>{runner}</td></tr>',
            link=commit_link(job["commit"]), cell=cell_tag(job, "running"),
            branch=job.get("branch") or "",
            pill=render('{running}{failing}', running=pill("running"),
                        failing=render(' <span class="pill v-failed">failing</span> '
                                       '<span class="failing-now">{test}</span>',
                                       test=job["failing"]) if job.get("failing") else Safe("")),
            elapsed=(seconds(job["elapsed"]) + " elapsed" if job.get("elapsed") is not None
                     else "held after a dispatcher restart"),
            runner=job.get("runner") or ""))
    for job in state.get("queue", []):
        rows.append(render(
            '<tr><td>{link}{cell}</td><td><span class="branch">{branch}</span></td>'
            '<td>{pill}</td><td>position {position}{waiting}</td><td></td></tr>',
            link=commit_link(job["commit"]), cell=cell_tag(job, "queued"),
            branch=job.get("branch") or "", pill=pill("queued"),
            position=job.get("position", ""),
            waiting=render(' &middot; <span class="waiting">{why}</span>', why=job["waiting"])
            if job.get("waiting") else ""))
    if not rows:
        return Safe('<h2>Running and queued</h2><p class="empty">Nothing queued or running.</p>')
    return render('<h2>Running and queued</h2><table class="grid"><thead><tr><th>commit</th>'
                  '<th>branch</th><th>state</th><th>progress</th><th>runner</th></tr></thead>'
                  '<tbody>{rows}</tbody></table>', rows=join(rows))


def cell_tag(job: dict, verdict: str) -> Safe:
    """A matrix cell's name beside its commit (none without a matrix)."""
    if not job.get("cell"):
        return Safe("")
    return render(' <span class="cell v-{cls}">{cell}</span>', cls=verdict, cell=job["cell"])


def commit_rows(commits: list[dict]) -> Safe:
    rows = []
    for item in commits:
        rows.append(render(
            '<tr class="r-{cls}"><td>{link}</td>'
            '<td class="subject">{subject}{mark}</td>'
            '<td class="author" title="{author}">{name}</td>'
            '<td><span class="branch">{branch}</span></td><td>{pill}{badges}</td>'
            '<td class="num">{tests}</td><td class="num">{failures}</td>'
            '<td class="num">{errors}</td><td class="num">{skipped}</td>'
            '<td class="num">{duration}</td><td class="runner">{runner}</td>'
            '<td class="time">{finished}</td></tr>',
            cls=verdict_class(item.get("verdict")), link=commit_link(item["commit"]),
            subject=item.get("subject") or "", mark=mark_tag(item.get("mark"),
                                                             item.get("branch")),
            author=item.get("author") or "", name=author_name(item.get("author")),
            branch=item.get("branch") or "", pill=pill(item.get("verdict")),
            badges=item.get("badges") or Safe(""), tests=item.get("tests", ""), failures=item.get("failures", ""),
            errors=item.get("errors", ""), skipped=item.get("skipped", ""),
            duration=seconds(item.get("duration")), runner=item.get("runner") or "",
            finished=when(item.get("finished"))))
    return join(rows)


def commits_section(commits: list[dict], next_cursor, params: dict, older_page: bool,
                    title="Results") -> Safe:
    """``params``: the listing's filters, kept by the paging links;
    ``older_page``: reached through a cursor, so it links back to the top."""
    links = []
    if older_page:
        # A cursor only runs one way: back up to the newest page.
        links.append(render('<a href="/{query}">&larr; Newest results</a>',
                            query="?" + urllib.parse.urlencode(params) if params else ""))
    if next_cursor:
        links.append(render('<a href="/?{query}">Older results &rarr;</a>',
                            query=urllib.parse.urlencode({"before": next_cursor, **params})))
    more = render('<p class="more">{links}</p>', links=join(links)) if links else Safe("")
    if not commits:
        return render('<h2>{title}</h2><p class="empty">{empty}</p>{more}', title=title,
                      empty="No older results." if older_page else "No results yet.",
                      more=more)
    return render(
        '<h2>{title}</h2><table class="grid commits"><thead><tr><th>commit</th>'
        '<th>subject</th><th>author</th><th>branch</th><th>verdict</th>'
        '<th class="num">tests</th><th class="num">fail</th><th class="num">err</th>'
        '<th class="num">skip</th><th class="num">duration</th><th>runner</th>'
        '<th>finished (UTC)</th></tr></thead><tbody>{rows}</tbody></table>{more}',
        title=title, rows=commit_rows(commits), more=more)


# A runner's state as the dispatcher names it (state_schema) -> its colour
# on the page: one testing a commit, ours or not, is busy, not a warning.
RUNNER_CLASSES = {state_schema.IDLE: "idle", state_schema.RUNNING: "busy",
                  state_schema.OCCUPIED: "occupied", state_schema.SUSPECT: "suspect"}


def runners_section(state: dict | None) -> Safe:
    if state is None:
        return Safe("")
    rows = [render('<tr><td>{name}</td><td>{address}</td>'
                   '<td><span class="rstate r-{cls}">{state}</span></td><td>{commit}</td>'
                   '<td class="labels">{labels}{exclusive}</td></tr>',
                   name=r.get("name") or "", address=r.get("address") or "",
                   cls=RUNNER_CLASSES.get(r.get("state"), "other"), state=r.get("state") or "",
                   commit=commit_link(r["commit"]) if r.get("commit") else "",
                   labels=" ".join(r.get("labels") or []),
                   exclusive=" (exclusive)" if r.get("exclusive") else "")
            for r in state.get("runners", [])]
    if not rows:
        return Safe('<h2>Runners</h2><p class="empty">No runner registered.</p>')
    return render('<h2>Runners</h2><table class="grid"><thead><tr><th>name</th><th>address</th>'
                  '<th>state</th><th>commit</th><th>labels</th></tr></thead><tbody>{rows}</tbody>'
                  '</table>',
                  rows=join(rows))


# --------------------------------------------------------------------------
# Sections of one commit's page.

def fields_section(item: dict, status: str) -> Safe:
    keys = ("verdict", "branch", "previous", "subject", "author", "committed", "tests",
            "failures", "errors", "skipped", "flaky", "quarantined", "quarantined_failed",
            "quarantined_failing", "runner", "started", "duration", "exit_code",
            "reason", "merged_into", "merge_head", "conflicts", "setup", "setup_duration",
            "junit")
    rows = []
    for key in keys:
        value = item.get(key)
        if value in (None, ""):
            continue
        if key == "verdict":
            shown = join([pill(value), mark_tag(item.get("mark"), item.get("branch"))], " ")
        elif key in ("duration", "setup_duration") and seconds(value):
            shown = escape(seconds(value))
        elif key == "branch" and BRANCH_RE.fullmatch(value):
            shown = render('<a class="branch" href="{href}">{branch}</a>',
                           href=branch_query(value), branch=value)
        elif key == "branch":
            shown = render('<span class="branch">{branch}</span>', branch=value)
        elif key in ("previous", "merge_head") and wire.valid_full_commit(value):
            shown = commit_link(value)
        elif key == "merged_into" and mergeinfo.parse_merged_into(value):
            target, at = mergeinfo.parse_merged_into(value)
            shown = render('merged with <span class="branch">{target}</span> at {link}',
                           target=target, link=commit_link(at))
        elif key == "conflicts":
            shown = escape(", ".join(mergeinfo.parse_paths(value)))
        else:
            shown = escape(value)
        rows.append(render("<dt>{key}</dt><dd>{value}</dd>", key=key, value=shown))
    title = item.get("subject") or ""
    return render('<div class="commit-head"><h1><span class="sha-big">{short}</span> {title}</h1>'
                  '<p class="full-id">{commit} &middot; {status}</p></div>'
                  '<dl class="fields">{rows}</dl>',
                  short=str(item["commit"])[:SHORT], title=title, commit=item["commit"],
                  status=status, rows=join(rows))


def tests_section(tests: list[dict]) -> Safe:
    if not tests:
        return Safe("")
    rows = [render('<li class="t-{kind}"><span class="tkind">{kind}</span> '
                   '{name}{new}</li>',
                   kind=t["kind"],
                   name=render('<a href="{url}"><code>{name}</code></a>', url=t["url"],
                               name=t["name"]) if t.get("url") else
                   render("<code>{name}</code>", name=t["name"]),
                   new=join([Safe(' <span class="mark broke">new failure</span>')
                             if t.get("new") else Safe(""), since_note(t)])) for t in tests]
    failing = sum(t["kind"] in ("failure", "error") for t in tests)
    others = [f"{n} {kind}" for kind in ("flaky", "quarantined")
              if (n := sum(t["kind"] == kind for t in tests))]
    return render('<h2>Failing tests ({count}{others})</h2><ul class="tests">{rows}</ul>',
                  count=failing, others=f"; {', '.join(others)}" if others else "",
                  rows=join(rows))


def since_note(test: dict) -> Safe:
    """`` quarantined since <short commit>`` (linked) for a failing
    quarantined test whose quarantine the test history dates, else nothing."""
    since = test.get("quarantined_since")
    if not since or not wire.valid_full_commit(since):
        return Safe("")
    return render(' <span class="since">quarantined since <a href="/commit/{commit}">'
                  '<code>{short}</code></a></span>', commit=since, short=since[:SHORT])


def output_section(text: str, truncated: bool, commit: str, live: bool = False) -> Safe:
    note = Safe("")
    if truncated:
        note = render('<p class="note">Showing the end of a long output; '
                      '<a href="/commit/{commit}/output.txt">the whole output</a>.</p>',
                      commit=commit)
    title = "Live output (tail)" if live else "Output"
    return render('<h2>{title}</h2>{note}<pre class="output{cls}" id="output-pre">{text}</pre>',
                  title=title, note=note, cls=" tail" if live else "", text=text)


# --------------------------------------------------------------------------
# Whole pages.

def page(title: str, nonce: str, sections: dict[str, Safe], endpoint: str = "",
         css: str = "") -> bytes:
    """``css``: a page's own rules, after the common ones."""
    body = join(render('<section id="{key}" class="sec">{content}</section>',
                       key=key, content=content) for key, content in sections.items())
    return render(LAYOUT, title=title, nonce=nonce, css=Safe(CSS + css), body=body,
                  endpoint=endpoint, script=Safe(SCRIPT),
                  live=Safe('<span id="live-dot" class="live">live</span>') if endpoint
                  else Safe("")).encode("utf-8")


def message_page(title: str, nonce: str, text: str) -> bytes:
    return page(title, nonce, {"message": render('<div class="card"><h1>{title}</h1>'
                                                 '<p>{text}</p><p><a href="/">Overview</a>'
                                                 '</p></div>', title=title, text=text)})


def badge_svg(branch: str, state: str) -> bytes:
    colour = {"passing": "#2da44e", "failing": "#cf222e"}.get(state, "#8c959f")
    label = branch if len(branch) <= 40 else branch[:39] + "…"
    left = 8 + 7 * len(label)
    right = 8 + 7 * len(state)
    return render(BADGE, width=left + right, left=left, right=right, colour=colour,
                  label=label, state=state, lx=left // 2, rx=left + right // 2).encode("utf-8")
