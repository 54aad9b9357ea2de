"""The land queue's journal (ci/landing/journal.py): replay rebuilds the
queue, a torn last line is skipped, compaction keeps what is needed, ids
are never reused, and a push intent left by a crash is settled from the
target's real head only."""

from __future__ import annotations

from ci.landing import journal as qj

A, B, C, D = ("a" * 40, "b" * 40, "c" * 40, "d" * 40)


def test_replay_rebuilds_every_entry(tmp_path):
    path = str(tmp_path / "queue.journal")
    j = qj.QueueJournal(path)
    one = j.ask("feature/a", "main", A, "alice")
    two = j.ask("feature/b", "main", B, "bob")
    j.write("built", one.id, tested=C, base=D)
    j.write("verdict", one.id, tested=C, verdict="passed", reason="-")
    j.write("intent", one.id, old=D, new=C)
    j.write("landed", one.id, old=D, new=C)
    j.write("built", two.id, tested=None, base=C, verdict="conflict", reason="x.py")
    j.write("rejected", two.id, reason="conflict with main: x.py")
    j.write("sent", two.id, event="rejected")
    j.close()
    again = qj.QueueJournal(path)
    a, b = again.entries[1], again.entries[2]
    assert (a.branch, a.head, a.by, a.tested, a.base, a.verdict) == \
        ("feature/a", A, "alice", C, D, "passed")
    assert a.done == "landed" and a.landed == [D, C] and a.intent is None
    assert a.pending_event() == "landed"
    assert b.done == "rejected" and b.reason == "conflict with main: x.py"
    assert b.pending_event() is None
    assert again.ask("feature/c", "main", A, "carol").id == 3


def test_a_verdict_for_an_older_build_is_ignored(tmp_path):
    j = qj.QueueJournal(str(tmp_path / "q"))
    entry = j.ask("f", "main", A, "")
    j.write("built", entry.id, tested=C, base=D)
    j.write("built", entry.id, tested=B, base=A)
    j.write("verdict", entry.id, tested=C, verdict="failed", reason="old")
    assert entry.verdict is None and entry.tested == B


def test_a_torn_last_line_and_garbage_are_skipped(tmp_path):
    path = tmp_path / "queue.journal"
    j = qj.QueueJournal(str(path))
    j.ask("feature/a", "main", A, "")
    j.write("intent", 1, old=D, new=C)
    j.close()
    with open(path, "ab") as handle:
        handle.write(b'not json\n{"r": "landed", "id": 7}\n{"r": "landed", "id": 1, "ol')
    again = qj.QueueJournal(str(path))
    assert list(again.entries) == [1]
    assert again.entries[1].intent == [D, C] and again.entries[1].done is None
    # The torn tail does not spoil what is appended after it.
    again.write("unpushed", 1, reason="stale")
    again.close()
    assert qj.QueueJournal(str(path)).entries[1].intent is None


def test_a_bad_record_is_refused_before_it_is_written(tmp_path):
    path = tmp_path / "q"
    j = qj.QueueJournal(str(path))
    try:
        j.write("landed", 5, old=A, new=B)
    except KeyError:
        pass
    else:
        raise AssertionError("a record for an unknown entry was accepted")
    assert path.read_bytes() == b""


def test_compaction_keeps_active_unsent_and_recent_and_never_reuses_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(qj, "COMPACT_SLACK", 10)
    monkeypatch.setattr(qj, "KEEP_DONE", 2)
    path = str(tmp_path / "q")
    j = qj.QueueJournal(path)
    for n in range(8):
        entry = j.ask(f"f{n}", "main", A, "")
        j.write("built", entry.id, tested=C, base=D)
        if n < 6:
            j.write("rejected", entry.id, reason="red")
            if n != 1:
                j.write("sent", entry.id, event="rejected")
    j.compact()
    kept = sorted(j.entries)
    assert kept == [2, 5, 6, 7, 8]      # unsent 2, recent 5 and 6, active 7 and 8
    j.close()
    again = qj.QueueJournal(path)
    assert sorted(again.entries) == kept
    assert again.entries[7].tested == C and again.entries[2].pending_event() == "rejected"
    # Everything dropped: the next id is still new.
    for id in (2, 5, 6, 7, 8):
        again.write("cancelled", id, by="x") if again.entries[id].active else None
    again.compact()
    again.close()
    assert qj.QueueJournal(path).ask("g", "main", A, "").id == 9


def test_compaction_happens_by_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(qj, "COMPACT_SLACK", 5)
    path = tmp_path / "q"
    j = qj.QueueJournal(str(path))
    entry = j.ask("f", "main", A, "")
    for _ in range(20):
        j.write("built", entry.id, tested=C, base=D, sync=False)
    assert len(path.read_bytes().splitlines()) < 10
    j.close()
    assert qj.QueueJournal(str(path)).entries[1].tested == C


def test_a_push_intent_is_settled_from_the_real_head_only():
    assert qj.settle_intent(D, C, C) == "landed"
    assert qj.settle_intent(D, C, D) == "unpushed"
    assert qj.settle_intent(D, C, B) == "moved"
    assert qj.settle_intent(D, C, None) == "moved"
