"""The test history end to end: results from a real dispatcher and runner
land in the store in the dispatcher's state folder (and a restarted
dispatcher catches up with results it missed); the real dashboard serves
a test's history over HTTP, read-only, escaped, as pages and JSON."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

import helpers
from support.cluster import FAILING_TEST, Fleet, git, wait_until
from support.procs import children_of, cmdline
from support.dashboard import EVIL, LONG_ID, commit_id, write_history
from ci.history import store
from ci.history.queries import HistoryReader, Unavailable
from ci.outcome import Outcome
from ci.results import FAILED, PASSED, TestRecord
from ci.junit_xml import format_junit

BROKEN = "test_broken.TestBroken.test_wrong"
SAMPLE = "test_sample.TestSample.test_ok"


def history_of(cluster) -> HistoryReader:
    return HistoryReader(os.path.join(cluster.state, store.FILE_NAME))


def outcomes(reader, name) -> list[str] | None:
    """The test's outcomes on main, oldest first (None before any)."""
    try:
        test = reader.test(name, branch="main")
    except Unavailable:
        return None
    return test and [run["outcome"] for run in test["recent"]][::-1]


def test_results_from_real_daemons_land_in_the_store(cluster, upstream, dashboards):
    cluster.start_dispatcher()
    cluster.start_runner()
    cluster.start_observer("--poll", "0.3")
    first = git(upstream.path, "rev-parse", "HEAD")
    assert cluster.result(first)["verdict"] == "passed"
    red = upstream.commit({"tests/test_broken.py": FAILING_TEST}, "Break")
    assert cluster.result(red)["verdict"] == "failed"
    reader = history_of(cluster)
    wait_until(lambda: outcomes(reader, BROKEN) == [FAILED], 15, what="the red result")
    assert outcomes(reader, SAMPLE) == [PASSED, PASSED]
    test = reader.test(BROKEN)
    assert test["recent"][0]["commit"] == red and test["branch"] == "main"
    assert test["recent"][0]["runner"] and test["recent"][0]["verdict"] == "failed"

    # The dashboard beside it finds the store by default and serves it.
    dash = dashboards(cluster.results, cluster.dispatcher_address)
    data = dash.json("/api/test?id=" + BROKEN)
    assert [r["commit"] for r in data["recent"]] == [red]
    assert data["failures"] == 1 and data["window"]["failure_rate"] == 1.0
    status, _, body = dash.get(f"/commit/{red}")
    assert status == 200 and b'href="/test?id=' + BROKEN.encode() + b'"' in body

    # Down, then up again: what landed meanwhile is read from the files.
    cluster.daemons[0].stop()
    later = commit_id(77)
    Outcome({"commit": later, "verdict": "failed", "branch": "main"}, b"x\n",
            (TestRecord("test_broken.TestBroken", "test_wrong", FAILED, 0.2),)
            ).write(cluster.results, later)
    cluster.start_dispatcher()
    wait_until(lambda: outcomes(reader, BROKEN) == [FAILED, FAILED], 15, what="the catch-up")


@pytest.fixture
def history(results):
    return write_history(results)


def test_dashboard_test_pages_over_http(results, history, dashboards):
    dash = dashboards(results)
    page = dash.get("/test?id=t.T.test_flaky")
    assert page[0] == 200 and "script-src 'nonce-" in page[1]["Content-Security-Policy"]
    html = page[2].decode()
    assert html.count('class="cell o-failed"') == 2 and html.count('class="cell o-passed"') == 6
    assert f'href="/commit/{history[-1]}"' in html and "25.0%" in html
    api = dash.json("/api/test?id=t.T.test_flaky&limit=3")
    assert [r["commit"] for r in api["recent"]] == history[:-4:-1]
    assert api["runs"] == 8 and api["failures"] == 2 and api["window"]["runs"] == 3
    twin = dash.json("/api/page/test?id=t.T.test_flaky")
    assert set(twin["sections"]) == {"sec-test-head", "sec-strip", "sec-durations", "sec-runs"}

    tests = dash.json("/api/tests")
    assert tests["results"] == 8
    assert tests["slowest"][0]["id"] == LONG_ID
    assert [t["id"] for t in tests["failing"]] == \
        ["t.T." + EVIL, "t.T.test_quarantined", "t.T.test_flaky"]
    # The flakiest, with their flake rate; the quarantined in their latest
    # run, with its state, commit and the first commit of the quarantine.
    (rerun,) = tests["flakiest"]
    assert (rerun["id"], rerun["flaky"], rerun["runs"], rerun["flake_rate"]) == \
        ("t.T.test_rerun", 3, 8, 0.375)
    assert rerun["url"] == "/test?id=t.T.test_rerun" and rerun["failures"] == 0
    # The failing one first.
    assert [t["id"] for t in tests["quarantined"]] == ["t.T.test_quarantined", "t.Q." + EVIL]
    failing_q, evil_q = tests["quarantined"]
    assert (failing_q["outcome"], failing_q["failing"], failing_q["commit"]) == \
        ("failed", True, history[-1])
    assert failing_q["quarantined_since"] == history[4]
    assert failing_q["quarantined_since_url"] == f"/commit/{history[4]}"
    assert failing_q["commit_url"] == f"/commit/{history[-1]}"
    assert failing_q["finished"].endswith("Z") and failing_q["branch"] == "main"
    assert (evil_q["failing"], evil_q["quarantined_since"]) == (False, history[6])
    assert dash.json("/api" + evil_q["url"])["id"] == "t.Q." + EVIL
    # A name too long for a URL is linked by its key.
    long_url = tests["slowest"][0]["url"]
    assert long_url.startswith("/test?key=")
    assert dash.json("/api" + long_url)["id"] == LONG_ID
    status, _, body = dash.get("/tests")
    assert status == 200 and b"Most often failing" in body
    assert b"<h2>Flakiest</h2>" in body and b"<h2>Quarantined (2)</h2>" in body
    twin = dash.json("/api/page/tests")["sections"]
    assert "t.T.test_rerun" in twin["sec-flakiest"] and "37.5%" in twin["sec-flakiest"]
    assert 'href="/test?id=t.T.test_quarantined"' in twin["sec-quarantined"]
    assert f'href="/commit/{history[4]}"' in twin["sec-quarantined"]
    assert "test_lifted" not in twin["sec-quarantined"]

    # The payload in a test id is text, never markup, on both pages.
    evil_url = next(t["url"] for t in tests["failing"] if EVIL in t["id"])
    for body in (body, dash.get(evil_url)[2]):
        assert b'<img src=x' not in body and b"&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in body

    # Bad questions: 400; unknown tests: 404, as JSON under /api/.
    assert dash.get("/api/test")[0] == 400
    assert dash.get("/api/test?id=a&key=" + "0" * 24)[0] == 400
    assert dash.get("/api/test?key=zz")[0] == 400
    assert dash.get("/test?id=t.T.test_flaky&limit=0")[0] == 400
    assert dash.get("/test?id=t.T.test_flaky&branch=a%20b")[0] == 400
    status, _, body = dash.get("/api/test?id=t.T.nothing")
    assert status == 404 and json.loads(body)["error"]


def test_dashboard_without_a_history_says_so(results, dashboards, tmp_path):
    dash = dashboards(results, None, "--history", str(tmp_path / "nowhere.sqlite3"))
    status, _, body = dash.get("/api/tests")
    assert status == 503 and "no test history" in json.loads(body)["error"]
    status, _, body = dash.get("/tests")
    assert status == 503 and b"no test history" in body
    assert dash.get("/")[0] == 200


def test_no_test_history_writes_no_store(cluster):
    """``--no-test-history``: results land (file and XML) and no store is
    written; started again without it, the dispatcher catches the store up
    from those files."""
    cluster.start_dispatcher("--no-test-history")
    fleet = cluster.fleet = Fleet(1)
    cluster.closers.append(fleet)
    fleet.register(cluster.dispatcher_port)
    commit = commit_id(5)
    address = ("127.0.0.1", cluster.dispatcher_port)
    reply = helpers.call(address, "dispatch", commit, f"{commit} - main\n".encode())
    assert reply.command == "ok", reply
    records = (TestRecord("test_a.T", "test_one", PASSED, 0.1),
               TestRecord("test_a.T", "test_two", FAILED, 0.2, message="boom"))
    outcome = Outcome({"verdict": "failed", "runner": fleet.runners[0].key}, b"out\n",
                      records, format_junit(list(records), name=commit))
    reply = helpers.call(address, "results", f"{commit} {fleet.token(commit)}",
                         outcome.to_body())
    assert (reply.command, reply.argument) == ("ok", "stored")
    assert cluster.result(commit)["failures"] == "1"
    assert os.path.exists(os.path.join(cluster.results, commit + ".xml"))
    path = os.path.join(cluster.state, store.FILE_NAME)
    assert not os.path.exists(path)

    cluster.daemons[0].stop()
    cluster.start_dispatcher()
    wait_until(lambda: outcomes(history_of(cluster), "test_a.T.test_two") == [FAILED], 15,
               what="the catch-up")


def command_of(pid: int) -> str:
    return (cmdline(pid) or b"").replace(b"\0", b" ").decode("utf-8", "replace")


def gone(pid: int) -> bool:
    """Exited (a zombie of an init that has not reaped it yet counts)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_the_writer_process_does_not_outlive_a_sigkilled_dispatcher(cluster):
    """The history writer runs in a child process of the dispatcher, in a
    process group of its own; SIGKILL to the dispatcher alone (not its
    group) still ends it: it exits when its stdin closes."""
    daemon = cluster.start_dispatcher()
    wait_until(lambda: any("ci.history.child" in command_of(p) for p in children_of(daemon.pid)),
               10, what="the writer process")
    (child,) = [p for p in children_of(daemon.pid) if "ci.history.child" in command_of(p)]
    assert os.getpgid(child) != os.getpgid(daemon.pid)
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.proc.wait(10)
    try:
        wait_until(lambda: gone(child), 10, what="the orphaned writer's exit")
    finally:
        if not gone(child):
            os.kill(child, signal.SIGKILL)


def build_store(results) -> None:
    """The store where the dashboard looks by default, built from the
    files by the dispatcher's writer."""
    from ci.history.writer import HistoryWriter
    state = os.path.join(os.path.dirname(str(results)), "dispatcher_state")
    os.makedirs(state, exist_ok=True)
    writer = HistoryWriter(os.path.join(state, store.FILE_NAME), str(results))
    writer.start()
    assert writer.ready.wait(10), "the history was not built"
    writer.stop()


def quarantine_chain(results) -> list[str]:
    """Four commits on main: ``t.Q.test_q`` fails in each, quarantined from
    the second on; the last is a matrix commit (cells py3.9, py3.12: its
    own file has no XML), whose py3.9 cell fails it quarantined."""
    from ci.dispatch.cells import summary
    from ci.matrix import Cell
    from ci.results import read_header, result_name
    base = time.time() - 600
    commits = [commit_id(0x5000 + n) for n in range(4)]

    def recs(marked, outcome=FAILED):
        return (TestRecord("t.Q", "test_q", outcome, 0.1, message="x", quarantined=marked),
                TestRecord("t.Q", "test_ok", PASSED, 0.1))
    for n, commit in enumerate(commits[:3]):
        Outcome({"commit": commit, "verdict": "passed", "branch": "main", "runner": "r",
                 "quarantined": 1, "quarantined_failed": int(n > 0),
                 "quarantined_failing": '["t.Q.test_q"]'}, b"out\n",
                recs(n > 0)).write(str(results), commit)
        os.utime(os.path.join(results, commit), (base + n, base + n))
    last = commits[3]
    for cell, outcome in (("py3.9", FAILED), ("py3.12", PASSED)):
        Outcome({"commit": last, "verdict": "passed", "branch": "main", "runner": "r",
                 "cell": cell}, b"out\n", recs(True, outcome)).write(str(results), last, cell)
    headers = {c: read_header(os.path.join(results, result_name(last, c)))
               for c in ("py3.9", "py3.12")}
    summary(last, {c: Cell(c) for c in headers}, headers).write(str(results), last)
    os.utime(os.path.join(results, last), (base + 3, base + 3))
    return commits


def test_quarantined_since_and_cells_over_http(results, dashboards):
    commits = quarantine_chain(results)
    build_store(results)
    dash = dashboards(results)
    since = f'quarantined since <a href="/commit/{commits[1]}"><code>{commits[1][:10]}'
    status, _, body = dash.get(f"/commit/{commits[2]}")
    assert status == 200 and since in body.decode()
    (test,) = [t for t in dash.json(f"/api/commits/{commits[2]}")["failing_tests"]
               if t["name"] == "t.Q.test_q"]
    assert test["kind"] == "quarantined" and test["quarantined_since"] == commits[1]
    assert test["quarantined_since_url"] == f"/commit/{commits[1]}"
    # The matrix commit: its cell lists the test, dated the same.
    assert since in dash.get(f"/commit/{commits[3]}")[2].decode()
    (cell,) = [c for c in dash.json(f"/api/commits/{commits[3]}")["cells"] if c["name"] == "py3.9"]
    assert cell["failing_tests"][0]["quarantined_since"] == commits[1]

    # The test's history per cell: every run, then one cell's only.
    runs = dash.json("/api/test?id=t.Q.test_q")["recent"]
    assert [(r["commit"], r["cell"]) for r in runs] == [
        (commits[3], "py3.12"), (commits[3], "py3.9"), (commits[2], ""), (commits[1], ""),
        (commits[0], "")]
    assert [r["quarantined"] for r in runs] == [True, True, True, True, False]
    only = dash.json("/api/test?id=t.Q.test_q&cell=py3.9")
    assert [(r["commit"], r["outcome"]) for r in only["recent"]] == [(commits[3], FAILED)]
    html = dash.get("/test?id=t.Q.test_q")[2].decode()
    assert 'href="/test?id=t.Q.test_q&amp;branch=main&amp;cell=py3.9"' in html
    assert f'title="{commits[3][:10]} [py3.9] failed' in html
    assert dash.get("/api/test?id=t.Q.test_q&cell=a%20b")[0] == 400
