"""A unit of work's states on their own (ci/dispatch/work.py): every step
the table allows is taken, every other is refused; and the journal's
records (ci/dispatch/journal.py) read back as they were built."""

from __future__ import annotations

import itertools

import pytest

from ci import matrix
from ci.dispatch import journal
from ci.dispatch.journal import AssignmentRecord, Record, parse_record, replay_lines
from ci.mergeinfo import MergeInfo
from ci.dispatch.work import TRANSITIONS, TransitionError, Work, WorkState, work_key

X, Y = "1" * 40, "2" * 40
TOKEN = "ab" * 16
S = WorkState

ALLOWED = [(a, b) for a, b in itertools.product(WorkState, WorkState) if b in TRANSITIONS[a]]
REFUSED = [(a, b) for a, b in itertools.product(WorkState, WorkState)
           if b not in TRANSITIONS[a]]


def work_in(state: WorkState) -> Work:
    work = Work(work_key(X), X)
    work.state = state  # made so for the test, not a transition
    return work


@pytest.mark.parametrize("start,end", ALLOWED, ids=lambda s: s.value)
def test_allowed_transitions_change_the_state(start, end):
    work = work_in(start)
    work.move(end)
    assert work.state is end


@pytest.mark.parametrize("start,end", REFUSED, ids=lambda s: s.value)
def test_other_transitions_are_refused_and_change_nothing(start, end):
    work = work_in(start)
    with pytest.raises(TransitionError, match=f"{start.value} -> {end.value}"):
        work.move(end)
    assert work.state is start


def test_the_table_covers_every_state_and_done_is_final():
    assert set(TRANSITIONS) == set(WorkState)
    assert TRANSITIONS[S.DONE] == frozenset()
    # Every state but DONE can still end: a path leads to DONE.
    for state in WorkState:
        seen, todo = set(), [state]
        while todo:
            here = todo.pop()
            seen.add(here)
            todo.extend(TRANSITIONS[here] - seen)
        assert S.DONE in seen, state


def test_a_new_record_is_journalling_and_a_lifecycle_reaches_done():
    work = Work(work_key(X), X)
    assert work.state is S.JOURNALLING
    for step in (S.QUEUED, S.RUNNING, S.QUEUED, S.SHARDED, S.WRITING, S.SHARDED,
                 S.WRITING, S.DONE):
        work.move(step)
    assert work.state is S.DONE


# ---- the journal's records ------------------------------------------------

BUILT = [
    (journal.queue_record(X), Record("Q", X)),
    (journal.retest_record(X), Record("R", X)),
    (journal.lost_record(X), Record("L", X)),
    (journal.done_record(X), Record("D", X)),
    (journal.meta_record(X, "feature/x", Y), Record("M", X, ("feature/x", Y, None, None))),
    (journal.meta_record(X, "main", None), Record("M", X, ("main", None, None, None))),
    (journal.shard_record(X, 4), Record("S", X, 4)),
    (journal.assign_record(X, AssignmentRecord(TOKEN, "127.0.0.1:9001", "r1")),
     Record("A", X, AssignmentRecord(TOKEN, "127.0.0.1:9001", "r1"))),
    (journal.assign_record(X, AssignmentRecord(TOKEN, "[::1]:9001", None)),
     Record("A", X, AssignmentRecord(TOKEN, "[::1]:9001", None))),
]


@pytest.mark.parametrize("line,record", BUILT, ids=[line[:1] for line, _ in BUILT])
def test_every_record_kind_reads_back_as_built(line, record):
    assert "\n" not in line
    assert parse_record(line) == record


@pytest.mark.parametrize("line", [
    "", "Q", "Q abc", f"Q {X} extra", f"X {X}", f"S {X}", f"S {X} four",
    f"A {X} short 127.0.0.1:1 -", f"A {X} {TOKEN} 127.0.0.1:1", f"M {X} - bad\x01branch",
    f"M {X} notacommit main", f"D {X[:-1]}",
])
def test_damaged_lines_parse_to_nothing(line):
    assert parse_record(line) is None


def test_replay_folds_the_built_records():
    lines = [journal.queue_record(X), journal.meta_record(X, "main", None),
             journal.assign_record(X, AssignmentRecord(TOKEN, "127.0.0.1:9001", None)),
             journal.lost_record(X), journal.lost_record(X),
             journal.queue_record(Y), journal.shard_record(Y, 2), journal.done_record(Y),
             "Q " + "3" * 39]   # a torn last line
    got = replay_lines(("\n".join(lines)).encode())
    assert got.order == [X, Y] and got.done == {Y} and not got.sharded
    assert got.meta == {X: ("main", None, None, None)} and got.lost[X] == 2
    assert got.assigned[X] == [AssignmentRecord(TOKEN, "127.0.0.1:9001", None)]
    # A retest starts a new round: the earlier assignment is history.
    again = replay_lines(("\n".join(lines + [journal.retest_record(X)]) + "\n").encode())
    assert X not in again.assigned and again.retest == {X} and again.lost[X] == 0
    # So does the next after a result: the lost runs were the last round's.
    done = replay_lines(("\n".join(lines[:-1] + [journal.done_record(X)]) + "\n").encode())
    assert done.lost[X] == 0


@pytest.mark.parametrize("whole,cut", [
    # A conflict's merge would be run, its verdict never given.
    (journal.meta_record(X, "feature", None, MergeInfo(Y, "3" * 40, "main"), ("a.py",)),
     " conflict="),
    # Another branch's name.
    (journal.meta_record(X, "main-untrusted", None), "-untrusted"),
    # The whole commit ended, its cells' records dropped.
    (journal.done_record(f"{X}:py3.12"), ":py3.12"),
], ids=["conflict", "branch", "cell"])
def test_a_torn_last_line_is_never_read_even_when_it_parses(whole, cut):
    """A crash cut the last line where the prefix left is a record of its
    own: it was replayed as that record."""
    torn = whole[:whole.index(cut)]
    assert parse_record(torn) is not None
    cell = journal.cell_record(f"{X}:py3.12", matrix.Cell("py3.12", "3.12"))
    before = [journal.queue_record(f"{X}:py3.12"), cell]
    got = replay_lines(("\n".join(before + [torn])).encode())
    assert got.meta == {} and got.done == set() and f"{X}:py3.12" in got.cells
