"""The web dashboard: its pure functions, its index, and the real daemon
over HTTP against result files written into a temporary folder, with a
stand-in dispatcher for the live parts."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import threading
import time

import pytest
from ci import junit_xml
import helpers
from support.cluster import PY, ROOT, send_raw, wait_until
from support.dashboard import (
    StandInDispatcher, commit_id, red_green_history, write_result)

from ci import results as result_files
from ci.dashboard import app as dashboard_app
from ci.dashboard import index as di
from ci.dashboard import live as dashboard_live
from ci.dashboard import pages
from ci.wire import Message

A, B, C, D = (commit_id(n) for n in range(4))


# --------------------------------------------------------------------------
# Pure functions.

def chain(*verdicts, branch="main", start=0):
    """entries for commits start.. on one branch, each naming the one before."""
    entries = {}
    for i, verdict in enumerate(verdicts):
        commit = commit_id(start + i)
        entries[commit] = {"verdict": verdict, "branch": branch,
                           "previous": commit_id(start + i - 1) if i else None}
    return entries


def test_marks_red_green_history():
    entries = chain("passed", "failed", "failed", "passed", "passed")
    marks = di.compute_marks(entries)
    assert marks == {commit_id(1): "broke", commit_id(3): "fixed"}


def test_marks_follow_previous_chain_not_arrival():
    """The later commit's result came first: it is judged only once its
    predecessor has a result, and then by that predecessor."""
    full = chain("passed", "failed", "passed")
    early = {c: f for c, f in full.items() if c != commit_id(1)}
    assert di.compute_marks(early) == {}   # previous has no result: not judged yet
    assert di.compute_marks(full) == {commit_id(1): "broke", commit_id(2): "fixed"}


def test_marks_error_and_timeout_are_red_and_first_commit_unmarked():
    assert di.compute_marks(chain("error", "passed", "timeout")) == {
        commit_id(1): "fixed", commit_id(2): "broke"}
    assert di.compute_marks(chain("failed")) == {}


def test_branch_states():
    entries = chain("passed", "failed", "failed", branch="main")
    entries.update(chain("failed", "passed", branch="dev", start=10))
    states = di.branch_states(entries)
    assert states["main"] == {"branch": "main", "state": "failing", "head": commit_id(2),
                              "since": commit_id(1)}
    assert states["dev"]["state"] == "passing" and states["dev"]["head"] == commit_id(11)


def test_a_branch_head_counts_what_its_pruned_results_name():
    """c1 retested (the newest now), c2 pruned: c1 was named by no result
    file left, and so passed for main's head; the tip is c3."""
    entries = chain("passed", "passed", "failed", branch="main")
    del entries[commit_id(1)]
    order = {commit_id(0): 9.0, commit_id(2): 2.0}
    assert di.branch_states(entries, order)["main"]["head"] == commit_id(0)
    states = di.branch_states(entries, order, {"main": {commit_id(0)}})
    assert states["main"]["head"] == commit_id(2) and states["main"]["state"] == "failing"


def test_the_pruned_index_knows_what_pruned_results_name(tmp_path):
    from ci.dashboard.pruned import PrunedIndex
    from ci.retention.tombstones import Tombstone, TombstoneFile
    path = str(tmp_path / "pruned-results")
    TombstoneFile(path).append([Tombstone(commit_id(1), "passed", 1.0, 2.0, commit_id(0), "main"),
                                Tombstone(commit_id(5), "passed", 1.0, 2.0, None, "main")])
    index = PrunedIndex(path)
    assert index.refresh() and index.named() == {"main": {commit_id(0)}}


def test_failing_tests_from_unittest_and_pytest_output():
    unittest_out = ("F.E\n======\nFAIL: test_a (pkg.test_x.T.test_a)\n----\n"
                    "ERROR: test_b (pkg.test_x.T.test_b)\nFAIL: test_a (pkg.test_x.T.test_a)\n")
    assert di.failing_tests(unittest_out) == [
        {"name": "test_a (pkg.test_x.T.test_a)", "kind": "failure"},
        {"name": "test_b (pkg.test_x.T.test_b)", "kind": "error"}]
    pytest_out = ("=== short test summary info ===\n"
                  "FAILED tests/test_calc.py::test_mean - assert 2 == 3\n"
                  "ERROR tests/test_db.py::test_conn\nFAILED (failures=1)\n")
    assert di.failing_tests(pytest_out) == [
        {"name": "tests/test_calc.py::test_mean", "kind": "failure"},
        {"name": "tests/test_db.py::test_conn", "kind": "error"}]


def test_junit_parsing_refuses_doctype_and_entities():
    good = (b'<testsuite><testcase classname="t.T" name="a"/>'
            b'<testcase classname="t.T" name="b"><failure message="x"/></testcase>'
            b'<testcase classname="t.T" name="c"><error/></testcase></testsuite>')
    assert di.junit_statuses(good) == {"t.T.a": "passed", "t.T.b": "failure", "t.T.c": "error"}
    laughs = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">]>'
              b'<testsuite><testcase name="&lol;"/></testsuite>')
    assert di.junit_statuses(laughs) is None
    assert di.junit_statuses(b"<testsuite><!ENTITY x 'y'></testsuite>") is None
    assert di.junit_statuses(b"<testsuite><testcase") is None


def test_junit_in_utf16_with_an_entity_is_refused(tmp_path):
    """The dashboard reads JUnit with junit_xml.parse_junit: a UTF-16
    document slips past any byte-level search for "<!DOCTYPE"."""
    xml = ('<?xml version="1.0" encoding="UTF-16"?>'
           '<!DOCTYPE x [<!ENTITY e "expanded">]><testsuite>'
           '<testcase classname="t.T" name="&e;"><failure/></testcase></testsuite>')
    assert di.junit_statuses(xml.encode("utf-16")) is None
    write_result(tmp_path, A, "failed", b"no test names here\n")
    (tmp_path / (A + ".xml")).write_bytes(xml.encode("utf-16"))
    index = di.ResultIndex(str(tmp_path))
    assert index.read_junit(A) is None and index.test_report(A) == []


def test_junit_outcomes_named_by_record_id():
    xml = (b'<testsuite><testcase classname="t.T" name="a" outcome="xpass">'
           b'<failure type="unexpected success"/></testcase>'
           b'<testcase classname="t.T" name="b"><skipped/></testcase>'
           b'<testcase name="c"/></testsuite>')
    assert di.junit_statuses(xml) == {"t.T.a": "failure", "t.T.b": "skipped", "c": "passed"}


def test_old_and_new_junit_files_read_alike(tmp_path):
    """A result folder holds files written before the records left the XML
    (our own outcome/kind/subtest attributes) and after (junit-10.xsd):
    the dashboard names and judges their tests alike."""
    records = [result_files.TestRecord("t.T", "ok"),
               result_files.TestRecord("t.T", "bad", "failed", message="m"),
               result_files.TestRecord("t.T", "known", "xfail", message="k"),
               result_files.TestRecord("t.T", "lucky", "xpass"),
               result_files.TestRecord("t.T", "parts", "error", kind="subtest",
                                       subtest="(i=1)"),
               result_files.TestRecord("", "setUpClass (t.U)", "error", kind="fixture"),
               result_files.TestRecord("t.T", "later", "skipped")]
    old = (b'<testsuites skipped="1"><testsuite tests="6" skipped="1">'
           b'<testcase classname="t.T" name="ok"/>'
           b'<testcase classname="t.T" name="bad" outcome="failed"><failure message="m"/>'
           b'</testcase><testcase classname="t.T" name="known" outcome="xfail">'
           b'<system-out>k\n</system-out></testcase>'
           b'<testcase classname="t.T" name="lucky" outcome="xpass">'
           b'<failure type="unexpected success"/></testcase>'
           b'<testcase classname="t.T" name="parts (i=1)" outcome="error" kind="subtest" '
           b'subtest="(i=1)"><error/></testcase>'
           b'<testcase classname="" name="setUpClass (t.U)" outcome="error" kind="fixture">'
           b'<error/></testcase><testcase classname="t.T" name="later" outcome="skipped">'
           b'<skipped/></testcase></testsuite></testsuites>')
    expected = {"t.T.ok": "passed", "t.T.bad": "failure", "t.T.known": "passed",
                "t.T.lucky": "failure", "t.T.parts (i=1)": "error",
                "setUpClass (t.U)": "error", "t.T.later": "skipped"}
    assert di.junit_statuses(old) == expected
    assert di.junit_statuses(junit_xml.format_junit(records)) == expected
    (tmp_path / (A + ".xml")).write_bytes(old)
    write_result(tmp_path, A, "failed", b"")
    junit_xml.write_junit(str(tmp_path), B, records)
    write_result(tmp_path, B, "failed", b"")
    index = di.ResultIndex(str(tmp_path))
    assert index.read_junit(A) == index.read_junit(B) == expected


def test_read_header_of_a_result_file(tmp_path):
    path = write_result(tmp_path, A, "passed", b"x" * 100_000)
    assert result_files.read_header(path)["verdict"] == "passed"
    assert result_files.read_header(str(tmp_path / "missing")) is None
    (tmp_path / "partial").write_bytes(b"verdict: passed\n")   # no blank line yet
    assert result_files.read_header(str(tmp_path / "partial")) is None
    (tmp_path / "bad").write_bytes(b"not a field\n\nout")
    assert result_files.read_header(str(tmp_path / "bad")) is None
    assert result_files.read_header(path, limit=16) is None     # header cut by the limit


def test_strip_ansi():
    assert di.strip_ansi("\x1b[31mred\x1b[0m \x1b]0;title\x07ok\x07\x00") == "red ok"
    assert di.strip_ansi("tab\tand\nnewline") == "tab\tand\nnewline"


def test_render_escapes_every_value_unless_safe():
    out = pages.render('<a title="{t}">{x}</a>', t='"><script>', x="<img src=x onerror=1>")
    assert out == ('<a title="&quot;&gt;&lt;script&gt;">'
                   '&lt;img src=x onerror=1&gt;</a>')
    assert pages.render("<p>{x}</p>", x=pages.render("<b>{y}</b>", y="<")) == "<p><b>&lt;</b></p>"
    assert pages.verdict_class('passed" onmouseover="x') == "unknown"


def test_a_commit_whose_result_landed_is_no_longer_shown_running():
    """The live state is cached for a second, results are read at once: a
    commit finished since its job started leaves the running rows; a retest
    of a commit with an older result stays."""
    done, retest, other = "a" * 40, "b" * 40, "c" * 40
    state = {"queue": [], "fetched": 110.0, "running": [
        {"commit": done, "elapsed": 10.0}, {"commit": retest, "elapsed": 10.0},
        {"commit": other, "elapsed": 10.0}, {"commit": "d" * 40, "elapsed": None}]}
    finished = {done: 101.0, retest: 50.0}
    shown = dashboard_live.without_finished(state, finished.get)
    assert [j["commit"] for j in shown["running"]] == [retest, other, "d" * 40]
    assert len(state["running"]) == 4   # the cached state is not changed
    assert dashboard_live.without_finished(None, finished.get) is None


def test_any_failure_reading_the_state_is_an_unavailable_state(monkeypatch):
    live = dashboard_live.LiveState(("127.0.0.1", 1), None)
    monkeypatch.setattr(live, "_call", lambda command, argument="": Message("ok", "", b"{}"))

    def unforeseen(data):
        raise KeyError("shape")
    monkeypatch.setattr(dashboard_live, "normalize_state", unforeseen)
    state, error = live.state()
    assert state is None and "unreadable state" in error and "KeyError" in error


# --------------------------------------------------------------------------
# The index.

def test_index_orders_pages_and_filters(tmp_path):
    base = time.time() - 1000
    for i in range(7):
        write_result(tmp_path, commit_id(i), "failed" if i % 3 == 0 else "passed",
                     branch="main" if i % 2 else "dev", mtime=base + i)
    (tmp_path / (commit_id(1) + ".xml")).write_text("<testsuite/>")
    (tmp_path / "notacommit").write_text("verdict: passed\n\n")
    (tmp_path / ("e" * 40)).write_bytes(b"no header separator")
    index = di.ResultIndex(str(tmp_path))
    items, cursor = index.query(limit=3)
    assert [i["commit"] for i in items] == [commit_id(6), commit_id(5), commit_id(4)]
    collected = items
    while cursor:
        items, cursor = index.query(limit=3, before=cursor)
        collected += items
    assert [i["commit"] for i in collected] == [commit_id(i) for i in range(6, -1, -1)]
    assert [i["commit"] for i in index.query(branch="main")[0]] == \
        [commit_id(5), commit_id(3), commit_id(1)]
    assert [i["commit"] for i in index.query(verdict="failed")[0]] == \
        [commit_id(6), commit_id(3), commit_id(0)]
    with pytest.raises(di.UnknownCursor):
        index.query(before="f" * 40)


def test_index_reads_only_new_or_changed_files(tmp_path, monkeypatch):
    for i in range(5):
        write_result(tmp_path, commit_id(i), "passed")
    index = di.ResultIndex(str(tmp_path), scan_interval=0.01)
    reads = []
    original = index._read_header
    monkeypatch.setattr(index, "_read_header", lambda name: reads.append(name) or original(name))
    index.refresh(force=True)
    assert len(reads) == 5
    index.refresh(force=True)
    assert len(reads) == 5          # nothing changed: nothing read
    write_result(tmp_path, commit_id(9), "failed")
    write_result(tmp_path, commit_id(0), "failed")   # a retest replaces a file
    index.refresh(force=True)
    assert sorted(reads[5:]) == sorted([commit_id(9), commit_id(0)])
    assert index.get(commit_id(0))["verdict"] == "failed"
    os.unlink(tmp_path / commit_id(1))
    index.refresh(force=True)
    assert index.get(commit_id(1)) is None and index.count() == 5


def test_index_new_failure_against_previous(tmp_path):
    write_result(tmp_path, A, "failed", b"FAIL: test_old (t.T.test_old)\n")
    write_result(tmp_path, B, "failed",
                 b"FAIL: test_old (t.T.test_old)\nFAIL: test_new (t.T.test_new)\n", previous=A)
    index = di.ResultIndex(str(tmp_path))
    assert index.test_report(B) == [
        {"name": "test_old (t.T.test_old)", "kind": "failure", "new": False},
        {"name": "test_new (t.T.test_new)", "kind": "failure", "new": True}]
    # JUnit data wins over the output when the dispatcher wrote it.
    (tmp_path / (A + ".xml")).write_bytes(
        b'<testsuite><testcase classname="t.T" name="x"/></testsuite>')
    (tmp_path / (B + ".xml")).write_bytes(
        b'<testsuite><testcase classname="t.T" name="x"><failure/></testcase></testsuite>')
    assert index.test_report(B) == [{"name": "t.T.x", "kind": "failure", "new": True}]


def test_index_new_failure_needs_both_lists_from_one_source(tmp_path):
    """A JUnit id never equals the output's name of the same test: when
    only one of the two commits has JUnit, no failure is called new."""
    output = b"FAIL: test_x (t.T.test_x)\n"
    junit = (b'<testsuite><testcase classname="t.T" name="test_x"><failure/></testcase>'
             b'</testsuite>')
    write_result(tmp_path, A, "failed", output)
    write_result(tmp_path, B, "failed", output, previous=A)
    (tmp_path / (B + ".xml")).write_bytes(junit)
    index = di.ResultIndex(str(tmp_path))
    assert index.test_report(B) == [{"name": "t.T.test_x", "kind": "failure", "new": False}]
    os.unlink(tmp_path / (B + ".xml"))
    (tmp_path / (A + ".xml")).write_bytes(junit)
    assert index.test_report(B) == [
        {"name": "test_x (t.T.test_x)", "kind": "failure", "new": False}]
    (tmp_path / (A + ".xml")).write_bytes(junit.replace(b"<failure/>", b""))
    (tmp_path / (B + ".xml")).write_bytes(junit)   # both JUnit: compared again
    assert index.test_report(B) == [{"name": "t.T.test_x", "kind": "failure", "new": True}]


# --------------------------------------------------------------------------
# The daemon over HTTP.



@pytest.fixture
def stand_in(threaded_servers):
    return threaded_servers(StandInDispatcher)


def test_a_result_that_lands_between_two_pages_is_not_also_running(results, stand_in):
    """The dispatcher's state is cached for a second; the page that first
    reads a new result must also leave its commit out of the running rows
    and /api/status, or it is shown done and running at once."""
    stand_in.state_reply = {"queue": [], "runners": [], "counts": {}, "running": [
        {"commit": A, "branch": "main", "runner": "r1", "elapsed": 5.0}]}
    app = dashboard_app.Dashboard(di.ResultIndex(str(results), scan_interval=0),
                                  dashboard_live.LiveState(("127.0.0.1", stand_in.port),
                                                           helpers.call))
    filters = app._filters({})
    before = app._overview_sections(filters)
    assert A[:10] in before["sec-active"] and A[:10] not in before["sec-commits"]
    write_result(results, A, "passed")
    after = app._overview_sections(filters)
    assert A[:10] not in after["sec-active"] and A[:10] in after["sec-commits"]
    assert json.loads(app.api_status({}, "").body)["running"] == []
    assert stand_in.calls == ["state"]   # the same cached state both times


def test_overview_shows_verdicts_marks_and_escapes(results, dashboards):
    commits = red_green_history(results)
    write_result(results, commit_id(77), "failed", b"<script>alert(1)</script>",
                 branch="dev<script>", subject="<img src=x onerror=alert(1)>",
                 author="<script>alert(2)</script>")
    dash = dashboards(results)
    status, headers, body = dash.get("/")
    page = body.decode()
    assert status == 200
    assert page.count("broke main") == 1 and page.count("fixed main") == 1
    for commit in commits:
        assert f'href="/commit/{commit}"' in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<script>alert" not in page and "dev&lt;script&gt;" in page
    nonce = re.search(r"script-src 'nonce-([^']+)'", headers["Content-Security-Policy"]).group(1)
    assert re.findall(r"<script[^>]*>", page) == [
        f'<script nonce="{nonce}" id="updater" data-endpoint="/api/page/overview">']
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    # The branch card: main is passing again; the badge says so.
    status, headers, svg = dash.get("/badge/main.svg")
    assert status == 200 and headers["Content-Type"] == "image/svg+xml" and b"passing" in svg
    assert b"unknown" in dash.get("/badge/nope.svg")[2]
    assert dash.get("/badge/dev%3Cscript%3E.svg")[0] == 404


def test_dispatcher_down_banner_and_results_still_served(results, dashboards):
    red_green_history(results)
    dash = dashboards(results)
    page = dash.get("/")[2].decode()
    assert "Dispatcher unavailable" in page and "Step 4: passed" in page
    status = dash.json("/api/status")
    assert status["dispatcher"]["reachable"] is False and status["results"] == 5
    assert status["branches"][0]["state"] == "passing"


def test_commit_page_lists_failing_tests_first_and_strips_ansi(results, dashboards):
    write_result(results, A, "passed", b"..\nOK\n")
    write_result(results, B, "failed", b"\x1b[31mFAIL: test_mean (t.T.test_mean)\x1b[0m\n"
                 b"<b>bold?</b>\n", previous=A)
    dash = dashboards(results)
    status, _, body = dash.get(f"/commit/{B}")
    page = body.decode()
    assert status == 200 and "\x1b" not in page
    assert page.index("Failing tests (1)") < page.index("Output")
    assert "new failure" in page and "&lt;b&gt;bold?&lt;/b&gt;" in page
    data = dash.json(f"/api/commits/{B}")
    assert data["failing_tests"] == [{"name": "test_mean (t.T.test_mean)", "kind": "failure",
                                      "new": True}]
    assert data["output"].startswith("FAIL: test_mean") and data["mark"] == "broke"
    assert dash.get(f"/commit/{B}/output.txt")[2].startswith(b"FAIL: test_mean")


def test_bad_paths_ids_methods_and_queries(results, dashboards):
    write_result(results, A, "passed")
    dash = dashboards(results)
    for path in ("/commit/../../etc/passwd", "/commit/%2e%2e%2fetc%2fpasswd", "/commit/xyz",
                 "/commit/" + A[:12], "/commit/" + A.upper(), "/commit/" + B, "/etc/passwd",
                 "/api/commits/" + "g" * 40, "/commit/" + A + "/../../x", "/badge/a/b.svg"):
        assert dash.get(path)[0] == 404, path
    for query in ("limit=abc", "limit=0", "limit=100000", "verdict=bogus",
                  "before=../x", "branch=%3Cscript%3E", "before=" + B):
        status, headers, body = dash.get("/api/commits?" + query)
        assert status == 400 and "error" in json.loads(body), query
    # A cursor with no result is a wrong link, not an empty last page.
    status, headers, body = dash.get("/?before=" + B)
    assert status == 400 and b"start from the newest" in body
    # The API refuses in JSON, as it answers.
    status, headers, body = dash.get("/api/commits/" + "g" * 40)
    assert headers["Content-Type"] == "application/json" and json.loads(body)["error"]
    assert dash.get("/", method="POST")[0] == 405
    assert dash.get("/" + "a" * 5000)[0] == 414
    reply = send_raw(dash.port, b"GET / HTTP/1.0\r\nHost: evil.example\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 421")
    assert dash.daemon.alive()


def test_api_commits_filters_and_cursor(results, dashboards):
    red_green_history(results)
    dash = dashboards(results)
    first = dash.json("/api/commits?limit=2")
    assert [c["subject"] for c in first["commits"]] == ["Step 4: passed", "Step 3: passed"]
    assert first["commits"][1]["mark"] == "fixed" and first["next"] == \
        first["commits"][1]["commit"]
    second = dash.json(f"/api/commits?limit=2&before={first['next']}")
    assert [c["subject"] for c in second["commits"]] == ["Step 2: failed", "Step 1: failed"]
    failed = dash.json("/api/commits?verdict=failed&branch=main")
    assert [c["mark"] for c in failed["commits"]] == [None, "broke"] and failed["next"] is None


def test_overview_pages_link_both_ways_and_keep_their_filters(results, dashboards):
    commits = red_green_history(results)
    dash = dashboards(results)
    newest = dash.get("/?limit=2&branch=main")[2].decode()
    older = f'href="/?before={commits[3]}&amp;branch=main&amp;limit=2"'
    assert older in newest and "Newest results" not in newest
    # The live updates keep the page's size, not the default 50.
    assert 'data-endpoint="/api/page/overview?branch=main&amp;limit=2"' in newest
    status, _, body = dash.get(f"/?before={commits[3]}&branch=main&limit=2")
    page = body.decode()
    assert status == 200 and "Step 2: failed" in page and "Step 4: passed" not in page
    assert '<a href="/?branch=main&amp;limit=2">&larr; Newest results</a>' in page
    assert f'href="/?before={commits[1]}&amp;branch=main&amp;limit=2"' in page
    # The last page links back only; a default-sized page keeps no limit.
    last = dash.get(f"/?before={commits[1]}")[2].decode()
    assert '<a href="/">&larr; Newest results</a>' in last and "Older results" not in last
    # A real cursor may still find nothing older that matches: said so,
    # with the way back.
    empty = dash.get(f"/?before={commits[1]}&branch=dev")[2].decode()
    assert "No older results." in empty and '<a href="/?branch=dev">&larr; Newest' in empty


def test_new_result_file_appears_within_a_second(results, dashboards):
    red_green_history(results)
    dash = dashboards(results)
    assert len(dash.json("/api/commits")["commits"]) == 5
    write_result(results, C, "failed")
    wait_until(lambda: any(c["commit"] == C for c in dash.json("/api/commits")["commits"]),
               2, what="new result in the API")


def test_live_state_from_stand_in_dispatcher(results, dashboards, stand_in):
    red_green_history(results)
    stand_in.state_reply = {
        "queue": [{"commit": C, "branch": "main", "position": 1}],
        "running": [{"commit": D, "branch": "main", "runner": "runner-7", "elapsed": 3.2,
                     "shard": "2/3"}],
        "runners": [{"name": "runner-7", "address": "127.0.0.1:8901", "state": "running",
                     "commit": D},
                    {"name": "127.0.0.1:8902", "address": "127.0.0.1:8902", "state": "occupied",
                     "commit": B}],
        "counts": {"queued": 1, "running": 1}}
    stand_in.logs[D] = b"\x1b[32mtest_one ... ok\x1b[0m\n<script>x()</script>\n"
    dash = dashboards(results, f"127.0.0.1:{stand_in.port}")
    pages_ = [dash.get("/")[2].decode() for _ in range(3)]
    assert stand_in.count("state") == 1      # three loads within a second: one call
    page = pages_[0]
    assert "Dispatcher unavailable" not in page
    assert "position 1" in page and "3.2 s elapsed" in page and "runner-7 (shard 2/3)" in page
    # A runner busy with work from before a restart is busy, not a warning.
    assert '<span class="rstate r-occupied">occupied</span>' in page
    status = dash.json("/api/status")
    assert status["dispatcher"]["reachable"] and status["running"][0]["commit"] == D
    running = dash.get(f"/commit/{D}")[2].decode()
    assert "Live output" in running and "test_one ... ok" in running
    assert "&lt;script&gt;x()&lt;/script&gt;" in running and "\x1b" not in running
    assert stand_in.count("log:" + D) == 1
    fragments = dash.json(f"/api/page/commit/{D}")
    assert fragments["final"] is False and "test_one" in fragments["sections"]["sec-output"]
    assert dash.json(f"/api/commits/{D}")["live_output"].startswith("test_one ... ok")
    queued = dash.get(f"/commit/{C}")
    assert queued[0] == 200 and b"queued, position 1" in queued[2]
    # Only a commit the state shows running has its output asked for.
    assert dash.get(f"/commit/{A}")[0] == 404
    assert dash.json(f"/api/page/commit/{C}")["status"] == "queued"
    assert stand_in.count("log:" + C) == 0 and stand_in.count("log:" + A) == 0
    # The running commit finishes: its page's twin turns final with the result.
    write_result(results, D, "passed", b"all good\n")
    wait_until(lambda: dash.json(f"/api/page/commit/{D}")["final"], 3, what="final page")


def test_hanging_dispatcher_slows_no_page(results, dashboards):
    """A dispatcher that accepts but never answers: the request that asks
    it waits for the call's timeout, every other page is served at once."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)   # never accepted, never answered
    try:
        red_green_history(results)
        dash = dashboards(results, f"127.0.0.1:{silent.getsockname()[1]}")
        asker = threading.Thread(target=dash.get, args=("/",))
        asker.start()
        try:
            # The dashboard has connected: its call is in flight.
            assert select.select([silent], [], [], 10)[0]
            for _ in range(5):
                started = time.monotonic()
                status, _, body = dash.get("/api/commits")
                assert status == 200 and time.monotonic() - started < 1.0
                started = time.monotonic()
                assert b"Step 4" in dash.get("/")[2]
                assert time.monotonic() - started < 1.0
        finally:
            asker.join(10)
        wait_until(lambda: "bad reply" in dash.json("/api/status")["dispatcher"]["error"]
                   or "timed out" in dash.json("/api/status")["dispatcher"]["error"], 10,
                   what="the hanging dispatcher reported")
    finally:
        silent.close()


def test_old_dispatcher_without_state_command(results, dashboards, threaded_servers):
    from support.cluster import ThreadedServer
    old = threaded_servers(ThreadedServer, {"status": lambda m, p: None})
    red_green_history(results)
    dash = dashboards(results, f"127.0.0.1:{old.port}")
    page = dash.get("/")[2].decode()
    assert "does not know the &#x27;state&#x27; command" in page and "Step 4" in page


def test_token_required_and_cookie_login(results, dashboards, tmp_path):
    token = "t0ken-" + "x" * 30
    (tmp_path / "token").write_text(token + "\n")
    red_green_history(results)
    dash = dashboards(results, None, "--token-file", str(tmp_path / "token"))
    for path in ("/", "/api/status", "/api/commits", "/badge/main.svg"):
        assert dash.get(path)[0] == 401, path
    assert dash.get("/", {"Authorization": "Bearer wrong"})[0] == 401
    assert dash.get("/", {"Authorization": f"Bearer {token}"})[0] == 200
    assert dash.get("/login?token=wrong")[0] == 401
    status, headers, _ = dash.get(f"/login?token={token}")
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"].split(";")[0]
    assert token not in cookie and "HttpOnly" in headers["Set-Cookie"]
    assert dash.get("/api/commits", {"Cookie": cookie})[0] == 200
    assert dash.get("/api/commits", {"Cookie": cookie[:-1] + "0"})[0] == 401
    # Neither in an absolute-form request line nor in a garbled one (the
    # server's own "bad request syntax" line quotes it): logged before.
    for line in (f"GET http://127.0.0.1:{dash.port}/login?token={token} HTTP/1.1",
                 f"GET /login?token={token} garbled HTTP/1.1"):
        with socket.create_connection(("127.0.0.1", dash.port), timeout=10) as conn:
            conn.sendall(line.encode() + b"\r\nHost: x\r\n\r\n")
            assert conn.recv(100).startswith(b"HTTP/1.")
    wait_until(lambda: dash.daemon.log().count("token=<redacted>") >= 3, 10,
               what="the requests logged")
    assert token not in dash.daemon.log()


@pytest.mark.parametrize("extra, refused", [
    ([], True), (["--insecure"], False)])
def test_non_loopback_needs_token_or_insecure(results, tmp_path, extra, refused):
    args = [PY, os.path.join(ROOT, "dashboard.py"), "--host", "0.0.0.0", "--port", "0",
            "--results-dir", str(results), *extra]
    if refused:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=20)
        assert proc.returncode == 2 and "--token-file" in proc.stderr
        return
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = wait_until(lambda: proc.stderr.readline(), 10, what="serving line")
        assert "dashboard serving http://0.0.0.0:" in line
    finally:
        proc.kill()
        proc.wait()


def test_slow_clients_cut_off_and_flood_survived(results, dashboards):
    red_green_history(results)
    dash = dashboards(results, None, "--request-timeout", "1", "--max-connections", "64")
    # A client that dribbles its request head is cut off at the deadline.
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", dash.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n")
        closed = False
        for _ in range(20):
            try:
                sock.sendall(b"X-a: b\r\n")
                # The client's pace: one header line per 0.3 s, unless the
                # server closes first.
                if select.select([sock], [], [], 0.3)[0] and sock.recv(1) == b"":
                    closed = True
                    break
            except OSError:
                closed = True
                break
        assert closed and time.monotonic() - started < 3.5
    assert "cutting off a client" in dash.daemon.log()
    # A flood of idle connections: beyond the cap they are refused at once,
    # and once the idle ones are cut off, pages are served again.
    flood = []
    try:
        for _ in range(150):
            flood.append(socket.create_connection(("127.0.0.1", dash.port), timeout=5))
        def served():
            try:
                return dash.get("/api/commits")[0] == 200
            except OSError:
                return False
        wait_until(served, 5, what="a page during the flood")
    finally:
        for sock in flood:
            sock.close()
    assert dash.daemon.alive()
    assert json.loads(dash.get("/api/commits")[2])["commits"]


class SlowFlood:
    """One client address (127.0.0.1) holding ``count`` half-sent requests,
    re-opening each after ``every`` seconds (before the dashboard's
    request timeout cuts it off), in a thread of its own."""

    def __init__(self, port: int, count: int, every: float, limit: float = 30.0):
        self.port, self.count, self.every, self.limit = port, count, every, limit
        self.refused = 0  # connections answered 503 at once
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> tuple[socket.socket, float] | None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2,
                                            source_address=("127.0.0.1", 0))
            sock.sendall(b"GET / HTTP/1.0\r\nX-Slow: ")
        except OSError:
            return None
        return sock, time.monotonic()

    def _run(self) -> None:
        held: list = [None] * self.count
        deadline = time.monotonic() + self.limit
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                for i, entry in enumerate(held):
                    if entry is not None and (time.monotonic() - entry[1] > self.every or
                                              select.select([entry[0]], [], [], 0)[0]):
                        entry[0].setblocking(False)
                        try:
                            self.refused += entry[0].recv(64).startswith(b"HTTP/1.0 503")
                        except OSError:
                            pass
                        entry[0].close()
                        held[i] = entry = None
                    if entry is None:
                        held[i] = self._open()
                self.stop.wait(0.02)
        finally:
            for entry in held:
                if entry is not None:
                    entry[0].close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(self.limit)


def status_from(port: int, source: str, token: str) -> int:
    """The HTTP status a client at loopback address ``source`` gets for
    /api/commits (0 if the connection failed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5,
                                      source_address=(source, 0)) as sock:
            sock.sendall(b"GET /api/commits HTTP/1.0\r\nAuthorization: Bearer %s\r\n\r\n"
                         % token.encode())
            head = sock.recv(64)
    except OSError:
        return 0
    return int(head.split(b" ")[1]) if head.startswith(b"HTTP/") else 0


def test_a_slow_flood_from_one_address_shuts_out_no_other(results, dashboards, tmp_path):
    """Issue 17: one address holding every slot with half-sent requests
    (re-opened before the request timeout) kept a client with the token
    at 503; one address now gets at most --max-per-client (by default
    half of --max-connections) and the rest stay free for others."""
    token = "t0ken-" + "y" * 30
    (tmp_path / "token").write_text(token + "\n")
    red_green_history(results)
    dash = dashboards(results, None, "--token-file", str(tmp_path / "token"),
                      "--max-connections", "20", "--request-timeout", "3")
    assert status_from(dash.port, "127.0.0.2", token) == 200
    with SlowFlood(dash.port, count=20, every=1.0) as flood:
        wait_until(lambda: flood.refused > 0 or "per-client limit" in dash.daemon.log(), 10,
                   what="the flood to fill the slots")
        statuses = []
        for _ in range(6):
            statuses.append(status_from(dash.port, "127.0.0.2", token))
            time.sleep(0.3)  # the token holder's pace: a page poll or so
        assert statuses == [200] * 6, statuses
        assert flood.thread.is_alive()
    assert flood.refused > 0
    assert "per-client limit (10) reached for 127.0.0.1" in dash.daemon.log()
    # Once the flood has ended, its address is served again.
    wait_until(lambda: status_from(dash.port, "127.0.0.1", token) == 200, 5,
               what="the flooding address served once it stopped")


def test_a_pruned_commit_with_a_result_file_again_is_not_counted_as_pruned(tmp_path):
    """A retest of a pruned commit (or a pass a retest stopped after its
    tombstones) leaves a result file beside a tombstone: the file is the
    truth, so the branch card and /api/status count only what is gone."""
    from ci.dashboard.pruned import PrunedIndex
    from ci.retention.tombstones import Tombstone, TombstoneFile
    results = tmp_path / "results"
    results.mkdir()
    stones = TombstoneFile(str(tmp_path / "pruned-results"))
    stones.append([Tombstone(c, "passed", 1000.0 + n, 2000.0, None, "main")
                   for n, c in enumerate((A, B))])
    write_result(results, B, "failed", previous=A, mtime=3000.0)   # B retested
    write_result(results, C, "passed", previous=B, mtime=3001.0)
    index = di.ResultIndex(str(results), scan_interval=0,
                           pruned=PrunedIndex(stones.path))
    [main] = index.branches()
    assert (main["pruned"], main["oldest_kept"], index.pruned_count()) == (1, B, 1)
    os.unlink(results / B)                                         # B pruned again
    index.refresh(force=True)
    assert index.branches()[0]["pruned"] == 2 and index.pruned_count() == 2
