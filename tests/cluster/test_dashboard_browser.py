"""The dashboard in a real headless Chromium (Debian's package, driven by
playwright): verdicts and marks, live updates without a reload, live
output of a running commit, XSS payloads that must stay dead, the token.

Each test saves a screenshot of every page it looked at in its tmp folder.
"""

from __future__ import annotations

import http.server
import os
import shutil
import threading
import time

import pytest
from support.dashboard import (
    EVIL, StandInDispatcher, commit_id, red_green_history, write_history, write_matrix_result,
    write_result)

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    expect = sync_playwright = None

CHROMIUM = os.environ.get("CI_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def _missing() -> str:
    missing = []
    if sync_playwright is None:
        missing.append("the playwright package (pip install -r requirements-dev.txt)")
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    return " and ".join(missing)


@pytest.fixture(scope="module")
def browser():
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests need {missing}; .ci/run installs them")
        pytest.skip(f"browser tests need {missing}")
    with sync_playwright() as play:
        chromium = play.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS,
                                        headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1360, "height": 860})
    tab = context.new_page()
    tab.console = []
    tab.on("console", lambda message: tab.console.append(message.text))
    yield tab
    context.close()




class Beacon:
    """A loopback HTTP server that records every request: what an injected
    payload would call."""

    def __init__(self):
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.thread.join(5)
        self.server.server_close()


@pytest.fixture
def beacon():
    made = Beacon()
    yield made
    made.close()


def polls(page, count: int, path: str):
    """Wait until the page's own script has fetched ``path`` ``count`` more
    times (so anything a payload would do has had its chance)."""
    for _ in range(count):
        with page.expect_response(lambda response: path in response.url, timeout=5000):
            pass


def verdicts_shown(page) -> list[str]:
    return page.locator("#sec-commits tbody tr .pill").all_inner_texts()


def test_red_green_history_and_a_new_commit_without_reload(page, results, dashboards,
                                                           tmp_path):
    commits = red_green_history(results)
    dash = dashboards(results)
    page.goto(dash.url + "/")
    assert verdicts_shown(page) == ["passed", "passed", "failed", "failed", "passed"]
    rows = page.locator("#sec-commits tbody tr")
    assert "fixed main" in rows.nth(1).inner_text()
    assert "broke main" in rows.nth(3).inner_text()
    assert page.locator(".mark").count() == 2
    assert "passing" in page.locator(".branch-card").inner_text()
    assert page.locator(".banner").inner_text().startswith("Dispatcher unavailable")
    page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)

    # A commit lands while the page is open: it shows up without a reload.
    page.evaluate("window.__same_page = 'yes'")
    write_result(results, commit_id(99), "failed", b"FAIL: test_x (t.T.test_x)\n",
                 previous=commits[-1], subject="Break it again")
    started = time.monotonic()
    expect(page.locator("#sec-commits tbody tr")).to_have_count(6, timeout=5000)
    # The "within 2 s" (a 1 s poll) on a quiet machine; slack for a busy one.
    assert time.monotonic() - started < 4.0
    assert page.evaluate("window.__same_page") == "yes"
    assert verdicts_shown(page)[0] == "failed"
    assert page.locator(".mark.broke").count() == 2
    assert "failing since" in page.locator(".branch-card").inner_text()
    page.screenshot(path=str(tmp_path / "overview-live.png"), full_page=True)

    page.click(f"a[href='/commit/{commit_id(99)}']")
    page.wait_for_url(f"**/commit/{commit_id(99)}")
    assert "test_x (t.T.test_x)" in page.locator("ul.tests").inner_text()
    assert "new failure" in page.locator("ul.tests").inner_text()
    page.screenshot(path=str(tmp_path / "commit.png"), full_page=True)


def test_empty_then_a_long_history_with_pruned_results(page, results, dashboards, tmp_path):
    """An empty folder says so; a long history whose oldest results were
    pruned counts them on the branch card, and a pruned commit that has a
    result file again (a retest) counts as a result, not as pruned."""
    from ci.retention.tombstones import FILE_NAME, Tombstone, TombstoneFile
    dash = dashboards(results)
    page.goto(dash.url + "/")
    assert "No results yet." in page.locator("#sec-commits").inner_text()
    page.screenshot(path=str(tmp_path / "empty.png"), full_page=True)

    base = time.time() - 3600
    commits = [commit_id(0x2000 + i) for i in range(60)]
    state = tmp_path / "dispatcher_state"
    state.mkdir(exist_ok=True)
    stones = TombstoneFile(str(state / FILE_NAME))
    stones.append([Tombstone(c, "passed", base + i, base + 3000, commits[i - 1] if i else None,
                             "main") for i, c in enumerate(commits[:20])])
    for i, commit in enumerate(commits[19:], start=19):     # 19: pruned, then retested
        write_result(results, commit, "failed" if i in (40, 41) else "passed",
                     previous=commits[i - 1], subject=f"Step {i}", mtime=base + 10 * i)
    expect(page.locator(".branch-card .pruned")).to_contain_text("19 pruned", timeout=10000)
    assert dash.json("/api/status")["pruned"] == 19
    assert len(verdicts_shown(page)) > 20
    page.screenshot(path=str(tmp_path / "long-pruned.png"), full_page=True)
    page.goto(dash.url + f"/commit/{commits[5]}")
    assert "pruned" in page.locator("body").inner_text()
    page.screenshot(path=str(tmp_path / "commit-pruned.png"), full_page=True)


def test_a_failing_test_links_to_its_history(page, results, dashboards, tmp_path):
    """From a commit's failing test to its page: a strip of red and green
    along the branch, durations, failure rate; the tests page; a test id
    carrying markup stays text."""
    commits = write_history(results)
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    dash = dashboards(results)
    page.goto(f"{dash.url}/commit/{commits[5]}")
    page.click("ul.tests a:has-text('t.T.test_flaky')")
    page.wait_for_url("**/test?id=t.T.test_flaky")
    cells = page.locator("#strip .cell")
    expect(cells).to_have_count(8)
    colours = cells.evaluate_all("cs => cs.map(c => getComputedStyle(c).backgroundColor)")
    red, green = colours[1], colours[0]
    assert red != green and [c == red for c in colours] == [n % 4 == 1 for n in range(8)]
    assert page.locator("svg.durations rect").count() == 8
    assert "25.0%" in page.locator("#sec-test-head").inner_text()
    page.screenshot(path=str(tmp_path / "test-history.png"), full_page=True)
    # Each cell leads to its commit.
    cells.nth(7).click()
    page.wait_for_url(f"**/commit/{commits[7]}")

    page.goto(dash.url + "/tests")
    failing = page.locator("#sec-failing tbody tr")
    expect(failing).to_have_count(3)
    assert EVIL in failing.nth(0).inner_text()
    # The flakiest with their flake rate; the quarantined with their state,
    # latest commit and the first commit of the quarantine (issue 20).
    flakiest = page.locator("#sec-flakiest tbody tr")
    expect(flakiest).to_have_count(1)
    assert flakiest.nth(0).inner_text().split("\t")[:4] == ["t.T.test_rerun", "3", "8", "37.5%"]
    held = page.locator("#sec-quarantined tbody tr")
    expect(held).to_have_count(2)
    cells = held.nth(0).locator("td")
    assert cells.nth(0).inner_text() == "t.T.test_quarantined"
    assert cells.nth(1).inner_text() == "failing"
    assert cells.nth(4).locator("a").get_attribute("href") == f"/commit/{commits[4]}"
    assert held.nth(1).locator("td").nth(0).inner_text() == "t.Q." + EVIL
    assert held.nth(1).locator("td").nth(1).inner_text() == "passing"
    colours = [held.nth(i).locator(".ostate").evaluate("e => getComputedStyle(e).color")
               for i in range(2)]
    assert colours[0] != colours[1]          # failing red, passing green
    assert "test_lifted" not in page.locator("#sec-quarantined").inner_text()
    page.screenshot(path=str(tmp_path / "tests.png"), full_page=True)
    failing.nth(0).locator("a").click()
    expect(page.locator("h1.test-title")).to_have_text("t.T." + EVIL)
    assert page.locator("img[src='x']").count() == 0 and dialogs == []


def badge_colour(page) -> str:
    """The colour the branch card's badge image shows on its right half,
    read from its pixels (what the reader sees, not its URL)."""
    badge = page.locator(".branch-card img.badge")
    expect(badge).to_have_js_property("complete", True, timeout=3000)
    rgb = badge.evaluate("""img => {
        var c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        var g = c.getContext('2d'); g.drawImage(img, 0, 0);
        var d = g.getImageData(c.width - 3, 3, 1, 1).data;
        return [d[0], d[1], d[2]]; }""")
    return "green" if rgb[1] > rgb[0] else "red"


def test_badge_on_an_open_page_follows_the_branch(page, results, dashboards, tmp_path):
    """The card's badge turns red with its text when the branch breaks while
    the page is open (the same badge URL would be answered from the
    browser's image cache, still green)."""
    commits = red_green_history(results)
    dash = dashboards(results)
    page.goto(dash.url + "/")
    assert badge_colour(page) == "green"
    write_result(results, commit_id(98), "failed", b"FAIL: test_x (t.T.test_x)\n",
                 previous=commits[-1], subject="Break it")
    expect(page.locator(".branch-card")).to_contain_text("failing since", timeout=5000)
    deadline = time.monotonic() + 3
    while badge_colour(page) != "red":
        assert time.monotonic() < deadline, "the badge still shows passing"
        page.wait_for_timeout(100)
    page.screenshot(path=str(tmp_path / "overview-badge.png"), full_page=True)


def test_running_commit_shows_live_output(page, results, dashboards, threaded_servers,
                                          tmp_path):
    red_green_history(results)
    running = commit_id(500)
    stand_in = threaded_servers(StandInDispatcher)
    stand_in.state_reply = {
        "queue": [{"commit": commit_id(501), "branch": "main", "position": 1}],
        "running": [{"commit": running, "branch": "main", "runner": "runner-1",
                     "elapsed": 1.5, "shard": "1/2"}],
        "runners": [{"name": "runner-1", "address": "127.0.0.1:8901", "state": "running",
                     "commit": running},
                    {"name": "127.0.0.1:8902", "address": "127.0.0.1:8902", "state": "occupied",
                     "commit": commit_id(7)},
                    {"name": "runner-3", "address": "127.0.0.1:8903", "state": "idle",
                     "commit": None}],
        "counts": {}}
    stand_in.logs[running] = b"test_one (t.T.test_one) ... \x1b[32mok\x1b[0m\n"
    dash = dashboards(results, f"127.0.0.1:{stand_in.port}")
    page.goto(dash.url + "/")
    runners = page.locator("#sec-runners")
    assert "runner-1" in runners.inner_text() and "runner-3" in runners.inner_text()
    # Busy with work from before a restart: shown as such, in the busy colour.
    occupied = runners.locator(".rstate.r-occupied")
    expect(occupied).to_have_text("occupied")
    busy_colour = runners.locator(".rstate.r-busy").evaluate("e => getComputedStyle(e).color")
    assert occupied.evaluate("e => getComputedStyle(e).color") == busy_colour
    assert "runner-1 (shard 1/2)" in page.locator("#sec-active").inner_text()
    assert "position 1" in page.locator("#sec-active").inner_text()
    assert page.locator(".banner").count() == 0
    runners.screenshot(path=str(tmp_path / "runners.png"))
    page.screenshot(path=str(tmp_path / "overview-running.png"), full_page=True)

    page.goto(f"{dash.url}/commit/{running}")
    output = page.locator("#output-pre")
    assert output.inner_text().startswith("test_one (t.T.test_one) ... ok")
    page.evaluate("window.__same_page = 'yes'")
    with stand_in.lock:
        stand_in.logs[running] += b"test_two (t.T.test_two) ... slow\n"
    expect(output).to_contain_text("test_two", timeout=3000)
    page.screenshot(path=str(tmp_path / "commit-running.png"), full_page=True)

    # It finishes: the page turns into the result, still without a reload.
    write_result(results, running, "passed", b"..\nRan 2 tests\n\nOK\n",
                 previous=None, subject="The running one")
    with stand_in.lock:
        del stand_in.logs[running]
    expect(page.locator("#sec-summary .pill")).to_have_text("passed", timeout=4000)
    assert page.evaluate("window.__same_page") == "yes"
    assert "Ran 2 tests" in page.locator("#output-pre").inner_text()
    page.screenshot(path=str(tmp_path / "commit-finished.png"), full_page=True)


def test_xss_payloads_do_not_execute(page, results, dashboards, beacon, tmp_path):
    url = beacon.url
    evil = commit_id(666)
    write_result(
        results, evil, "failed",
        (f"<script>fetch('{url}/output-script')</script>\n"
         f"<img src=x onerror=\"fetch('{url}/output-onerror')\">\n"
         f"<img src=\"{url}/output-img\">\n"
         f"<a id=\"js\" href=\"javascript:fetch('{url}/output-link')\">click me</a>\n"
         f"\x1b[31m<svg onload=\"fetch('{url}/output-svg')\">\x1b[0m\n").encode(),
        subject=f"<img src=x onerror=\"fetch('{url}/subject')\"> "
                f"<a href=\"javascript:fetch('{url}/subject-link')\">x</a>",
        author=f"<script>fetch('{url}/author')</script> <a@b>",
        branch=f"x\"><script>fetch('{url}/branch')</script>")
    dash = dashboards(results)
    for path, name in (("/", "xss-overview"), (f"/commit/{evil}", "xss-commit")):
        page.goto(dash.url + path)
        if path == "/":
            polls(page, 2, "/api/page/overview")
        else:
            page.wait_for_load_state("networkidle")
        page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
        # The DOM holds the payloads as text, never as elements.
        assert page.evaluate("document.scripts.length") == 1
        assert page.evaluate(f"[...document.images].filter(i => i.src.includes('{url}'))"
                             ".length") == 0
        assert page.locator("a[href^='javascript:']").count() == 0
        assert page.locator("svg[onload], [onerror]").count() == 0
        assert "fetch(" in page.locator("body").inner_text()
    assert page.get_by_text("click me").count() == 1   # shown as text, not a link
    # Defence in depth: even markup injected past the escaping stays dead
    # under the Content-Security-Policy.
    page.evaluate(f"""() => {{
        document.body.insertAdjacentHTML('beforeend',
            '<img src="{url}/csp-img" onerror="fetch(\\'{url}/csp-onerror\\')">');
        const s = document.createElement('script');
        s.textContent = "fetch('{url}/csp-script')";
        document.body.appendChild(s);
    }}""")
    page.wait_for_load_state("networkidle")
    assert any("Content Security Policy" in text for text in page.console), page.console
    assert beacon.hits == []


def test_token_required_then_login_cookie(page, results, dashboards, tmp_path):
    token = "browser-token-" + "z" * 24
    (tmp_path / "token").write_text(token)
    red_green_history(results)
    dash = dashboards(results, None, "--token-file", str(tmp_path / "token"))
    reply = page.goto(dash.url + "/")
    assert reply.status == 401 and "Token required" in page.content()
    assert page.locator("#sec-commits").count() == 0
    page.screenshot(path=str(tmp_path / "token-required.png"), full_page=True)
    page.goto(f"{dash.url}/login?token={token}")
    assert page.url == dash.url + "/"
    assert len(verdicts_shown(page)) == 5
    # The page's own polling carries the cookie too.
    polls(page, 1, "/api/page/overview")
    assert page.locator("#live-dot.on").count() == 1


# After ``tick 5`` the ticking tests wait (at most 60 s) for the gate file
# the test makes once it has seen the run going on: a loaded machine's
# slow page must not see the run end first.
TICKS = """
        for i in range(40):
            print("tick", i, flush=True)
            time.sleep(0.05)
            deadline = time.monotonic() + 60
            while i == 5 and not os.path.exists({gate!r}) and time.monotonic() < deadline:
                time.sleep(0.05)
"""
TICKING_TEST = """import os
import time
import unittest

class TestTicks(unittest.TestCase):
    def test_ticks(self):""" + TICKS


def test_real_daemons_red_green_and_live_output(page, dashboards, cluster, upstream,
                                                tmp_path):
    """The whole system, no stand-ins: the observer's branch metadata and
    the runner's subject and author reach the page, broke / fixed are
    marked along the branch, and a running commit's output streams in
    from the runner through the dispatcher while it runs."""
    from support.cluster import FAILING_TEST, git
    cluster.start_dispatcher()
    cluster.start_runner("--progress-interval", "0.2")
    observer = cluster.start_observer("--poll", "0.3")
    first = git(upstream.path, "rev-parse", "HEAD")
    # The observer's first poll takes the head only: let it see this one.
    assert cluster.result(first)["verdict"] == "passed"
    red = upstream.commit({"tests/test_broken.py": FAILING_TEST}, "Break the sums")
    assert cluster.result(red)["verdict"] == "failed"
    green = upstream.commit({"tests/test_broken.py": None}, "Fix the sums")
    assert cluster.result(green)["verdict"] == "passed"
    dash = dashboards(cluster.results, cluster.dispatcher_address)
    page.goto(dash.url + "/")
    expect(page.locator("#sec-commits tbody tr")).to_have_count(3, timeout=5000)
    rows = page.locator("#sec-commits tbody tr")
    assert "Fix the sums" in rows.nth(0).inner_text() and "fixed main" in rows.nth(0).inner_text()
    assert "Break the sums" in rows.nth(1).inner_text() and "broke main" in rows.nth(1).inner_text()
    assert "CI Test" in rows.nth(1).inner_text()
    assert verdicts_shown(page) == ["passed", "failed", "passed"]
    assert first[:10] in rows.nth(2).inner_text()

    gate = str(tmp_path / "gate")
    slow = upstream.commit({"tests/test_ticks.py": TICKING_TEST.format(gate=gate)},
                           "Tick slowly")
    expect(page.locator("#sec-active")).to_contain_text(slow[:10], timeout=5000)
    # The dispatcher calls a testing runner "running": shown as busy, not as a warning.
    expect(page.locator("#sec-runners .rstate.r-busy")).to_have_text("running", timeout=3000)
    page.goto(f"{dash.url}/commit/{slow}")
    output = page.locator("#output-pre")
    expect(output).to_contain_text("tick 3", timeout=5000)
    assert "tick 39" not in output.inner_text()  # still running: the live tail
    page.screenshot(path=str(tmp_path / "real-running.png"), full_page=True)
    open(gate, "w").close()
    expect(page.locator("#sec-summary .pill")).to_have_text("passed", timeout=15000)
    expect(output).to_contain_text("tick 39", timeout=5000)
    page.screenshot(path=str(tmp_path / "real-finished.png"), full_page=True)
    assert observer.alive()


def test_matrix_cells_in_the_overview_and_on_the_commit_page(page, results, dashboards,
                                                             tmp_path):
    """A badge per cell beside the commit's verdict, a section per cell on
    its page (the failing cell's test named, its output folded)."""
    base = commit_id(0x2000)
    write_result(results, base, "passed", subject="Before the match statement")
    head = commit_id(0x2001)
    cells = write_matrix_result(results, head, previous=base)
    dash = dashboards(results)
    page.goto(dash.url + "/")
    row = page.locator("#sec-commits tbody tr").first
    assert row.locator(".pill").inner_text() == "failed"
    assert row.locator(".cell").all_inner_texts() == list(cells)
    assert "v-failed" in row.locator(".cell").first.get_attribute("class")
    assert "failing" in page.locator(".branch-card").inner_text()
    page.screenshot(path=str(tmp_path / "matrix-overview.png"), full_page=True)

    page.goto(dash.url + f"/commit/{head}")
    boxes = page.locator("#sec-cells .cell-box")
    expect(boxes).to_have_count(3)
    assert boxes.first.locator("h3").inner_text() == "py3.9 failed"
    assert "test_match" in boxes.first.inner_text()
    assert boxes.nth(1).locator(".pill").inner_text() == "passed"
    boxes.first.locator("summary").click()
    assert "SyntaxError" in boxes.first.locator("pre").inner_text()
    page.screenshot(path=str(tmp_path / "matrix-commit.png"), full_page=True)
    assert not [m for m in page.console if "Content Security Policy" in m]


FAILS_THEN_TICKS = """import os
import time
import unittest

class Early(unittest.TestCase):
    def test_a_broken(self):
        self.assertEqual(1 + 1, 3)

    def test_b_ticks(self):""" + TICKS


def test_the_first_failure_shows_on_the_live_page_before_the_run_ends(page, dashboards, cluster,
                                                                      upstream, tmp_path):
    """A test fails early in a 4 s run: the commit's live output names it,
    and the overview shows its branch failing, while the run goes on."""
    from support.cluster import git
    cluster.start_dispatcher()
    cluster.start_runner("--progress-interval", "0.2")
    cluster.start_observer("--poll", "0.3")
    assert cluster.result(git(upstream.path, "rev-parse", "HEAD"))["verdict"] == "passed"
    dash = dashboards(cluster.results, cluster.dispatcher_address)
    gate = str(tmp_path / "gate")
    slow = upstream.commit({"tests/test_early.py": FAILS_THEN_TICKS.format(gate=gate)},
                           "Fail early, run long")
    page.goto(dash.url + "/")
    expect(page.locator("#sec-branches")).to_contain_text(
        "failing now: test_early.Early.test_a_broken", timeout=10000)
    expect(page.locator("#sec-active")).to_contain_text("test_early.Early.test_a_broken")
    page.goto(f"{dash.url}/commit/{slow}")
    output = page.locator("#output-pre")
    expect(output).to_contain_text("[ci] first failing test: test_early.Early.test_a_broken",
                                   timeout=5000)
    assert not os.path.exists(cluster.result_path(slow))   # the run goes on
    page.screenshot(path=str(tmp_path / "failing-while-running.png"), full_page=True)
    open(gate, "w").close()
    expect(page.locator("#sec-summary .pill")).to_have_text("failed", timeout=15000)


def queue_snapshot(url: str, landing: bool = False) -> dict:
    """Two targets' queues and the recent decisions, with payloads where
    users type: branch names, who asked, reasons."""
    a, b, c, d, e = (commit_id(0x4000 + n) for n in range(5))

    def entry(n, branch, state, position, tested=None, base=None, reason="", target="main",
              by="ann@example.invalid"):
        return {"id": n, "branch": branch, "target": target, "head": commit_id(0x4100 + n),
                "state": state, "tested": tested, "base": base, "position": position,
                "reason": reason, "asked": 1_795_000_000 + n * 60, "by": by,
                "updated": 1_795_000_600 + n}
    evil_branch = f"x\"><img/src=x/onerror=fetch('{url}/branch')>"
    return {
        "updated": 1_795_000_900,
        "targets": {"main": {"head": a, "depth": 3}, "release/2.x": {"head": e, "depth": 1}},
        "entries": [
            entry(11, "feature/parser", "landing" if landing else "passed", 1, b, a),
            entry(12, evil_branch, "failing", 2, c, b,
                  reason=f"1 failure: <script>fetch('{url}/reason')</script>",
                  by=f"<img src=x onerror=\"fetch('{url}/by')\">"),
            entry(13, "feature/docs", "testing", 3, d, b),
            entry(14, "feature/later", "waiting", 4),
            entry(15, "fix/backport", "merging", 1, target="release/2.x"),
        ],
        "recent": [
            entry(9, "feature/sums", "rejected", None, commit_id(0x4200), a,
                  reason="2 failures: tests.test_calc.T.test_mean, tests.test_calc.T.test_sum"),
            entry(8, "feature/login", "landed", None, a, commit_id(0x4201)),
            entry(7, "feature/clash", "rejected", None, None, a,
                  reason="conflict: calc.py docs/index.md"),
        ]}


def test_land_queue_page_from_a_real_dispatcher(page, dashboards, cluster, results, beacon,
                                                tmp_path):
    """The observer's snapshot, told to a real dispatcher, on /queue: per
    target its entries in line with their state, what they are tested
    on, who asked and why one fails; the recent decisions below; updated
    in place when the next snapshot comes; payloads stay text."""
    import json
    import helpers
    from ci.wire import parse_address
    cluster.start_dispatcher()
    dispatcher = parse_address(cluster.dispatcher_address)

    def tell(snapshot):
        reply = helpers.call(dispatcher, "queue-state", "", json.dumps(snapshot).encode())
        assert reply.command == "ok", reply
    tell(queue_snapshot(beacon.url))
    red_green_history(results)
    dash = dashboards(results, cluster.dispatcher_address)
    page.goto(dash.url + "/")
    page.locator("header nav a", has_text="Land queue").click()
    page.wait_for_url(dash.url + "/queue")
    targets = page.locator("#sec-queue .target")
    expect(targets).to_have_count(2)
    main = targets.nth(0)
    assert main.locator("h2").inner_text().split() == ["Land", "queue", "into", "main", "4"]
    assert "4 entries" in main.locator(".target-facts").inner_text()
    assert "depth 3" in main.locator(".target-facts").inner_text()
    rows = main.locator("tbody tr")
    assert rows.locator(".pill").all_inner_texts() == ["passed", "failing", "testing", "waiting"]
    assert rows.locator(".pos").all_inner_texts() == ["1", "2", "3", "4"]
    assert "v-failed" in rows.nth(1).locator(".pill").get_attribute("class")
    assert f"{commit_id(0x4002)[:10]} on {commit_id(0x4001)[:10]}" in rows.nth(1).inner_text()
    assert "not yet" in rows.nth(3).inner_text()
    assert "1 failure: <script>" in rows.nth(1).locator(".reason").inner_text()
    assert targets.nth(1).locator("h2").inner_text().split() == ["Land", "queue", "into", "release/2.x", "1"]
    recent = page.locator("#sec-queue-recent tbody tr")
    assert recent.locator(".pill").all_inner_texts() == ["rejected", "landed", "rejected"]
    assert "tests.test_calc.T.test_mean" in recent.nth(0).inner_text()
    assert "conflict: calc.py" in recent.nth(2).inner_text()
    page.screenshot(path=str(tmp_path / "queue.png"), full_page=True)

    # The next snapshot: the page follows without a reload.
    page.evaluate("window.__same_page = 'yes'")
    tell(queue_snapshot(beacon.url, landing=True))
    expect(rows.nth(0).locator(".pill")).to_have_text("landing", timeout=5000)
    assert page.evaluate("window.__same_page") == "yes"
    page.screenshot(path=str(tmp_path / "queue-landing.png"), full_page=True)

    # Payloads are text, never elements.
    polls(page, 2, "/api/page/queue")
    assert page.evaluate("document.scripts.length") == 1
    assert page.locator("[onerror]").count() == 0
    assert "onerror=fetch(" in page.locator("#sec-queue").inner_text()
    assert beacon.hits == []
    api = dash.json("/api/queue")
    assert api["dispatcher"]["reachable"] is True
    assert [e["state"] for e in api["targets"]["main"]["entries"]] == \
        ["landing", "failing", "testing", "waiting"]
    assert api["targets"]["main"]["entries"][1]["tested_url"] == f"/commit/{commit_id(0x4002)}"
    assert api["recent"][0]["asked"] == "2026-11-18T11:15:40Z"


def test_land_queue_page_without_a_dispatcher(page, dashboards, results, tmp_path):
    dash = dashboards(results)
    page.goto(dash.url + "/queue")
    assert page.locator(".banner").inner_text().startswith("Dispatcher unavailable")
    assert page.locator("#sec-queue .target").count() == 0
    status, _, body = dash.get("/api/queue")
    assert status == 503 and b'"reachable": false' in body
    page.screenshot(path=str(tmp_path / "queue-unavailable.png"), full_page=True)
