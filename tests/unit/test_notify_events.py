"""An event's text, webhook payload and command environment
(ci/notify/events.py, pure)."""

from __future__ import annotations

import json

from support.notify import cid

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
    plain = build_event(Decision(Result(cid(2), "main", cid(1), "passed", {"tests": "1"}),
                                 "passed", None, 1, False, True), str(tmp_path), None, [])
    assert "broken_cells" not in plain and "cells" not in json.loads(webhook_body(plain))
