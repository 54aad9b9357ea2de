"""The dispatcher's side of the land queue (issue 22), pure parts: the
snapshot check (ci/queue_snapshot.py), the ``queue-event`` body and its
notification (ci/notify/queue_events.py), ``--notify-on`` with the new
kinds, the journal's dedup record (ci/notify/store.py) and the file the
dispatcher keeps the snapshot in (ci/dispatch/landqueue.py)."""

from __future__ import annotations

import copy
import json
import os

import pytest

from ci import queue_snapshot
from ci.dispatch.landqueue import LandQueueView
from ci.notify.decider import NOTIFY_ON, parse_notify_on
from ci.notify.events import command_environment, webhook_body
from ci.notify.queue_events import (QueueEventError, build_queue_event, parse_queue_event)
from ci.notify.store import EventStore
from ci.queue_snapshot import SnapshotError, check_snapshot, parse_snapshot

A, B, C, D = ("a" * 40, "b" * 40, "c" * 40, "d" * 64)


def entry(**changes) -> dict:
    item = {"id": 7, "branch": "feature/a", "target": "main", "head": A, "state": "testing",
            "tested": B, "base": C, "position": 1, "reason": "", "asked": 1_700_000_000.5,
            "by": "ann", "updated": 1_700_000_010}
    item.update(changes)
    return item


def snapshot(**changes) -> dict:
    item = {"updated": 1_700_000_020, "targets": {"main": {"head": C, "depth": 4}},
            "entries": [entry(), entry(id=8, branch="feature/b", state="waiting",
                                       tested=None, base=None, position=2)],
            "recent": [entry(id=3, state="rejected", position=None,
                             reason="2 failures: t.T.test_a, t.T.test_b")]}
    item.update(changes)
    return item


def test_a_good_snapshot_is_kept_as_sent():
    good = snapshot()
    assert check_snapshot(copy.deepcopy(good)) == good
    assert parse_snapshot(json.dumps(good).encode()) == good
    # Unicode in a branch or a reason is fine (escaped where shown).
    odd = snapshot(entries=[entry(branch="fé/ü", reason="ça casse <b>")])
    assert check_snapshot(odd)["entries"][0]["branch"] == "fé/ü"


def test_unknown_keys_are_dropped_not_kept():
    sent = snapshot(extra={"x": 1})
    sent["entries"][0]["later"] = "x" * 10_000
    sent["targets"]["main"]["later"] = 1
    checked = check_snapshot(sent)
    assert "extra" not in checked and "later" not in checked["entries"][0]
    assert checked["targets"]["main"] == {"head": C, "depth": 4}


def bad_snapshots():
    yield "not an object", []
    yield "missing entries", {k: v for k, v in snapshot().items() if k != "entries"}
    yield "updated a string", snapshot(updated="now")
    yield "updated a bool", snapshot(updated=True)
    yield "updated negative", snapshot(updated=-1)
    yield "targets a list", snapshot(targets=[])
    yield "target head short", snapshot(targets={"main": {"head": "abc123", "depth": 1}})
    yield "target depth float", snapshot(targets={"main": {"head": C, "depth": 1.5}})
    yield "target name with space", snapshot(targets={"ma in": {"head": C, "depth": 1}})
    yield "entries not a list", snapshot(entries={})
    yield "entry not an object", snapshot(entries=["x"])
    yield "entry missing a key", snapshot(entries=[{k: v for k, v in entry().items()
                                                    if k != "by"}])
    yield "unknown state", snapshot(entries=[entry(state="merged")])
    yield "id a string", snapshot(entries=[entry(id="7")])
    yield "id negative", snapshot(entries=[entry(id=-1)])
    yield "id a bool", snapshot(entries=[entry(id=True)])
    yield "duplicate ids", snapshot(entries=[entry(), entry(branch="feature/b")])
    yield "head upper case", snapshot(entries=[entry(head=A.upper())])
    yield "tested not a commit", snapshot(entries=[entry(tested="HEAD")])
    yield "base a number", snapshot(entries=[entry(base=5)])
    yield "branch with newline", snapshot(entries=[entry(branch="a\nb")])
    yield "branch empty", snapshot(entries=[entry(branch="")])
    yield "branch too long", snapshot(entries=[entry(branch="x" * 256)])
    yield "reason with a newline", snapshot(entries=[entry(reason="a\nb")])
    yield "reason with escape", snapshot(entries=[entry(reason="\x1b[31mred")])
    yield "reason too long", snapshot(entries=[entry(reason="x" * 1001)])
    yield "by not text", snapshot(entries=[entry(by=["ann"])])
    yield "asked infinite", snapshot(entries=[entry(asked=float("inf"))])
    yield "position a string", snapshot(entries=[entry(position="1")])
    yield "live state in recent", snapshot(recent=[entry(state="testing")])
    yield "too many recent", snapshot(recent=[entry(id=n, state="landed")
                                              for n in range(51)])


@pytest.mark.parametrize("why, value", list(bad_snapshots()), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_each_kind_of_bad_snapshot_is_refused(why, value):
    with pytest.raises(SnapshotError):
        check_snapshot(value)


@pytest.mark.parametrize("data", [b"", b"{", b"\xff\xfe", b"NaN", b'"x"',
                                  json.dumps(snapshot(updated=1e400)).encode(),
                                  b'{"updated": NaN, "targets": {}, "entries": [], "recent": []}',
                                  b" " * (queue_snapshot.MAX_BYTES + 1),
                                  b"[" * 100000])     # json's RecursionError
def test_bad_bytes_are_refused(data):
    with pytest.raises(SnapshotError):
        parse_snapshot(data)


def test_the_view_keeps_the_last_good_snapshot_on_disk(tmp_path):
    path = str(tmp_path / "queue.json")
    view = LandQueueView(path)
    view.load()
    assert json.loads(view.json()) == queue_snapshot.empty()
    view.replace(json.dumps(snapshot()).encode())
    with pytest.raises(SnapshotError):
        view.replace(b'{"updated": 1}')
    assert json.loads(view.json()) == snapshot()
    again = LandQueueView(path)
    again.load()
    assert again.snapshot() == snapshot()
    # A damaged file is ignored (and left for the operator to look at).
    with open(path, "w") as handle:
        handle.write('{"updated": ')
    broken = LandQueueView(path)
    broken.load()
    assert broken.snapshot() == queue_snapshot.empty() and os.path.exists(path)


# ---- queue events ----------------------------------------------------------

def event_body(**changes) -> bytes:
    fields = {"event": "rejected", "id": "7", "branch": "feature/a", "target": "main",
              "head": A, "tested": B, "author": "ann@example.invalid",
              "reason": "2 failures: t.T.test_a, t.T.test_b"}
    fields.update(changes)
    # By hand, not encode_fields: that would cap and flatten the bad values.
    return "".join(f"{k}: {v}\n" for k, v in fields.items() if v is not None).encode()


def test_a_rejected_event_says_why_and_goes_to_its_author():
    event = parse_queue_event(event_body(later="ignored"))
    record = build_queue_event(event, "http://ci.example/commit/{commit}", ["command"], now=5.0)
    assert record["text"] == ("feature/a was rejected from main: 2 failures: t.T.test_a, "
                              f"t.T.test_b http://ci.example/commit/{B}")
    assert (record["event"], record["author"], record["commit"], record["queue_id"]) == \
        ("rejected", "ann@example.invalid", B, 7)
    body = json.loads(webhook_body(record))
    assert (body["target"], body["head"], body["tested"]) == ("main", A, B)
    env = command_environment(record, {})
    assert (env["CI_EVENT"], env["CI_AUTHOR"], env["CI_TARGET"], env["CI_QUEUE_ID"]) == \
        ("rejected", "ann@example.invalid", "main", "7")
    # The same entry and event: the same id, whenever it is made.
    assert build_queue_event(parse_queue_event(event_body()), None, [], now=9.0)["id"] == \
        record["id"]
    assert build_queue_event(parse_queue_event(event_body(event="landed")), None, [])["id"] \
        != record["id"]


def test_a_landed_event_names_the_commit_the_target_is_now():
    record = build_queue_event(parse_queue_event(event_body(event="landed", reason="")),
                               None, [])
    assert record["text"] == f"feature/a landed on main as {B}"
    assert record["commit"] == B and record["url"] == ""


@pytest.mark.parametrize("changes", [
    {"event": "merged"}, {"event": None}, {"id": "x"}, {"id": "-1"}, {"id": "9" * 17},
    {"id": "٣"}, {"branch": ""}, {"branch": "a b"}, {"target": None}, {"head": "abc"},
    {"tested": "HEAD"}, {"event": "landed", "tested": ""}, {"author": "Ann <a@b>"},
    {"author": "x" * 255}, {"reason": "x" * 1001}, {"reason": "a\tb"}])
def test_bad_queue_events_are_refused(changes):
    with pytest.raises(QueueEventError):
        parse_queue_event(event_body(**changes))
    with pytest.raises(QueueEventError):
        parse_queue_event(b"\xff not fields")


def test_notify_on_takes_presets_kinds_and_lists():
    assert "rejected" in parse_notify_on("change") and "landed" not in parse_notify_on("change")
    assert parse_notify_on("all") >= {"landed", "rejected"}
    assert parse_notify_on("change,landed") == NOTIFY_ON["change"] | {"landed"}
    assert parse_notify_on("broken,fixed") == {"broken", "fixed"}
    with pytest.raises(ValueError):
        parse_notify_on("change,merged")


def test_the_journal_remembers_queue_events_through_compaction(tmp_path):
    path = str(tmp_path / "journal")
    store = EventStore(path)
    store.load()
    store.open()
    sent = build_queue_event(parse_queue_event(event_body()), None, ["command"])
    store.append([{"q": "7:rejected", "e": sent}], sync=True)
    store.append([{"q": "8:landed", "e": None}], sync=True)
    store.append([{"q": "9:rejected", "e": dict(sent, id="f" * 32, queue_id=9)}], sync=True)
    store.mark("f" * 32, "command")
    store.compact()
    store.close()
    again = EventStore(path)
    again.load()
    assert again.seen("7:rejected") and again.seen("8:landed") and again.seen("9:rejected")
    assert not again.seen("7:landed")
    assert [e["id"] for e in again.pending()] == [sent["id"]]
    # A queue event is no decision: its commit is not taken as judged.
    assert again.judged == {}


# ---- the dashboard's sections (ci/dashboard/queue_pages.py) ----------------

def test_queue_sections_escape_and_say_when_there_is_nothing():
    from ci.dashboard import queue_pages
    empty = queue_pages.sections(queue_snapshot.empty(), None)
    assert "has not reported a land queue" in empty["sec-queue-banner"]
    assert "Nothing is queued to land" in empty["sec-queue"]
    down = queue_pages.sections(None, "cannot reach the dispatcher")
    assert "Dispatcher unavailable" in down["sec-queue-banner"] and down["sec-queue"] == ""
    evil = snapshot(entries=[entry(branch='x"><script>alert(1)</script>',
                                   reason="<img src=x onerror=alert(2)>", by="<b>ann</b>")])
    html = "".join(queue_pages.sections(check_snapshot(evil), None).values())
    assert "<script>" not in html and "<img" not in html and "<b>" not in html
    assert "&lt;script&gt;" in html and "&lt;img src=x onerror=alert(2)&gt;" in html
    api = queue_pages.api_view(check_snapshot(snapshot()), None)
    main = api["targets"]["main"]
    assert (main["head"], main["depth"]) == (C, 4)
    assert [e["id"] for e in main["entries"]] == [7, 8]
    assert main["entries"][0]["tested_url"] == f"/commit/{B}"
    assert "tested_url" not in main["entries"][1]
    assert api["recent"][0]["state"] == "rejected"
    assert api["updated"] == "2023-11-14T22:13:40Z"
    assert queue_pages.api_view(None, "down") == {"dispatcher": {"reachable": False,
                                                                  "error": "down"}}
