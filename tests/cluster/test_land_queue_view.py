"""The land queue's dispatcher side through a real dispatcher process
(issue 22): the observer's snapshot (``queue-state``) checked, stored,
served (``queue``) and kept across restarts; its events (``queue-event``)
notified exactly once each, even when told twice and across a SIGKILL.
The pure parts are tested in tests/unit/test_queue_snapshot.py."""

from __future__ import annotations

import json
import os

from support.cluster import PY, wait_until
from support.notify import recorded

import helpers
from ci.wire import encode_fields, parse_address

A, B, C = "a" * 40, "b" * 40, "c" * 40


def ask(cluster, command, body=b""):
    return helpers.call(parse_address(cluster.dispatcher_address), command, "", body,
                        timeout=5)


def snapshot(reason="2 failures: t.T.test_a") -> dict:
    entry = {"id": 7, "branch": "feature/a", "target": "main", "head": A, "state": "testing",
             "tested": B, "base": C, "position": 1, "reason": "", "asked": 1_700_000_000,
             "by": "ann", "updated": 1_700_000_005}
    return {"updated": 1_700_000_010, "targets": {"main": {"head": C, "depth": 3}},
            "entries": [entry],
            "recent": [dict(entry, id=3, branch="feature/x", state="rejected", position=None,
                            reason=reason)]}


def queue(cluster) -> dict:
    reply = ask(cluster, "queue")
    assert reply.command == "ok", reply
    return json.loads(reply.body)


def test_snapshot_is_checked_stored_served_and_kept_across_restarts(cluster):
    dispatcher = cluster.start_dispatcher()
    assert queue(cluster) == {"updated": None, "targets": {}, "entries": [], "recent": []}
    good = snapshot()
    reply = ask(cluster, "queue-state", json.dumps(good).encode())
    assert (reply.command, reply.argument) == ("ok", "stored")
    assert queue(cluster) == good
    # Bad input: an error that says why, and nothing changes.
    for bad in (b"{", json.dumps(dict(good, entries=[dict(good["entries"][0],
                                                          state="merged")])).encode(),
                json.dumps(dict(good, targets={"main": {"head": "HEAD", "depth": 3}})).encode()):
        reply = ask(cluster, "queue-state", bad)
        assert reply.command == "error" and "bad queue snapshot" in reply.argument, reply
    assert queue(cluster) == good
    assert json.loads(open(os.path.join(cluster.state, "queue.json"), "rb").read()) == good
    # Kept across a clean stop and a SIGKILL.
    assert dispatcher.stop() == 0
    dispatcher = cluster.start_dispatcher()
    assert queue(cluster) == good
    newer = snapshot(reason="conflict: calc.py")
    assert ask(cluster, "queue-state", json.dumps(newer).encode()).command == "ok"
    dispatcher.kill()
    cluster.start_dispatcher()
    assert queue(cluster) == newer


GATED_RECORDER = """import json, os, sys
if not os.path.exists(sys.argv[2]):
    sys.exit(1)     # the receiver is down: the dispatcher retries
record = {k: v for k, v in os.environ.items() if k.startswith("CI_")}
record["stdin"] = sys.stdin.read()
with open(sys.argv[1], "a") as handle:
    handle.write(json.dumps(record) + "\\n")
"""


def event(event="rejected", entry=7, **changes) -> bytes:
    fields = {"event": event, "id": entry, "branch": "feature/a", "target": "main",
              "head": A, "tested": B, "author": "ann@example.invalid",
              "reason": "2 failures: t.T.test_a, t.T.test_b"}
    fields.update(changes)
    return encode_fields(fields)


def test_a_queue_event_is_notified_once_when_told_twice_and_across_a_kill(cluster, tmp_path):
    script, out, gate = tmp_path / "record.py", str(tmp_path / "recorded.jsonl"), \
        str(tmp_path / "receiver-up")
    script.write_text(GATED_RECORDER)
    flags = ["--notify-command", f"{PY} {script} {out} {gate}", "--notify-retry-max", "0.2",
             "--notify-on", "change,landed"]
    dispatcher = cluster.start_dispatcher(*flags)
    reply = ask(cluster, "queue-event", event())
    assert (reply.command, reply.argument) == ("ok", "taken"), reply
    assert ask(cluster, "queue-event", event()).argument == "duplicate"
    # Taken means on disk: killed before any delivery, it is still sent.
    wait_until(lambda: "failed (try 1)" in dispatcher.log(), 20, what="a failed delivery")
    dispatcher.kill()
    open(gate, "w").close()
    restarted = cluster.start_dispatcher(*flags)
    # The observer did not hear the ok (say) and tells it again after the restart.
    reply = ask(cluster, "queue-event", event())
    assert (reply.command, reply.argument) == ("ok", "duplicate"), reply
    wait_until(lambda: len(recorded(out)) >= 1, 20, what="the rejected notification")
    # A later event: delivered after the first, so a repeat would show before it.
    assert ask(cluster, "queue-event", event("landed", 8, branch="feature/b",
                                             reason="")).argument == "taken"
    wait_until(lambda: len(recorded(out)) >= 2, 20, what="the landed notification")
    rejected, landed = recorded(out)
    assert rejected["CI_TEXT"] == \
        "feature/a was rejected from main: 2 failures: t.T.test_a, t.T.test_b"
    assert (rejected["CI_EVENT"], rejected["CI_AUTHOR"], rejected["CI_TARGET"],
            rejected["CI_HEAD"], rejected["CI_TESTED"], rejected["CI_QUEUE_ID"]) == \
        ("rejected", "ann@example.invalid", "main", A, B, "7")
    assert landed["CI_TEXT"] == f"feature/b landed on main as {B}"
    assert "1 undelivered event(s) to retry" in restarted.log()
    assert len(recorded(out)) == 2


def test_bad_queue_events_are_refused_and_landed_is_off_by_default(cluster, tmp_path):
    script, out, gate = tmp_path / "record.py", str(tmp_path / "recorded.jsonl"), \
        str(tmp_path / "receiver-up")
    script.write_text(GATED_RECORDER)
    open(gate, "w").close()
    cluster.start_dispatcher("--notify-command", f"{PY} {script} {out} {gate}")
    for bad in (event("merged"), event(head="HEAD"), event(entry="seven"), b"\xff\xfe",
                event("landed", tested="")):
        reply = ask(cluster, "queue-event", bad)
        assert reply.command == "error" and "bad queue event" in reply.argument, reply
    assert ask(cluster, "queue-event", event("landed")).argument == "not announced"
    assert ask(cluster, "queue-event", event("rejected", 9)).argument == "taken"
    wait_until(lambda: len(recorded(out)) >= 1, 20, what="the rejected notification")
    assert [r["CI_EVENT"] for r in recorded(out)] == ["rejected"]


def test_without_notification_targets_an_event_is_still_acknowledged(cluster):
    cluster.start_dispatcher()
    reply = ask(cluster, "queue-event", event())
    assert (reply.command, reply.argument) == ("ok", "no notifier")
