"""The test history end to end: results from a real dispatcher and runner
land in the store in the dispatcher's state folder (and a restarted
dispatcher catches up with results it missed); the real dashboard serves
a test's history over HTTP, read-only, escaped, as pages and JSON."""

from __future__ import annotations

import json
import os

import pytest

import helpers
from support.cluster import FAILING_TEST, Fleet, git, wait_until
from support.dashboard import EVIL, LONG_ID, commit_id, write_history
from ci.history import store
from ci.history.queries import HistoryReader, Unavailable
from ci.outcome import Outcome
from ci.results import FAILED, PASSED, TestRecord, format_junit

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
    assert [t["id"] for t in tests["failing"]] == ["t.T." + EVIL, "t.T.test_flaky"]
    # A name too long for a URL is linked by its key.
    long_url = tests["slowest"][0]["url"]
    assert long_url.startswith("/test?key=")
    assert dash.json("/api" + long_url)["id"] == LONG_ID
    status, _, body = dash.get("/tests")
    assert status == 200 and b"Most often failing" in body

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
