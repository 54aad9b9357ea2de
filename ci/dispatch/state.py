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
lost runs (finish.py), the ``status``/``state`` views (views.py).

Lock order: ``self.cond`` first, then the journal's own lock.  Result
files and the journal's fsyncs are written outside ``self.cond`` where the
order allows (a claim under the lock, WRITING or JOURNALLING, makes the
commit invisible to the assignment loop while its file is written).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time

from ci import jobspec
from ci import sharding
from ci.dispatch.finish import ResultKeeper
from ci.dispatch.journal import (BRANCH_RE, AssignmentRecord, Journal, assign_record,
                                 lost_record, meta_record, queue_record, retest_record,
                                 shard_record)
from ci.dispatch.runners import IDLE, OCCUPIED, RUNNING, SUSPECT, Runner, RunnerRegistry
from ci.dispatch.shards import ShardPlanner
from ci.dispatch.views import StateViews
from ci.retention.tombstones import TombstoneFile
from ci.dispatch.work import Job, Meta, Work, WorkKey, WorkState, new_token, work_key
from ci.history.recent import RecentFailures
from ci.wire import ProtocolError, Reply, decode_fields, valid_full_commit

log = logging.getLogger(__name__)

# Live output kept per running job for ``log``.
TAIL_BYTES = 64 * 1024
# A retest waits at most this long for the pruner to finish unlinking one
# of its commits (one batch of unlinks: milliseconds).
UNLINK_WAIT = 30.0


def meta_from_result(results_dir: str, commit: str) -> Meta | None:
    """A retest keeps the branch and predecessor the first run had."""
    try:
        with open(os.path.join(results_dir, commit), "rb") as handle:
            head = handle.read(16 * 1024).partition(b"\n\n")[0]
        fields = decode_fields(head)
    except (OSError, ProtocolError):
        return None
    if "branch" not in fields:
        return None
    previous = fields.get("previous")
    return Meta(fields["branch"], previous if valid_full_commit(previous or "") else None)


class DispatcherState(RunnerRegistry, ShardPlanner, ResultKeeper, StateViews):
    """Every attribute is guarded by ``self.cond``.  Methods whose name
    starts with ``_`` expect the caller to hold it; every other method
    takes it itself (``enqueue``, ``retest``, ``journal_and_queue`` and
    ``record_result`` release it around their fsync or file write, so
    they must not be called with it held)."""

    def __init__(self, results_dir: str, journal: Journal, max_attempts: int):
        self.results_dir = results_dir
        self.journal = journal
        self.max_attempts = max_attempts
        self.cond = threading.Condition()
        # Every unfinished unit of work, by key; the QUEUED ones in FIFO
        # order in ``queue``, the shards waiting to run in ``shard_queue``.
        self.work: dict[WorkKey, Work] = {}
        self.queue: collections.deque[WorkKey] = collections.deque()
        self.shard_queue: collections.deque[tuple[WorkKey, int]] = collections.deque()
        self.runners: dict = {}
        self.done: set[WorkKey] = set()     # a result file exists
        # Pruned by --keep-results: no file, a tombstone (ci/retention/);
        # finished all the same, never queued again but by a retest.
        self.pruned: set[WorkKey] = set()
        # Pruned commits whose files are being unlinked (without the lock).
        self.unlinking: set[WorkKey] = set()
        self.tombstones: TombstoneFile | None = None
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
        # Called with (commit, Outcome) after a result file is on disk,
        # outside the lock (notifications); must not block.
        self.listeners: list = []
        # Called with (commit, branch, test id, seconds) when a running
        # commit's first test fails, outside the lock; must not block.
        self.failing_listeners: list = []

    # ---- the work table ---------------------------------------------------
    def _work(self, commit: str) -> Work | None:
        return self.work.get(work_key(commit))

    def state_of(self, commit: str) -> WorkState | None:
        """The state of a commit's work; None if it was never seen."""
        with self.cond:
            work = self._work(commit)
            if work is not None:
                return work.state
            return WorkState.DONE if self._finished(work_key(commit)) else None

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

    # ---- start-up -------------------------------------------------------
    def recover(self, grace: float = 0.0) -> None:
        """Rebuild the queue from the journal and the results folder.

        Commits that were running at the crash are held for ``grace``
        seconds: their runner, still running them, re-registers within a
        heartbeat and keeps them, so nothing is run twice."""
        with self.cond:
            self.done = {work_key(name) for name in os.listdir(self.results_dir)
                         if valid_full_commit(name)}
            if self.tombstones is not None:
                self.pruned = {work_key(c) for c in self.tombstones.load()} - self.done
            got = self.journal.replay()
            pending = [c for c in got.order
                       if not self._finished(work_key(c)) or c in got.retest]
            deadline = time.monotonic() + grace
            for commit in pending:
                self._recover_one(commit, got, grace, deadline)
            for commit in got.done:
                for a in got.assigned.get(commit, ()):
                    self._remember_finished(work_key(commit), a)
            self.journal.rewrite(self._pending_records())
            if pending:
                log.info("recovered %d commit(s) to test (%d were running; held %.1fs for "
                         "their runners)", len(pending), len(self._in_state(WorkState.HELD)),
                         grace)

    def _recover_one(self, commit: str, got, grace: float, deadline: float) -> None:
        key = work_key(commit)
        work = self.work[key] = Work(key, commit, WorkState.QUEUED,
                                     retest=commit in got.retest, losses=got.lost[commit])
        if commit in got.meta:
            work.meta = Meta(*got.meta[commit])
        self.done.discard(key)
        self.pruned.discard(key)
        history = got.assigned.get(commit)
        if history and commit in got.sharded:
            # Shard results are kept in memory only: a restart runs
            # the commit again, and late shard results are dropped.
            for a in history:
                self._remember_finished(key, a)
            history = None
        if history:
            work.assignments = {a.token: a for a in history}
        if history and grace > 0:
            work.state = WorkState.HELD   # made so, not a transition
            work.held_by, work.held_until = history[-1].runner, deadline
        else:
            self.queue.append(key)

    def _pending_records(self) -> list[str]:
        """The journal of what is unfinished: running first (they run
        again first after a crash), then held, queued, being written."""
        running = sorted(self._in_state(WorkState.RUNNING), key=lambda w: w.job.started)
        order = [*running, *self._in_state(WorkState.HELD),
                 *(self.work[k] for k in self.queue), *self._in_state(WorkState.WRITING),
                 *self._in_state(WorkState.SHARDED)]
        lines = []
        for work in order:
            lines.append(queue_record(work.commit))
            if work.shards is not None:
                lines.append(shard_record(work.commit, work.shards.total))
            if work.meta:
                lines.append(meta_record(work.commit, *work.meta))
            if work.retest:
                lines.append(retest_record(work.commit))
            lines.extend(assign_record(work.commit, a) for a in work.assignments.values())
            lines.extend(lost_record(work.commit) for _ in range(work.losses))
        return lines

    # ---- queueing -------------------------------------------------------
    def is_pending(self, commit: str) -> bool:
        """Queued, running or being written: its result is still to come."""
        with self.cond:
            return work_key(commit) in self.work

    def pending_commits(self) -> set[str]:
        """Every commit queued, running or being written (a snapshot)."""
        with self.cond:
            return {w.commit for w in self.work.values()}

    def remove_pruned(self, commits: list[str], remove, forget) -> list[str]:
        """Retention (ci/retention/pruner.py): for each commit still
        finished and not pending, ``remove(commit)`` deletes its files and
        it counts as pruned; ``forget(removed)`` is told (it must not
        block).  The lock is held only to pick the commits and mark them
        (pruned and ``unlinking``), not for the unlinks, which can wait on
        the file system's journal behind every result's fsync; a retest of
        a commit being unlinked waits until its files are gone, so a new
        result is never removed."""
        with self.cond:
            picked = [c for c in commits if self._mark_unlinking(work_key(c))]
        removed, failed = [], []
        try:
            for commit in picked:
                try:
                    remove(commit)
                    removed.append(commit)
                except OSError as exc:
                    log.warning("cannot prune %s: %s", commit[:12], exc)
                    failed.append(commit)
            if removed:
                forget(removed)      # before a retest can queue its new run
        finally:
            with self.cond:
                self._unlinked(picked, set(failed) | set(picked[len(removed) + len(failed):]))
        return removed

    def _mark_unlinking(self, key: WorkKey) -> bool:
        if key in self.work or key not in self.done:
            return False
        self.done.discard(key)
        self.pruned.add(key)
        self.unlinking.add(key)
        return True

    def _unlinked(self, picked: list[str], kept: set[str]) -> None:
        """The unlinks are over; a commit whose file stays is done again."""
        for commit in picked:
            key = work_key(commit)
            self.unlinking.discard(key)
            if commit in kept:
                self.pruned.discard(key)
                self.done.add(key)
        self.cond.notify_all()

    def forget_pruned(self, commits) -> None:
        """Tombstones trimmed from the file: their commits are forgotten
        here too, so the set stays as bounded as the file."""
        with self.cond:
            self.pruned.difference_update(work_key(c) for c in commits)

    def _reserve(self, commits: list[str], skip_done: bool) -> list[str]:
        """New JOURNALLING records for the commits not already pending
        (nor done, unless a retest); invisible until journalled."""
        # dict.fromkeys: drops repeats in order, without a quadratic scan.
        new = [c for c in dict.fromkeys(commits) if work_key(c) not in self.work
               and not (skip_done and self._finished(work_key(c)))]
        for commit in new:
            self.work[work_key(commit)] = Work(work_key(commit), commit)
        return new

    def enqueue(self, commits: list[str], meta: dict | None = None) -> list[str]:
        """Queue new commits durably; return those that were new."""
        meta = meta or {}
        with self.cond:
            new = self._reserve(commits, skip_done=True)
        records = []
        for commit in new:
            records.append(queue_record(commit))
            if commit in meta:
                records.append(meta_record(commit, *meta[commit]))
        self.journal_and_queue(new, records, {c: Meta(*meta[c]) for c in new if c in meta})
        return new

    def retest(self, commits: list[str]) -> list[str]:
        """Queue commits again even if they have a result (a "rebuild" of a
        flaky run); the new result replaces the file atomically.  A retest
        is a new round: results carrying an earlier round's token count as
        duplicates."""
        with self.cond:
            # Bounded: the pruner holds a commit here for one batch's unlinks.
            self.cond.wait_for(lambda: not any(work_key(c) in self.unlinking for c in commits),
                               UNLINK_WAIT)
            new = self._reserve(commits, skip_done=False)
        meta = {c: m for c in new if (m := self._retest_meta(c))}
        records = [r for c in new for r in (queue_record(c), retest_record(c))]
        records += [meta_record(c, *meta[c]) for c in meta]
        self.journal_and_queue(new, records, meta, retest=True)
        return new

    def _retest_meta(self, commit: str) -> Meta | None:
        """The branch and predecessor of the first run: from its result
        file, or from its tombstone if it was pruned."""
        meta = meta_from_result(self.results_dir, commit)
        if meta is None and self.tombstones is not None:
            found = self.tombstones.find(commit)
            if found is not None and found.branch:
                meta = Meta(found.branch, found.previous)
        return meta

    def journal_and_queue(self, commits: list[str], records: list[str], meta: dict,
                          retest: bool = False) -> None:
        """The second half of ``enqueue`` and ``retest``: fsync the records
        outside the lock (nothing else waits on it, and the commits are
        JOURNALLING, invisible, until it is done), then queue them."""
        try:
            self.journal.append(records, sync=True)
        except BaseException:
            with self.cond:
                for commit in commits:
                    del self.work[work_key(commit)]
            raise
        with self.cond:
            for commit in commits:
                work = self._work(commit)
                work.meta = meta.get(commit, work.meta)
                if retest:
                    self.done.discard(work.key)
                    self.pruned.discard(work.key)
                    work.retest = True
                self._to_queue(work, head=False)

    # ---- assignment ------------------------------------------------------
    def next_assignment(self) -> Job | None:
        """Block until a commit and a free runner are both available; the
        claim (queue to job table, runner to running) is one step, and the
        assignment is journalled before it is returned to be sent."""
        while True:
            with self.cond:
                runner = self._wait_for_work()
                if runner is None:
                    return None
                shards = 1 if self.shard_queue else self._shard_count()
                if self.shard_queue or shards > 1:
                    job, records = self._assign_shard(runner, shards)
                else:
                    job, records = self._assign_whole(runner)
            try:
                self.journal.append(records, sync=False)
            except OSError:
                # Unrecorded, the token could not be proved after a restart:
                # undo the claim rather than hand out an unjournalled job.
                log.exception("cannot journal the assignment of %s", job.commit[:12])
                self._unassign(job)
                self.cond_wait_a_bit()
                continue
            with self.cond:
                work = self._work(job.commit)
                if job.shards and work and work.shards:
                    work.shards.journalled = True
            return job

    def _wait_for_work(self) -> Runner | None:
        """A free runner once there is work for it; None when stopping."""
        while not self.stopping:
            if self.queue or self.shard_queue:
                runner = next((r for r in self.runners.values() if r.free), None)
                if runner:
                    return runner
            self.cond.wait()
        return None

    def _assign_whole(self, runner: Runner) -> tuple[Job, list[str]]:
        work = self.work[self.queue.popleft()]
        job = Job(work.commit, new_token(), runner.key, runner.address, time.monotonic(),
                  runner.name, request=self._request(work))
        work.move(WorkState.RUNNING)
        work.job = job
        runner.set(RUNNING, job)
        assignment = AssignmentRecord(job.token, runner.key, runner.name)
        work.assignments[job.token] = assignment
        return job, [assign_record(work.commit, assignment)]

    def _unassign(self, job: Job) -> None:
        """Take back an assignment that could not be journalled."""
        with self.cond:
            work = self._work(job.commit)
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
        return jobspec.encode(branch, jobspec.trusted_branch(branch, self.trusted_branches),
                              (index, shard_set.total) if shard_set else None,
                              shard_set.table if shard_set else b"", failing_first=first)

    def _is_current(self, job: Job) -> bool:
        work = self._work(job.commit)
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
        is closed, or ``error``): put the job back at the head."""
        with self.cond:
            if not self._is_current(job):
                return
            runner = self.runners.get(job.runner)
            if runner and runner.job is job:
                if outcome == "refused":
                    # Nothing listens there: the runner is gone, not slow.
                    log.warning("runner %s refused the connection; dropped (%d left)",
                                runner.key, len(self.runners) - 1)
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
            work = self._work(commit)
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

    def progress(self, commit: str, token: str, name: str | None, data: bytes) -> None:
        with self.cond:
            work = self._work(commit)
            job = work.current_job(token) if work else None
            if not job or (name is not None and job.name != name):
                raise Reply(f"progress for {commit[:12]} refused: not the current assignment")
            work.tail += data[-TAIL_BYTES:]
            if len(work.tail) > TAIL_BYTES:
                del work.tail[:len(work.tail) - TAIL_BYTES]

    def first_failure(self, commit: str, token: str, name: str | None, test: str,
                      after: float) -> bool:
        """A running job's tests just had their first failure: kept for
        the ``state`` view and put in the live output; True the first time
        for this commit's run (a second shard's, or a resend, changes
        nothing), when the early listeners are told (outside the lock)."""
        with self.cond:
            work = self._work(commit)
            job = work.current_job(token) if work else None
            if not job or (name is not None and job.name != name):
                raise Reply(f"failing for {commit[:12]} refused: not the current assignment")
            if work.failing is not None:
                return False
            work.failing = (test, after)
            line = f"\n[ci] first failing test: {test} (after {after:.1f}s)\n"
            work.tail += line.encode("utf-8", "replace")
            if len(work.tail) > TAIL_BYTES:
                del work.tail[:len(work.tail) - TAIL_BYTES]
            meta = work.meta
        for listener in self.failing_listeners:
            try:
                listener(commit, meta.branch if meta else None, test, after)
            except Exception:
                log.exception("failing listener failed for %s", commit[:12])
        return True

    def log_tail(self, commit: str) -> bytes | None:
        """The live output of a running commit; None when it is not running."""
        with self.cond:
            work = self._work(commit)
            if work is None or (work.state is not WorkState.RUNNING and work.shards is None):
                return None
            return bytes(work.tail)

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
