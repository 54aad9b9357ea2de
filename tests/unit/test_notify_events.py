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
