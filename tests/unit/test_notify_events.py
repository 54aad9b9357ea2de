"""An event's text, webhook payload and command environment
(ci/notify/events.py, pure)."""

from __future__ import annotations

import json

from support.notify import cid

from ci import junit_xml
from ci.notify.decider import Decision, Result
from ci.notify.events import build_event, command_environment, webhook_body


def test_event_text_and_payload():
    result = Result(cid(1), "main", cid(0), "failed",
                    {"subject": "Break\nit", "author": "Ann <a@x>", "tests": "10",
                     "failures": "3", "errors": "0"})
    broken = Decision(result, "broken", "passed", 1, False, True)
    event = build_event(broken, "/r", "http://ci/c/{commit}", ["command"])
    assert event["text"].startswith(f'main is broken by {cid(1)[:12]} ("Break it", Ann <a@x>)')
    assert "3 failures, 0 errors of 10 tests" in event["text"]
    assert event["url"] == f"http://ci/c/{cid(1)}"
    payload = json.loads(webhook_body(event))
    assert payload["id"] == broken.event_id and payload["tests"] == 10
    env = command_environment(event, {"PATH": "/bin", "CI_SECRET": "s",
                                      "CI_EVENT": "forged", "API_TOKEN": "t"})
    assert env["CI_EVENT"] == "broken" and env["CI_SUBJECT"] == "Break it"
    assert "CI_SECRET" not in env and "API_TOKEN" not in env and env["PATH"] == "/bin"


def test_a_matrix_commits_event_names_the_cells_that_broke_or_were_fixed(tmp_path):
    (tmp_path / cid(0)).write_bytes(b"verdict: failed\ncells: py3.9=passed py3.12=failed\n\n")
    result = Result(cid(1), "main", cid(0), "failed",
                    {"tests": "6", "failures": "1", "errors": "0",
                     "cells": "py3.9=failed py3.12=passed py3.13=passed"})
    event = build_event(Decision(result, "still-failing", "failed", 1, False, True),
                        str(tmp_path), None, ["command"])
    assert (event["broken_cells"], event["fixed_cells"]) == (["py3.9"], ["py3.12"])
    assert event["text"].endswith("(cells broken: py3.9) (cells fixed: py3.12)")
    assert json.loads(webhook_body(event))["broken_cells"] == ["py3.9"]
    env = command_environment(event, {})
    assert (env["CI_BROKEN_CELLS"], env["CI_FIXED_CELLS"]) == ("py3.9", "py3.12")
    # The previous commit had no matrix: its verdict stands for every cell.
    (tmp_path / cid(5)).write_bytes(b"verdict: failed\n\n")
    after_plain = build_event(Decision(Result(cid(6), "main", cid(5), "failed",
                                              {"cells": "py3.9=failed py3.12=passed"}),
                                       "still-failing", "failed", 1, False, True),
                              str(tmp_path), None, [])
    assert (after_plain["broken_cells"], after_plain["fixed_cells"]) == ([], ["py3.12"])
    plain = build_event(Decision(Result(cid(2), "main", cid(1), "passed", {"tests": "1"}),
                                 "passed", None, 1, False, True), str(tmp_path), None, [])
    assert "broken_cells" not in plain and "cells" not in json.loads(webhook_body(plain))


def test_a_broken_commit_names_its_failing_tests_and_which_are_new(tmp_path):
    from ci.results import TestRecord

    def write(commit, records):
        junit_xml.write_junit(str(tmp_path), commit, records)

    write(cid(0), [TestRecord("m.T", "test_old", "failed"), TestRecord("m.T", "test_a")])
    write(cid(1), [TestRecord("m.T", "test_old", "failed"),
                   TestRecord("m.T", "test_a", "error"),
                   TestRecord("m.T", "test_flaky", "flaky"),
                   TestRecord("m.T", "test_q", "failed", quarantined=True)])
    result = Result(cid(1), "main", cid(0), "failed", {"tests": "4", "failures": "1",
                                                       "errors": "1"})
    event = build_event(Decision(result, "still-failing", "failed", 1, False, True),
                        str(tmp_path), None, ["command"])
    assert event["failing_tests"] == [{"id": "m.T.test_old", "new": False},
                                      {"id": "m.T.test_a", "new": True}]
    assert event["failing_count"] == 2
    assert event["text"].endswith("failing: m.T.test_old, m.T.test_a (new)")
    assert json.loads(webhook_body(event))["failing_tests"][1]["new"] is True
    env = command_environment(event, {})
    assert env["CI_FAILING_TESTS"] == "m.T.test_old\nm.T.test_a"
    assert env["CI_NEW_FAILING_TESTS"] == "m.T.test_a"
    # Without the previous commit's records nothing is called new.
    event = build_event(Decision(Result(cid(1), "main", cid(5), "failed", {}), "failed",
                                 None, 1, False, True), str(tmp_path), None, [])
    assert [item["new"] for item in event["failing_tests"]] == [None, None]
    assert "(new)" not in event["text"]
    # A passing commit (its only failures flaky or quarantined) names none.
    passed = build_event(Decision(Result(cid(1), "main", cid(0), "passed", {}), "fixed",
                                  "failed", 2, False, True), str(tmp_path), None, [])
    assert "failing_tests" not in passed and "failing" not in passed["text"]


def test_a_broken_matrix_commit_names_its_cells_failing_tests(tmp_path):
    """A matrix commit has no JUnit file of its own: its failing tests are
    its cells' (from each cell's file), each named once, new when no cell
    of the previous commit failed it."""
    from ci.results import TestRecord

    def write(commit, cells):
        verdicts = {c: "failed" if any(r.outcome in ("failed", "error") and not r.quarantined
                                       for r in records) else "passed"
                    for c, records in cells.items()}
        (tmp_path / commit).write_bytes(
            ("verdict: failed\ncells: " + " ".join(f"{c}={v}" for c, v in verdicts.items())
             + "\n\n").encode())
        for cell, records in cells.items():
            junit_xml.write_junit(str(tmp_path), commit, records, cell=cell)

    write(cid(0), {"py3.9": [TestRecord("m.T", "test_old", "failed")],
                   "py3.12": [TestRecord("m.T", "test_a")]})
    write(cid(1), {"py3.9": [TestRecord("m.T", "test_old", "failed"),
                             TestRecord("m.T", "test_a", "error")],
                   "py3.12": [TestRecord("m.T", "test_a", "failed"),
                              TestRecord("m.T", "test_q", "failed", quarantined=True),
                              TestRecord("m.T", "test_flaky", "flaky")]})
    result = Result(cid(1), "main", cid(0), "failed",
                    {"tests": "5", "failures": "2", "errors": "1",
                     "cells": "py3.9=failed py3.12=failed"})
    event = build_event(Decision(result, "still-failing", "failed", 1, False, True),
                        str(tmp_path), None, ["command"])
    assert event["failing_tests"] == [{"id": "m.T.test_old", "new": False},
                                      {"id": "m.T.test_a", "new": True}]
    assert event["failing_count"] == 2
    assert "failing: m.T.test_old, m.T.test_a (new)" in event["text"]
    assert event["broken_cells"] == ["py3.12"]
