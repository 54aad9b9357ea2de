"""The dispatcher's shared state: the work to do (one ``Work`` record per
commit, in one ``WorkState``: ci/dispatch/work.py), the runners, and the
finished commits; one object behind one condition, with no sockets, so
that every interleaving of handlers, the assignment loop and the health
sweep can be reproduced in-process.

Job ownership is explicit.  Every assignment of a commit to a runner has
an unguessable token, sent with ``runtest`` and journalled before it is
sent; ``results``, ``release`` and ``progress`` for a commit count only
with the token of an assignment that really happened (and, with issued
keys, only from the runner it was given to).  The parts, one concern
each: runners (ci/dispatch/runners.py), sharding (shards.py), results and
lost runs (finish.py), the ``status``/``state`` views (views.py), start-up
from the journal (recovery.py).

Lock order: ``self.cond`` first, then the journal's own lock.  Result
files and the journal's fsyncs are written outside ``self.cond`` where the
order allows (a claim under the lock, WRITING or JOURNALLING, makes the
commit invisible to the assignment loop while its file is written).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time

from ci import jobspec, matrix
from ci import sharding
from ci.dispatch.cells import DEFAULT_UNROUTABLE_TIMEOUT, MatrixKeeper, fits
from ci.matrix import SINGLE_PLAN, Plan
from ci.dispatch.finish import ResultKeeper
from ci.dispatch.journal import (BRANCH_RE, AssignmentRecord, Journal, assign_record,
                                 cell_record, error_record, key_commit, meta_record,
                                 queue_record, retest_record)
from ci.dispatch.runners import IDLE, OCCUPIED, RUNNING, SUSPECT, Runner, RunnerRegistry
from ci.dispatch.shards import ShardPlanner
from ci.dispatch.views import StateViews
from ci.dispatch.answers import VerdictAnswers
from ci.dispatch.live import LiveOutput
from ci.dispatch.pruned import PrunedCommits
from ci.dispatch.spares import SpareFiles
from ci.dispatch.recovery import Recovery
from ci.retention.gate import ResultGate
from ci.retention.tombstones import TombstoneFile
from ci.dispatch.work import Job, Meta, Work, WorkKey, WorkState, new_token, work_key
from ci.history.recent import RecentFailures
from ci.wire import Reply

log = logging.getLogger(__name__)

# A retest waits at most this long for the pruner to finish unlinking one
# of its commits (one batch of unlinks: milliseconds).
UNLINK_WAIT = 30.0
# The assignment loop looks this far down the queue for work a free runner
# fits (cells waiting for other runners may fill its head).
MAX_SCAN = 5000


def take(queue: collections.deque, item) -> None:
    """Remove ``item`` from ``queue``: usually its head."""
    if queue and queue[0] == item:
        queue.popleft()
    else:
        queue.remove(item)


def rules_commit(work: Work) -> str | None:
    """The commit whose recipe's quarantine judges the work: a merge
    commit's target (issue 22), else None (the commit's own)."""
    merge = work.meta.merge if work.meta else None
    return merge.target_commit if merge else None


class DispatcherState(Recovery, LiveOutput, PrunedCommits, RunnerRegistry, ShardPlanner,
                      ResultKeeper, MatrixKeeper, StateViews, VerdictAnswers):
    """Every attribute is guarded by ``self.cond`` (the verdicts' JUnit
    cache has a lock of its own).  Methods whose name starts with ``_``
    expect the caller to hold it; every other one takes it itself (but
    ``write_result``: a file write, no state) and must not be called with
    it held, since many release it around I/O (``enqueue``, ``retest``,
    ``journal_and_queue``, ``next_assignment``, ``record_result``,
    ``remove_pruned``, ``verdicts``).  Checked by test_state_machine.py."""

    def __init__(self, results_dir: str, journal: Journal, max_attempts: int):
        self.results_dir = results_dir
        self.journal = journal
        # Records the journal held after its last rewrite (see _compaction_due).
        self.compacted_records = 0
        self.max_attempts = max_attempts
        self.cond = threading.Condition()
        # Every unfinished unit of work, by key; the QUEUED ones in FIFO
        # order in ``queue``, the shards waiting to run in ``shard_queue``.
        self.work: dict[WorkKey, Work] = {}
        self.queue: collections.deque[WorkKey] = collections.deque()
        self.shard_queue: collections.deque[tuple[WorkKey, int]] = collections.deque()
        self.runners: dict = {}
        # Runner key name -> when its next address proof may start (inf
        # while one runs); see RunnerRegistry.start_proof.
        self.proofs: dict[str, float] = {}
        self.done: set[WorkKey] = set()     # a result file exists
        # Matrix commits not yet complete: commit -> {cell name: Cell}.
        self.groups: dict[str, dict[str, matrix.Cell]] = {}
        # Which work each assignment's token belongs to (a commit's cells
        # share its id on the wire; the token tells them apart).
        self.token_keys: dict[str, WorkKey] = {}
        self.unroutable_timeout = DEFAULT_UNROUTABLE_TIMEOUT
        self.max_cells = matrix.DEFAULT_MAX_CELLS
        # Pruned by --keep-results: no file, a tombstone (ci/retention/);
        # finished all the same, never queued again but by a retest.
        self.pruned: set[WorkKey] = set()
        # Pruned commits whose files are being unlinked (without the lock).
        self.unlinking: set[WorkKey] = set()
        # Retests finished so far: a pruning pass whose plan was made before
        # one of them stops (the new verdict may change what it must keep).
        self.retests_finished = 0
        self.tombstones: TombstoneFile | None = None
        # The result index's path (ci/retention/index.py; None: not kept).
        self.result_index: str | None = None
        # (key, token) -> AssignmentRecord, for rounds that are over.
        self.finished_tokens: collections.OrderedDict = collections.OrderedDict()
        # Sharding (--max-shards) and what results taught about durations.
        self.max_shards = 1
        # No shard shorter than this by the known durations (0: no check).
        self.min_shard_seconds = 1.0
        self.durations = sharding.Durations()
        # Each branch's most recently failing tests, which its jobs run first.
        self.recent_failures = RecentFailures()
        # --trusted-branch: whose environments every commit may reuse.
        self.trusted_branches = jobspec.DEFAULT_TRUSTED_BRANCHES
        self.stopping = False
        self.completed = 0
        # Held by every ``results`` handler while it stores its result;
        # the pruner gives way to it (ci/retention/gate.py).  Its own lock.
        self.result_gate = ResultGate()
        # Files made ahead of time for the results folder (None: each
        # result creates its own; ci/dispatch/spares.py).
        self.spares: SpareFiles | None = None
        # Called with (commit, Outcome) after a result file is on disk,
        # outside the lock (notifications); must not block.
        self.listeners: list = []
        # Called with (commit, branch, test id, seconds) when a running
        # commit's first test fails, outside the lock; must not block.
        self.failing_listeners: list = []

    # ---- the work table ---------------------------------------------------
    def _work(self, commit: str, token: str | None = None) -> Work | None:
        """The work of ``commit`` that ``token`` was handed out for (its
        only cell's without a token or for an unknown one)."""
        return self.work.get(self._key_of(commit, token))

    def _key_of(self, commit: str, token: str | None) -> WorkKey:
        key = self.token_keys.get(token) if token else None
        return key if key is not None and key_commit(key) == commit else work_key(commit)

    def state_of(self, commit: str) -> WorkState | None:
        """The state of a commit's work; None if it was never seen."""
        with self.cond:
            work = self.work.get(WorkKey(commit))
            if work is not None:
                return work.state
            return WorkState.DONE if self._finished(WorkKey(commit)) else None

    def _finished(self, key: WorkKey) -> bool:
        """A result file exists, or one was pruned (a tombstone)."""
        return key in self.done or key in self.pruned

    def _in_state(self, state: WorkState) -> list[Work]:
        return [w for w in self.work.values() if w.state is state]

    def _live_jobs(self) -> list[Job]:
        """Every running job: whole commits first, then shards."""
        works = list(self.work.values())
        return [w.job for w in works if w.state is WorkState.RUNNING] + \
            [j for w in works if w.shards for j in w.shards.running.values()]

    def _to_queue(self, work: Work, head: bool) -> None:
        work.move(WorkState.QUEUED)
        work.job = None
        work.failing = None   # the next run tells its own
        if head:
            self.queue.appendleft(work.key)
        else:
            self.queue.append(work.key)
        self.cond.notify_all()

    def _claim(self, work: Work) -> None:
        """WRITING: out of the queue, so the assignment loop cannot hand
        it out again while its result file is written without the lock."""
        if work.state is WorkState.QUEUED:
            self.queue.remove(work.key)
        work.move(WorkState.WRITING)

    # ---- the journal's records of a unit of work ---------------------------
    @staticmethod
    def _records_of(work: Work) -> list[str]:
        """What queues a unit of work: ``Q``, its cell, its metadata, or
        the reason it cannot run."""
        lines = [queue_record(work.key)]
        if work.cell.name or work.cell.labels:
            lines.append(cell_record(work.key, work.cell))
        if work.error is not None:
            lines.append(error_record(work.key, work.error))
        if work.meta:
            lines.append(meta_record(work.key, *work.meta))
        return lines

    # ---- queueing -------------------------------------------------------
    def is_pending(self, commit: str) -> bool:
        """Queued, running or being written: its result is still to come."""
        with self.cond:
            return work_key(commit) in self.work or commit in self.groups

    def pending_commits(self) -> set[str]:
        """Every commit queued, running or being written (a snapshot)."""
        with self.cond:
            return {w.commit for w in self.work.values()}

    def _pending_commit(self, commit: str) -> bool:
        return work_key(commit) in self.work or commit in self.groups

    def _reserve(self, commits: list[str], plans: dict[str, Plan]) -> list[Work]:
        """New JOURNALLING records for the cells of the commits not already
        pending nor done; invisible until journalled."""
        # dict.fromkeys: drops repeats in order, without a quadratic scan.
        new = [c for c in dict.fromkeys(commits) if not self._pending_commit(c)
               and not self._finished(work_key(c))]
        works = [w for c in new for w in self._plan_works(c, plans.get(c, SINGLE_PLAN))]
        for work in works:
            self.work[work.key] = work
        return works

    def enqueue(self, commits: list[str], meta: dict | None = None,
                plans: dict[str, Plan] | None = None) -> list[str]:
        """Queue new commits durably, one unit of work per cell of each
        (``plans``: what the observer read of their matrices); return
        those that were new."""
        meta = meta or {}
        with self.cond:
            works = self._reserve(commits, plans or {})
            for work in works:
                work.meta = Meta(*meta[work.commit]) if work.commit in meta else None
            records = [r for w in works for r in self._records_of(w)]
        self.journal_and_queue(works, records)
        return list(dict.fromkeys(w.commit for w in works))

    def retest(self, targets: list[str]) -> list[str]:
        """Queue commits (every cell) or single cells (``<commit>:<cell>``)
        again even if they have a result (a "rebuild" of a flaky run); the
        new result replaces the file atomically.  A retest is a new round:
        results carrying an earlier round's token count as duplicates."""
        pruned = self.pruned_stones(targets)
        with self.cond:
            # Bounded: the pruner holds a commit here for one batch's unlinks.
            self.cond.wait_for(lambda: not any(work_key(key_commit(t)) in self.unlinking
                                               for t in targets), UNLINK_WAIT)
            works = [w for t in dict.fromkeys(targets)
                     for w in self._retest_works(t, pruned.get(key_commit(t)))]
            for work in works:
                self.work[work.key] = work
                work.retest = True
            records = [r for w in works for r in (*self._records_of(w),
                                                  retest_record(w.key))]
            # A retest of some cells: the others, done, named again (their
            # commit's result replayed away their earlier records), or a
            # restart would complete the commit from the retested alone.
            records += self._group_records({w.commit for w in works})
        self.journal_and_queue(works, records)
        return list(dict.fromkeys(w.key for w in works))

    def journal_and_queue(self, works: list[Work], records: list[str]) -> None:
        """The second half of ``enqueue`` and ``retest``: fsync the records
        outside the lock (nothing else waits on it, and the work is
        JOURNALLING, invisible, until it is done), then queue it (or, for
        a commit whose matrix could not be read, write its verdict)."""
        try:
            self.journal.append(records, sync=True)
        except BaseException:
            with self.cond:
                for work in works:
                    del self.work[work.key]
            raise
        with self.cond:
            for work in works:
                if work.retest:
                    self.done.discard(work.key)
                    self.pruned.discard(work.key)
                self._to_queue(work, head=False)
                # Work that must not run: an unreadable matrix, a conflict.
                self._write_unrunnable(work)

    # ---- assignment ------------------------------------------------------
    def next_assignment(self) -> Job | None:
        """Block until a commit and a free runner are both available; the
        claim (queue to job table, runner to running) is one step, and the
        assignment is journalled before it is returned to be sent."""
        while True:
            with self.cond:
                pick = self._wait_for_work()
                if pick is None:
                    return None
                runner, key, shard = pick
                shards = 1 if shard else self._shard_count(self.work[key])
                if shard or shards > 1:
                    job, records = self._assign_shard(runner, shards, key, shard)
                else:
                    job, records = self._assign_whole(runner, key)
            try:
                self.journal.append(records, sync=False)
            except OSError:
                # Unrecorded, the token could not be proved after a restart:
                # undo the claim rather than hand out an unjournalled job.
                log.exception("cannot journal the assignment of %s", job.commit[:12])
                self.unassign(job)
                self.cond_wait_a_bit()
                continue
            with self.cond:
                work = self.work.get(job.key)
                if job.shards and work and work.shards:
                    work.shards.journalled = True
            return job

    def _wait_for_work(self) -> tuple[Runner, WorkKey, int] | None:
        """(a free runner, the work it is to take, the waiting shard of it
        or 0) once there is work some free runner can take; None when
        stopping."""
        while not self.stopping:
            if self.queue or self.shard_queue:
                pick = self._pick()
                if pick:
                    return pick
            self.cond.wait()
        return None

    def _pick(self) -> tuple[Runner, WorkKey, int] | None:
        """Waiting shards first, then the queue, in order: the first that a
        free runner fits (a cell goes only to a runner with its labels)."""
        free = [r for r in self.runners.values() if r.free]
        if not free:
            return None
        for key, index in self.shard_queue:
            runner = next((r for r in free if fits(r.traits, self.work[key].cell)), None)
            if runner:
                return runner, key, index
        for key in itertools.islice(self.queue, MAX_SCAN):
            runner = next((r for r in free if fits(r.traits, self.work[key].cell)), None)
            if runner:
                return runner, key, 0
        return None

    def _assign_whole(self, runner: Runner, key: WorkKey) -> tuple[Job, list[str]]:
        take(self.queue, key)
        work = self.work[key]
        job = Job(work.commit, new_token(), runner.key, runner.address, time.monotonic(),
                  runner.name, request=self._request(work), key=work.key)
        work.move(WorkState.RUNNING)
        work.job = job
        runner.set(RUNNING, job)
        assignment = AssignmentRecord(job.token, runner.key, runner.name)
        work.assignments[job.token] = assignment
        self.token_keys[job.token] = work.key
        return job, [assign_record(work.key, assignment)]

    def unassign(self, job: Job) -> None:
        """Take back an assignment that could not be journalled."""
        with self.cond:
            work = self.work.get(job.key)
            if work:
                work.assignments.pop(job.token, None)
            if self._is_current(job):
                runner = self.runners.get(job.runner)
                if runner and runner.job is job:
                    runner.set(IDLE)
                self._lose(job, count=False)

    def _request(self, work: Work, index: int = 0) -> bytes:
        """The ``runtest`` body of a job: the commit's branch and whether
        it is trusted (decided now, by the current --trusted-branch, from
        the branch journalled with the commit; so a retest, a shard run
        again and a job recovered after a restart carry them too), and
        for a shard (``index`` > 0) its spec."""
        branch = work.branch
        if branch is not None and not BRANCH_RE.fullmatch(branch):
            branch = None  # (read back from an old result file): no scope to share
        shard_set = work.shards if index else None
        # Every shard of a set names the same tests (they pin the same files
        # to shard 1); a whole commit, the branch's failures as they are now.
        first = shard_set.first if shard_set else self.recent_failures.for_branch(branch)
        shard = sharding.ShardSpec(index, shard_set.total, {}, first, shard_set.table) \
            if shard_set else None
        cell = work.cell
        return jobspec.encode(jobspec.JobSpec(
            shard, branch, jobspec.trusted_branch(branch, self.trusted_branches),
            cell.name, cell.python, cell.axes, first, rules_commit(work)))

    def _is_current(self, job: Job) -> bool:
        work = self.work.get(job.key)
        if work is None:
            return False
        if job.shards:
            return work.shards is not None and work.shards.running.get(job.shard) is job
        return work.state is WorkState.RUNNING and work.job is job

    def cond_wait_a_bit(self, seconds: float = 0.5) -> None:
        with self.cond:
            if not self.stopping:
                self.cond.wait(seconds)

    def assignment_failed(self, job: Job, outcome: str) -> None:
        """The runner did not take the job (``busy``, ``refused``: its port
        is closed, ``unauthentic``: another key answers there, or
        ``error``): put the job back at the head."""
        with self.cond:
            if not self._is_current(job):
                return
            runner = self.runners.get(job.runner)
            if runner and runner.job is job:
                if outcome in ("refused", "unauthentic"):
                    # Nothing listens there, or not this runner: it is gone,
                    # not slow.
                    log.warning("runner %s %s; dropped (%d left)", runner.key,
                                "refused the connection" if outcome == "refused" else
                                "answered with another key", len(self.runners) - 1)
                    self.runners.pop(runner.key, None)
                    runner.set(IDLE)
                elif outcome == "busy":
                    runner.set(OCCUPIED, occupied_with="unknown")
                else:
                    runner.set(SUSPECT)
            self._lose(job, count=False)

    # ---- messages from runners ------------------------------------------
    def _check_token(self, work: Work | None, commit: str, token: str, name: str | None,
                     what: str) -> AssignmentRecord:
        a = work.assignments.get(token) if work else None
        if a is None:
            raise Reply(f"{what} for {commit[:12]} refused: no such assignment")
        if name is not None and a.name != name:
            raise Reply(f"{what} for {commit[:12]} refused: assigned to another runner")
        return a

    def release(self, commit: str, token: str, name: str | None = None) -> bool:
        """A runner that is stopping hands its job back unrun."""
        with self.cond:
            work = self._work(commit, token)
            job = work.current_job(token) if work else None
            if not job:
                raise Reply(f"release of {commit[:12]} refused: not the current assignment")
            if name is not None and job.name != name:
                raise Reply(f"release of {commit[:12]} refused: assigned to another runner")
            runner = self.runners.pop(job.runner, None)
            if runner:
                runner.set(IDLE)
            self._lose(job, count=False)
            return True

    def _keys_of(self, commit: str) -> list[WorkKey]:
        """Every key of a commit's work: its only cell's, or its cells'."""
        cells = self.groups.get(commit)
        return [work_key(commit, n) for n in cells] if cells else [work_key(commit)]

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
