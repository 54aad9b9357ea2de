"""The notification journal (ci/notify/store.py): replay after a torn
write keeps the undelivered events in order; compaction keeps what is
needed."""

from __future__ import annotations

import pytest

from support.notify import chain, cid, decision_records

from ci.notify.decider import Decider, Result
from ci.notify.events import build_event
from ci.notify.store import EventStore


def test_store_replay_keeps_undelivered_events_in_order(tmp_path):
    path = str(tmp_path / "journal")
    store = EventStore(path)
    assert store.load() is False
    store.open()
    records = decision_records(chain(["passed", "failed", "failed", "passed"]), "failure")
    store.append(records, sync=True)
    broken, still, fixed = [r["e"]["id"] for r in records if r["e"]]
    store.mark(broken, "command")
    store.mark(broken, "webhook:x")
    store.mark(still, "webhook:x", "gave_up")
    store.close()
    with open(path, "ab") as handle:
        handle.write(b'{"ok": "torn')  # a crash mid-write
    again = EventStore(path)
    assert again.load() is True
    assert [(e["id"], e["targets"]) for e in again.pending()] == \
        [(still, ["command"]), (fixed, ["command", "webhook:x"])]
    assert again.judged == {r["j"]: (r["v"], 1) for r in records}


@pytest.mark.parametrize("torn", [b'{"ok": "torn', b'{"ok": "' + b"x" * 200_000],
                         ids=["short", "longer-than-a-block"])
def test_a_record_appended_after_a_torn_line_survives_the_next_restart(tmp_path, torn):
    """The torn line was skipped at load but left in the file: the first
    record after the restart was glued to it, and the next replay lost
    both (here, a broken commit's delivery: it was sent again)."""
    path = str(tmp_path / "journal")
    store = EventStore(path)
    store.load()
    store.open()
    records = decision_records(chain(["passed", "failed"]), "failure")
    store.append(records, sync=True)
    (broken,) = [r["e"]["id"] for r in records if r["e"]]
    store.mark(broken, "command")
    store.close()
    with open(path, "ab") as handle:
        handle.write(torn)  # a crash mid-write
    again = EventStore(path)
    again.load()
    again.open()
    again.mark(broken, "webhook:x")
    again.close()
    third = EventStore(path)
    third.load()
    assert third.pending() == []


def test_store_compaction_keeps_what_is_needed(tmp_path):
    path = str(tmp_path / "journal")
    store = EventStore(path)
    store.load()
    store.open()
    results = chain(["passed", "failed"])
    store.append(decision_records(results), sync=True)
    # A retest of the broken commit: a second pending event for it.
    retest = Result(results[1].commit, "main", results[0].commit, "passed")
    decider = Decider()
    decider.judged = store.judged
    (fixed,) = decider.add([retest])
    event = build_event(fixed, "/r", None, ["command"])
    store.append([{"j": retest.commit, "v": "passed", "n": fixed.n, "e": event}], sync=True)
    for n in range(50):
        store.append([{"j": cid(n), "v": "passed", "n": 1, "e": None}], sync=False)
    before = [e["id"] for e in store.pending()]
    assert len(before) == 3
    store.compact(keep=lambda commit: commit != cid(7))
    store.close()
    again = EventStore(path)
    again.load()
    assert [e["id"] for e in again.pending()] == before
    assert again.judged[retest.commit] == ("passed", 2)
    assert cid(7) not in again.judged and cid(8) in again.judged
    assert again.records == len(again.judged) + 3
