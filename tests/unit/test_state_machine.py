"""The dispatcher's state machine in-process, no sockets: the interleavings
a review found (a late result racing the assignment loop, a stale result
freeing the current holder, a failed journal write stranding a commit),
adoption after a restart, and how pings drop runners.  A result write is
gated, so each interleaving happens exactly as described, every time."""

from __future__ import annotations

import os
import threading

import pytest

from support.cluster import wait_until

from ci.runner.jobs import RunnerJob, RunnerState
from ci.dispatch.runners import IDLE, OCCUPIED, RUNNING, PingReply, Traits
from ci.dispatch.state import DispatcherState
from ci.dispatch.work import WorkState
from ci.dispatch.journal import Journal
from ci.outcome import Outcome
from ci.wire import Reply

X, Y, Z = "1" * 40, "2" * 40, "3" * 40
A, B = ("127.0.0.1", 9001), ("127.0.0.1", 9002)
KA, KB = "127.0.0.1:9001", "127.0.0.1:9002"


class GatedState(DispatcherState):
    """Result writes wait for ``gate`` once ``hold`` is set."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hold = False
        self.gate = threading.Event()
        self.writing_started = threading.Event()

    def write_result(self, commit, outcome):
        if self.hold:
            self.writing_started.set()
            assert self.gate.wait(10)
        super().write_result(commit, outcome)


@pytest.fixture
def make_state(tmp_path):
    def make(journal_cls=Journal, grace=0.0):
        results = tmp_path / "results"
        results.mkdir(exist_ok=True)
        state = GatedState(str(results), journal_cls(str(tmp_path / "journal")), 3)
        state.recover(grace)
        return state
    return make


def in_state(state, work_state):
    """The commits whose work is in ``work_state``."""
    return {w.commit for w in state.work.values() if w.state is work_state}


def job_of(state, commit):
    """The live whole-commit job of ``commit``, None unless it is RUNNING."""
    work = state.work.get(commit)
    return work.job if work and work.state is WorkState.RUNNING else None


def assign(state):
    """Run the assignment loop's claim once, in this thread."""
    job = state.next_assignment()
    assert job is not None
    return job


def result(state, job, verdict="passed", name=None):
    return state.record_result(job.commit, job.token, name,
                               Outcome({"verdict": verdict}, b"out\n"))


def test_late_result_of_a_requeued_commit_is_not_handed_out_again(make_state):
    state = make_state()
    state.register(A, "ia", None)
    state.enqueue([X])
    job = assign(state)
    state.expire_jobs(-1)  # the deadline passed: X is requeued, A occupied
    assert list(state.queue) == [X] and state.runners[KA].state == OCCUPIED
    state.hold = True
    writer = threading.Thread(target=result, args=(state, job))
    writer.start()
    assert state.writing_started.wait(5)
    # While the late result is written without the lock, X is claimed:
    # not queued, so the assignment loop cannot send it to anyone again.
    assert X not in state.queue and state.state_of(X) is WorkState.WRITING
    state.enqueue([Y])
    second = assign(state)
    assert second.commit == Y and second.runner == KA  # A was freed by its result
    state.gate.set()
    writer.join(5)
    assert X in state.done
    # Finishing X did not mark A free while it runs Y.
    assert state.runners[KA].state == RUNNING and state.runners[KA].job is second


def test_stale_result_does_not_free_the_current_holder(make_state):
    state = make_state()
    state.register(A, "ia", None)
    state.enqueue([X])
    first = assign(state)
    state.expire_jobs(-1)
    state.register(B, "ib", None)
    second = assign(state)
    assert (second.commit, second.runner) == (X, KB) and second.token != first.token
    assert result(state, first) is True  # a real earlier assignment, and first
    # B is still running X: busy, though not with our work; not offered more.
    assert state.runners[KB].state == OCCUPIED
    state.enqueue([Y])
    third = assign(state)
    assert third.runner == KA
    assert result(state, second) is False  # B's own result: a duplicate
    assert state.runners[KB].state == IDLE


def test_a_failed_lost_record_does_not_strand_the_commit(make_state):
    class NoLostRecords(Journal):
        def append(self, records, sync):
            if any(r.startswith("L ") for r in records):
                raise OSError("disk full")
            super().append(records, sync)
    state = make_state(NoLostRecords)
    state.register(A, "ia", None)
    state.enqueue([X])
    assign(state)
    for _ in range(3):
        state.ping_result(KA, PingReply("timeout"), 3)
    assert KA not in state.runners
    assert list(state.queue) == [X]  # queued again, not lost from memory


def test_a_signed_busy_to_a_ping_is_not_a_missed_ping(make_state):
    """A runner flooded by strangers answers pings ``busy`` (signed): it
    was dropped after --ping-misses of them, its job counted lost, and at
    --max-attempts the commit got ``error``."""
    state = make_state()
    state.register(A, "ia", None)
    state.enqueue([X])
    assign(state)
    for _ in range(5):
        state.ping_result(KA, PingReply("busy"), 3)
    assert KA in state.runners and state.runners[KA].job is not None
    assert state.work[X].losses == 0
    for _ in range(3):
        state.ping_result(KA, PingReply("timeout"), 3)
    assert KA not in state.runners


def test_a_runner_key_holds_an_address_only_where_its_pings_are_answered(make_state):
    """The rules behind ``register``'s ping (ci/dispatch/server.py): a
    named runner is not entered unproven; a heartbeat keeps its misses
    (a register says nothing of the address); a reply signed with another
    key drops it at once, without counting against its commit; and a
    proven claim takes the address from an entry of another key."""
    state = make_state()
    assert state.register(A, "thief", None, name="r2") == "unproven"
    assert not state.runners
    assert state.register(A, "thief", None, name="r2", proven=True) == "registered"
    state.enqueue([X])
    assign(state)
    for _ in range(2):
        state.ping_result(KA, PingReply("timeout"), 3)
        assert state.register(A, "thief", None, name="r2") == "known"
    state.ping_result(KA, PingReply("timeout"), 3)
    assert KA not in state.runners and state.work[X].losses == 1
    state.register(A, "thief", None, name="r2", proven=True)
    assign(state)
    state.ping_result(KA, PingReply("unauthentic"), 3)
    assert KA not in state.runners and state.work[X].losses == 1
    state.register(A, "thief", None, name="r2", proven=True)
    job = assign(state)
    # Another key's claim is asked for its proof, not refused: it may be
    # the runner now listening there.
    assert state.register(A, "ia", None, name="r1") == "unproven"
    assert state.runners[KA].name == "r2"
    assert state.register(A, "ia", None, name="r1", proven=True) == "registered"
    assert state.runners[KA].name == "r1" and state.work[X].losses == 1
    assert job_of(state, X) is not job


def test_a_failed_assignment_record_undoes_the_claim(make_state):
    class NoAssignments(Journal):
        fail = True

        def append(self, records, sync):
            if self.fail and any(r.startswith("A ") for r in records):
                NoAssignments.fail = False
                raise OSError("disk full")
            super().append(records, sync)
    state = make_state(NoAssignments)
    state.register(A, "ia", None)
    state.enqueue([X])
    job = assign(state)  # the first claim is undone, the second succeeds
    assert job.commit == X and len(state.work[X].assignments) == 1


def test_forged_results_are_refused_and_change_nothing(make_state):
    state = make_state()
    state.register(A, "ia", None, name="r1", proven=True)
    state.register(B, "ib", None, name="r2", proven=True)
    state.enqueue([X, Y])
    jx, jy = assign(state), assign(state)
    with pytest.raises(Reply, match="no such assignment"):
        state.record_result(X, "f" * 32, None, Outcome({"verdict": "passed"}))
    with pytest.raises(Reply, match="no such assignment"):
        state.record_result(X, jy.token, None, Outcome({"verdict": "passed"}))
    with pytest.raises(Reply, match="another runner"):
        state.record_result(X, jx.token, jy.name, Outcome({"verdict": "passed"}))
    with pytest.raises(Reply):
        state.progress(X, jy.token, None, b"x")
    with pytest.raises(Reply):
        state.release(X, jy.token, None)
    assert not state.done and job_of(state, X) is jx
    assert result(state, jx, name=jx.name) is True


def test_retest_is_a_new_round(make_state):
    state = make_state()
    state.register(A, "ia", None)
    state.enqueue([X])
    old = assign(state)
    assert result(state, old)
    assert state.retest([X]) == [X]
    new = assign(state)
    assert new.token != old.token
    assert result(state, old) is False  # the old round: a duplicate, not the verdict
    assert X not in state.done
    assert result(state, new, "failed") is True


def test_restart_holds_running_commits_for_their_runner(make_state, tmp_path):
    state = make_state()
    state.register(A, "ia", None)
    state.register(B, "ib", None)
    state.enqueue([X, Y, Z])
    jx, jy = assign(state), assign(state)
    state.journal.close()
    # A restart: X and Y were running, Z queued.
    restarted = make_state(grace=60)
    assert list(restarted.queue) == [Z] and in_state(restarted, WorkState.HELD) == {X, Y}
    # A is still running X and proves it: adopted, not run twice.
    restarted.register(jx.address, "ia", X, jx.token)
    assert job_of(restarted, X).token == jx.token and restarted.state_of(X) is not WorkState.HELD
    # B comes back idle: Y need not wait out the grace period.
    restarted.register(jy.address, "ib2", None)
    assert list(restarted.queue)[0] == Y and not in_state(restarted, WorkState.HELD)
    # A claim with a wrong token adopts nothing.
    restarted.register(("127.0.0.1", 9003), "ic", Z, "0" * 32)
    assert Z in restarted.queue


def test_a_runtest_whose_reply_was_lost_is_adopted_not_run_twice(make_state):
    """The runner took the job but its ``ok`` never arrived: the commit was
    requeued.  Its next heartbeat (or ping) says it is running it, with the
    token: it keeps it, and nobody else is given it."""
    state = make_state()
    state.register(A, "ia", None)
    state.enqueue([X])
    job = assign(state)
    state.assignment_failed(job, "error")
    assert list(state.queue) == [X] and state.runners[KA].state == "suspect"
    state.ping_result(KA, PingReply("ok", "ia", X, job.token), 3)
    assert not state.queue and job_of(state, X).token == job.token
    assert state.runners[KA].state == RUNNING
    assert result(state, job) is True


def test_held_commits_are_released_at_the_deadline(make_state):
    state = make_state()
    state.register(A, "ia", None)
    state.enqueue([X])
    assign(state)
    state.journal.close()
    restarted = make_state(grace=60)
    assert restarted.state_of(X) is WorkState.HELD and not restarted.queue
    restarted.release_held(now=float("inf"))
    assert list(restarted.queue) == [X]


def test_refused_ping_drops_at_once_and_timeouts_need_the_misses(make_state):
    state = make_state()
    state.register(A, "ia", None)
    state.register(B, "ib", None)
    state.enqueue([X, Y])
    jobs = {assign(state).runner: None for _ in range(2)}
    assert set(jobs) == {KA, KB}
    state.ping_result(KA, PingReply("refused"), 3)
    assert KA not in state.runners and state.queue[0] in (X, Y)
    state.ping_result(KB, PingReply("timeout"), 3)
    state.ping_result(KB, PingReply("timeout"), 3)
    assert KB in state.runners
    state.ping_result(KB, PingReply("timeout"), 3)
    assert KB not in state.runners and sorted(state.queue) == [X, Y]


def test_a_commit_that_loses_its_runners_gets_error(make_state):
    state = make_state()
    for attempt in range(3):
        state.register(A, f"i{attempt}", None)
        if attempt == 0:
            state.enqueue([X])
        assign(state)
        state.ping_result(KA, PingReply("refused"), 3)
    with open(os.path.join(state.results_dir, X), "rb") as handle:
        assert b"verdict: error" in handle.read()


def test_a_retest_after_a_restart_does_not_inherit_earlier_lost_runs(make_state):
    """A round that lost its runner twice, then passed; a retest; a
    restart.  Replay counted the first round's losses into the retest's
    (a new round starts at 0 in memory), so one more lost run gave up
    with 'error' (max attempts 3)."""
    state = make_state()
    for attempt in range(3):
        state.register(A, f"i{attempt}", None)
        if attempt == 0:
            state.enqueue([X])
        job = assign(state)
        if attempt < 2:
            state.ping_result(KA, PingReply("refused"), 3)
    assert result(state, job) is True
    assert state.retest([X]) == [X]
    state.journal.close()
    restarted = make_state()
    assert restarted.work[X].losses == 0
    restarted.register(A, "i3", None)
    assign(restarted)
    restarted.ping_result(KA, PingReply("refused"), 3)
    assert list(restarted.queue) == [X]
    with open(os.path.join(restarted.results_dir, X), "rb") as handle:
        assert b"verdict: passed" in handle.read()


def test_live_output_keeps_a_bounded_tail(make_state):
    state = make_state()
    state.register(A, "ia", None)
    state.enqueue([X])
    job = assign(state)
    for _ in range(100):
        state.progress(X, job.token, None, b"x" * 4096)
    state.progress(X, job.token, None, b"THE END")
    tail = state.log_tail(X)
    assert len(tail) <= 64 * 1024 and tail.endswith(b"THE END")
    assert state.log_tail(Y) is None


# --------------------------------------------------------------------------
# The runner's own state: one job at a time, handed back on stop.

def test_runner_state_takes_one_job_and_hands_it_back_on_stop():
    runner = RunnerState()
    first = RunnerJob(X, "a" * 32)
    assert runner.offer(first)
    assert not runner.offer(RunnerJob(Y, "b" * 32))  # busy
    got = []
    worker = threading.Thread(target=lambda: got.append(runner.take()))
    worker.start()
    worker.join(5)
    assert got == [first] and runner.current_job() is first
    assert runner.stop() is first  # what a stopping runner releases
    assert not runner.offer(RunnerJob(Y, "b" * 32))
    assert runner.take() is None
    wait_until(lambda: not worker.is_alive(), 5)


def test_a_ping_of_the_previous_process_does_not_drop_its_successor(make_state):
    """A runner restarted on the same port registers while a sweep's ping
    of the dead process is still out: the refused ping is the old
    process's news, not the new one's (it used to drop the new runner
    and count its commit's run as lost twice)."""
    state = make_state()
    state.register(A, "old", None)
    state.enqueue([X])
    assign(state)
    state.register(A, "new", None)  # the old process's run is lost: counted once
    job = assign(state)
    assert job.runner == KA and state.work[X].losses == 1
    state.ping_result(KA, PingReply("refused"), 3, pinged="old")
    assert KA in state.runners and job_of(state, X) is job and state.work[X].losses == 1
    state.ping_result(KA, PingReply("refused"), 3, pinged="new")
    assert KA not in state.runners and state.work[X].losses == 2


def test_compaction_waits_for_a_dispatch_being_fsynced(make_state, monkeypatch):
    """A dispatch's records are fsynced outside the lock; a compaction
    that ran meanwhile rewrote the journal without them, so an answered
    ``dispatch`` was lost at the next crash."""
    from ci.dispatch import finish
    fsyncing, go = threading.Event(), threading.Event()

    class SlowSync(Journal):
        def append(self, records, sync):
            super().append(records, sync)
            if sync and any(r == f"Q {Y}" for r in records):
                fsyncing.set()  # on disk, not yet in the queue
                assert go.wait(10)
    state = make_state(SlowSync)
    monkeypatch.setattr(finish, "COMPACT_AFTER", 0)
    state.register(A, "ia", None)
    state.enqueue([X])
    job = assign(state)
    dispatching = threading.Thread(target=state.enqueue, args=([Y],))
    dispatching.start()
    assert fsyncing.wait(5)
    assert result(state, job) is True  # finishing X would compact the journal here
    go.set()
    dispatching.join(5)
    state.journal.close()
    replayed = Journal(state.journal.path).replay()
    assert Y in replayed.order and Y not in replayed.done


def test_a_runner_whose_own_limits_are_longer_keeps_its_job_past_the_default(make_state):
    # A first environment build plus the tests may outlast the default job
    # deadline: the runner says how long its limits allow, and with the
    # default deadline (not an explicit --job-timeout) it gets that long.
    state = make_state()
    state.register(A, "ia", None, traits=Traits(limit=3600))
    state.register(B, "ib", None)  # says nothing: the deadline as given
    state.enqueue([X, Y])
    on_a, on_b = assign(state), assign(state)
    assert (on_a.runner, on_b.runner) == (KA, KB)
    state.expire_jobs(-1)
    assert state.runners[KA].job is on_a and list(state.queue) == [Y]
    # With an explicit --job-timeout the dispatcher registers no limit:
    # that deadline is exact.
    state.register(A, "ia", None, traits=Traits(limit=None))
    state.expire_jobs(-1)
    assert state.runners[KA].job is None and sorted(state.queue) == sorted([X, Y])


def test_the_locking_rule_of_the_docstring_holds_for_every_method():
    """``DispatcherState``'s docstring: a method whose name starts with
    ``_`` expects the caller to hold ``self.cond`` (so it never takes it),
    every other one takes it itself (but ``write_result``, which touches
    no state).  Checked on the source of the class and its mixins, so a
    method added against the rule fails here, not in a rare deadlock."""
    import inspect
    import textwrap
    lock_free = {"write_result"}
    broken = []
    for cls in DispatcherState.__mro__:
        if not cls.__module__.startswith("ci.dispatch"):
            continue
        for name, function in vars(cls).items():
            if name.startswith("__") or not inspect.isfunction(function):
                continue
            takes = "with self.cond" in textwrap.dedent(inspect.getsource(function))
            if name.startswith("_") and takes:
                broken.append(f"{cls.__name__}.{name} takes the lock its name says it holds")
            elif not name.startswith("_") and not takes and name not in lock_free:
                broken.append(f"{cls.__name__}.{name} does not take the lock")
    assert not broken
    assert "write_result" in DispatcherState.__doc__


def test_a_work_record_changes_state_only_through_move():
    """The transitions are in one place (``Work.move`` and its table);
    no module of the dispatcher sets a record's state behind its back
    (recovery makes a record in the state it recovers to)."""
    import pathlib
    import re
    folder = pathlib.Path(__file__).resolve().parents[2] / "ci" / "dispatch"
    setters = [f"{path.name}:{number}" for path in sorted(folder.glob("*.py"))
               if path.name != "work.py"
               for number, line in enumerate(path.read_text().splitlines(), 1)
               if re.search(r"\.state\s*=\s*(WorkState|S)\.", line)]
    assert not setters


def test_a_result_sent_again_after_a_restart_is_a_duplicate_not_refused(make_state):
    """The dispatcher died after writing X's result file, before its ``D``
    record (the runner never got the reply); Y's file was stored and then
    a compaction dropped its assignment.  Sent again after the restart,
    each is a duplicate (the runner's outbox lets it go), not refused as
    "no such assignment", and nothing is written again."""
    state = make_state()
    state.register(A, "ia", None)
    state.register(B, "ib", None)
    state.enqueue([X])
    job = assign(state)
    state.write_result(X, Outcome({"verdict": "failed"}, b"first\n"))   # and no D
    path = os.path.join(state.results_dir, X)
    before = open(path, "rb").read()
    restarted = make_state()
    assert result(restarted, job, "passed") is False
    assert open(path, "rb").read() == before
    restarted.enqueue([Y])
    restarted.register(A, "ia2", None)
    job_y = assign(restarted)
    assert result(restarted, job_y) is True
    restarted.journal.rewrite([])        # as a compaction that dropped its A
    again = make_state()
    assert result(again, job_y, "failed") is False
    with pytest.raises(Reply, match="no such assignment"):
        result(again, RunnerJob(Z, job_y.token))    # an unfinished commit still is
