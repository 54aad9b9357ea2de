"""The dashboard's fixed text: the page layout, the common stylesheet, the
script that patches a page from its JSON twin, the badge and the icon.
Apart from ``pages.py`` (which builds the sections) so that the HTML
logic reads without 150 lines of CSS and JavaScript in the way; a page's
own rules stay with that page (``cells.CSS``, ``queue_pages.CSS``,
``history_pages.CSS``)."""

from __future__ import annotations

FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
           b'<path d="M8 1l7 7-7 7-7-7z" fill="#2da44e"/></svg>')

BADGE = ('<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="20" role="img" '
         'aria-label="{label}: {state}"><title>{label}: {state}</title>'
         '<rect width="{left}" height="20" fill="#555"/>'
         '<rect x="{left}" width="{right}" height="20" fill="{colour}"/>'
         '<g fill="#fff" text-anchor="middle" font-family="Verdana,DejaVu Sans,sans-serif" '
         'font-size="11"><text x="{lx}" y="14">{label}</text>'
         '<text x="{rx}" y="14">{state}</text></g></svg>')

LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><link rel="icon" href="/favicon.svg"><style nonce="{nonce}">{css}</style></head>
<body><header class="top"><a class="brand" href="/"><span class="logo">&#9670;</span> CI dashboard</a>
<nav><a href="/">Overview</a><a href="/queue">Land queue</a><a href="/tests">Tests</a><a href="/api/status">API</a></nav>{live}</header>
<main>{body}</main>
<footer>Read-only view of the results folder and the dispatcher's live state.</footer>
<script nonce="{nonce}" id="updater" data-endpoint="{endpoint}">{script}</script>
</body></html>
"""

# Patches the page from its JSON twin: each section whose HTML changed is
# replaced (the server escaped it); a final answer stops the polling.
SCRIPT = """(function () {
  var script = document.getElementById('updater');
  var url = script && script.getAttribute('data-endpoint');
  if (!url || !window.fetch) { return; }
  var last = {}, busy = false, timer = null;
  var dot = document.getElementById('live-dot');
  function apply(data) {
    var sections = data.sections || {};
    Object.keys(sections).forEach(function (key) {
      var el = document.getElementById(key);
      if (!el || last[key] === sections[key]) { return; }
      var pre = el.querySelector('pre.tail');
      var follow = !pre || pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 20;
      el.innerHTML = sections[key];
      last[key] = sections[key];
      var now = el.querySelector('pre.tail');
      if (now && follow) { now.scrollTop = now.scrollHeight; }
    });
    if (data.title) { document.title = data.title; }
    if (dot) { dot.className = 'live on'; }
    if (data.final) { clearInterval(timer); if (dot) { dot.className = 'live'; } }
  }
  function tick() {
    if (busy) { return; }
    busy = true;
    fetch(url, {credentials: 'same-origin', cache: 'no-store'})
      .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.json(); })
      .then(apply)
      .catch(function () { if (dot) { dot.className = 'live off'; } })
      .then(function () { busy = false; });
  }
  // A live tail starts at its newest line, and follows it while the
  // reader has not scrolled up.
  var tail = document.querySelector('pre.tail');
  if (tail) { tail.scrollTop = tail.scrollHeight; }
  timer = setInterval(tick, 1000);
  tick();
})();
"""

CSS = """
:root { --bg:#f6f8fa; --card:#fff; --line:#d0d7de; --text:#1f2328; --muted:#656d76;
  --green:#1a7f37; --green-bg:#dafbe1; --red:#cf222e; --red-bg:#ffebe9; --amber:#9a6700;
  --amber-bg:#fff8c5; --blue:#0969da; --blue-bg:#ddf4ff; --purple:#8250df; --purple-bg:#fbefff; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--text);
  font:14px/1.45 -apple-system, "Segoe UI", "Noto Sans", Helvetica, Arial, sans-serif; }
a { color:var(--blue); text-decoration:none; } a:hover { text-decoration:underline; }
header.top { display:flex; align-items:center; gap:24px; padding:12px 24px; background:#24292f;
  color:#fff; }
header.top .brand { color:#fff; font-weight:600; font-size:16px; }
header.top .logo { color:#2da44e; }
header.top nav a { color:#d0d7de; margin-right:16px; }
.live { margin-left:auto; font-size:12px; color:#8c959f; }
.live::before { content:""; display:inline-block; width:8px; height:8px; border-radius:50%;
  background:#8c959f; margin-right:6px; }
.live.on::before { background:#2da44e; } .live.off::before { background:#cf222e; }
main { max-width:1280px; margin:0 auto; padding:20px 24px 40px; }
footer { text-align:center; color:var(--muted); font-size:12px; padding:0 0 24px; }
.sec:empty { display:none; }
.sec { margin-bottom:22px; }
h1 { font-size:20px; margin:0 0 4px; } h2 { font-size:15px; margin:0 0 10px; color:#24292f; }
.empty { color:var(--muted); margin:0; padding:14px; background:var(--card);
  border:1px solid var(--line); border-radius:8px; }
.banner { background:var(--amber-bg); border:1px solid #d4a72c; color:#4d2d00; padding:10px 14px;
  border-radius:8px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:18px; }
.branches { display:grid; grid-template-columns:repeat(auto-fill, minmax(260px, 1fr)); gap:12px; }
.branch-card { background:var(--card); border:1px solid var(--line); border-left:4px solid;
  border-radius:8px; padding:12px 14px; }
.branch-card.s-passed { border-left-color:#2da44e; } .branch-card.s-failed { border-left-color:var(--red); }
.branch-top { display:flex; flex-wrap:wrap; justify-content:space-between; align-items:center;
  gap:4px 8px; }
.branch-name { font-weight:600; font-size:15px; color:var(--text); overflow-wrap:anywhere;
  flex:1 1 auto; min-width:0; }
.badge { flex-shrink:0; }
.branch-state { margin-top:6px; } .branch-head { color:var(--muted); font-size:12px; margin-top:4px; }
table.grid { width:100%; border-collapse:separate; border-spacing:0; background:var(--card);
  border:1px solid var(--line); border-radius:8px; overflow:hidden; }
.grid th { text-align:left; font-weight:600; font-size:12px; color:var(--muted); background:#f6f8fa;
  padding:8px 10px; border-bottom:1px solid var(--line); white-space:nowrap; }
.grid td { padding:8px 10px; border-bottom:1px solid #eaeef2; vertical-align:middle; }
.grid tr:last-child td { border-bottom:0; }
.grid tbody tr:hover { background:#f6f8fa; }
.grid .num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
.grid .subject { min-width:220px; max-width:420px; overflow-wrap:anywhere; }
.grid .time, .grid .runner { color:var(--muted); white-space:nowrap; font-size:12px; }
.grid .author { white-space:nowrap; max-width:160px; overflow:hidden; text-overflow:ellipsis; }
.commits tr.r-failed td:first-child, .commits tr.r-error td:first-child,
.commits tr.r-timeout td:first-child, .commits tr.r-conflict td:first-child { box-shadow:inset 3px 0 0 var(--red); }
.commits tr.r-passed td:first-child { box-shadow:inset 3px 0 0 #2da44e; }
.sha { font-family:ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:13px; }
.branch { font-family:ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:12px;
  background:var(--blue-bg); color:#0550ae; padding:1px 6px; border-radius:6px;
  display:inline-block; max-width:100%; overflow-wrap:anywhere; }
.grid .branch { max-width:160px; white-space:nowrap; overflow:hidden; text-overflow:ellipsis;
  vertical-align:middle; }
.branch:empty { display:none; }
.pill { display:inline-block; font-size:12px; font-weight:600; padding:1px 8px; border-radius:999px;
  border:1px solid transparent; white-space:nowrap; }
.v-passed { background:var(--green-bg); color:var(--green); border-color:#aceebb; }
.v-failed { background:var(--red-bg); color:var(--red); border-color:#ffcecb; }
.v-error { background:var(--amber-bg); color:var(--amber); border-color:#eac54f; }
.v-timeout { background:var(--purple-bg); color:var(--purple); border-color:#d8b9ff; }
.v-conflict { background:var(--red-bg); color:var(--red); border-color:var(--red); border-style:dashed; }
.v-running { background:var(--blue-bg); color:var(--blue); border-color:#b6e3ff; }
.v-queued, .v-unknown { background:#eaeef2; color:var(--muted); border-color:var(--line); }
.mark { display:inline-block; margin-left:8px; font-size:11px; font-weight:600; padding:0 6px;
  border-radius:6px; border:1px solid; white-space:nowrap; }
.mark.broke { color:var(--red); border-color:var(--red); }
.mark.fixed { color:var(--green); border-color:var(--green); }
.rstate { font-size:12px; font-weight:600; } .rstate.r-idle { color:var(--green); }
.rstate.r-busy, .rstate.r-occupied { color:var(--blue); }
.rstate.r-suspect, .rstate.r-other { color:var(--amber); }
.more { margin:10px 0 0; } .more a + a { margin-left:1.5em; }
.commit-head { margin-bottom:12px; } .sha-big { font-family:ui-monospace, Menlo, Consolas, monospace;
  color:var(--muted); font-weight:500; }
.full-id { color:var(--muted); font-family:ui-monospace, Menlo, Consolas, monospace; font-size:12px; margin:0; }
dl.fields { display:grid; grid-template-columns:max-content 1fr max-content 1fr; gap:6px 18px; margin:0;
  background:var(--card); border:1px solid var(--line); border-radius:8px; padding:14px 18px; }
@media (max-width: 800px) { dl.fields { grid-template-columns:max-content 1fr; } }
dl.fields dt { color:var(--muted); } dl.fields dd { margin:0; overflow-wrap:anywhere; }
ul.tests { list-style:none; margin:0; padding:0; background:var(--card); border:1px solid var(--line);
  border-radius:8px; }
ul.tests li { padding:8px 12px; border-bottom:1px solid #eaeef2; } ul.tests li:last-child { border-bottom:0; }
.tkind { display:inline-block; min-width:58px; font-size:11px; font-weight:700; text-transform:uppercase;
  color:var(--red); } .t-error .tkind { color:var(--amber); }
.t-flaky .tkind, .t-quarantined .tkind { color:var(--muted); }
pre.output { background:#0d1117; color:#e6edf3; padding:14px 16px; border-radius:8px; margin:0;
  overflow:auto; max-height:70vh; font:12.5px/1.5 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  white-space:pre-wrap; overflow-wrap:anywhere; }
.note { color:var(--muted); }
"""
