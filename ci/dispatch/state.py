"""The dispatcher's shared state: queue, runners, running jobs, finished
commits; one object behind one condition, with no sockets, so that every
interleaving of handlers, the assignment loop and the health sweep can be
reproduced in-process.

Job ownership is explicit.  Every assignment of a commit to a runner has
an unguessable token, sent with ``runtest`` and journalled before it is
sent; ``results``, ``release`` and ``progress`` for a commit count only
with the token of an assignment that really happened (and, with issued
keys, only from the runner it was given to).  A runner is in exactly one
state:

    idle      free for work
    running   running ``job`` (ours)
    occupied  busy with work we did not (or no longer) give it: a job that
              was reassigned or finished elsewhere, or a run from before a
              restart; it is offered nothing until it says it is idle
    suspect   a ``runtest`` could not be delivered; waits for a good ping

Lock order: ``self.cond`` first, then the journal's own lock.  Result
files and the journal's fsyncs are written outside ``self.cond`` where the
order allows (a claim under the lock makes the commit invisible to the
assignment loop while its file is written).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import os
import secrets
import threading
import time

from ci import jobspec
from ci.outcome import Outcome
from ci import sharding
from ci import state_schema
from ci.dispatch.journal import (BRANCH_RE, Assignment, Journal, assign_record, meta_record,
                                 shard_record)
from ci.wire import ProtocolError, Reply, decode_fields, format_address, valid_full_commit

log = logging.getLogger(__name__)

IDLE, RUNNING, OCCUPIED, SUSPECT = "idle", "running", "occupied", "suspect"
# The journal is rewritten once this many records are superseded.
COMPACT_AFTER = 10_000
# Beyond a runner's own limits: time to send its result.
REPORT_GRACE = 30.0
# Live output kept per running job for ``log``.
TAIL_BYTES = 64 * 1024
# Tokens of finished assignments remembered, so a late duplicate is told
# "duplicate" rather than refused as a forgery.
FINISHED_TOKENS = 20_000


@dataclasses.dataclass
class Job:
    commit: str
    token: str
    runner: str                 # the runner's key (host:port)
    address: tuple[str, int]
    started: float
    name: str | None = None     # the runner's issued-key name
    shard: int = 0              # 1..shards for one shard of a sharded commit
    shards: int = 0             # 0: the whole commit
    request: bytes = b""        # the ``runtest`` body: branch, trust, a shard's spec


@dataclasses.dataclass
class ShardSet:
    """A commit split over runners: each shard is an assignment with its own
    token; the result is written once every shard has reported."""
    total: int
    table: bytes                            # the durations every shard gets
    tokens: dict = dataclasses.field(default_factory=dict)    # token -> shard
    running: dict = dataclasses.field(default_factory=dict)   # shard -> Job
    reports: dict = dataclasses.field(default_factory=dict)   # shard -> Outcome
    journalled: bool = False                # its ``S`` record is in the journal


@dataclasses.dataclass
class Runner:
    key: str
    address: tuple[str, int]
    instance: str
    name: str | None = None
    state: str = IDLE
    job: Job | None = None              # set exactly when state == RUNNING
    occupied_with: str | None = None    # what an occupied runner is busy with
    misses: int = 0
    # The longest a job may take by the runner's own limits, if it said.
    limit: float | None = None
    label: str | None = None            # the name it gave itself (display only)

    @property
    def free(self) -> bool:
        return self.state == IDLE

    def set(self, state: str, job: Job | None = None, occupied_with: str | None = None):
        self.state, self.job, self.occupied_with = state, job, occupied_with


def new_token() -> str:
    return secrets.token_hex(16)


def now_stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class DispatcherState:
    """All containers are guarded by ``self.cond``; public methods take it,
    methods starting with ``_`` expect the caller to hold it."""

    def __init__(self, results_dir: str, journal: Journal, max_attempts: int):
        self.results_dir = results_dir
        self.journal = journal
        self.max_attempts = max_attempts
        self.cond = threading.Condition()
        self.queue: collections.deque[str] = collections.deque()
        self.queued: set[str] = set()
        # Commits that were running at a crash, kept back for their runner
        # to re-register and claim them: commit -> (runner key, deadline).
        self.held: dict[str, tuple[str, float]] = {}
        self.jobs: dict[str, Job] = {}
        self.runners: dict[str, Runner] = {}
        self.done: set[str] = set()
        self.writing: set[str] = set()      # claimed by a result being written
        self.journalling: set[str] = set()  # being queued, fsync in progress
        self.lost: collections.Counter = collections.Counter()
        self.retests: set[str] = set()
        self.meta: dict[str, tuple[str, str | None]] = {}
        self.assignments: dict[str, dict[str, Assignment]] = {}
        # (commit, token) -> Assignment, for rounds that are over.
        self.finished_tokens: collections.OrderedDict = collections.OrderedDict()
        self.tails: dict[str, bytearray] = {}
        # Sharding (--max-shards): commits split over runners, the shards
        # waiting to run (again), and what results taught about durations.
        self.max_shards = 1
        # No shard shorter than this by the known durations (0: no check).
        self.min_shard_seconds = 1.0
        self.shard_sets: dict[str, ShardSet] = {}
        self.shard_queue: collections.deque[tuple[str, int]] = collections.deque()
        self.durations = sharding.Durations()
        # --trusted-branch: whose environments every commit may reuse.
        self.trusted_branches = jobspec.DEFAULT_TRUSTED_BRANCHES
        self.stopping = False
        self.completed = 0
        # Called with (commit, Outcome) after a result file is on disk,
        # outside the lock (notifications); must not block.
        self.listeners: list = []

    # ---- start-up -------------------------------------------------------
    def recover(self, grace: float = 0.0) -> None:
        """Rebuild the queue from the journal and the results folder.

        Commits that were running at the crash are held for ``grace``
        seconds: their runner, still running them, re-registers within a
        heartbeat and keeps them, so nothing is run twice."""
        with self.cond:
            self.done = {name for name in os.listdir(self.results_dir)
                         if valid_full_commit(name)}
            got = self.journal.replay()
            pending = [c for c in got.order if c not in self.done or c in got.retest]
            self.retests = got.retest & set(pending)
            self.done -= self.retests
            self.meta = {c: got.meta[c] for c in pending if c in got.meta}
            self.lost.update({c: n for c, n in got.lost.items() if c in pending})
            deadline = time.monotonic() + grace
            for commit in pending:
                history = got.assigned.get(commit)
                if history and commit in got.sharded:
                    # Shard results are kept in memory only: a restart runs
                    # the commit again, and late shard results are dropped.
                    for a in history:
                        self._remember_finished(commit, a)
                    history = None
                if history:
                    self.assignments[commit] = {a.token: a for a in history}
                if history and grace > 0:
                    self.held[commit] = (history[-1].runner, deadline)
                else:
                    self.queue.append(commit)
                    self.queued.add(commit)
            for commit in got.done:
                for a in got.assigned.get(commit, ()):
                    self._remember_finished(commit, a)
            self.journal.rewrite(self._pending_records())
            if pending:
                log.info("recovered %d commit(s) to test (%d were running; held %.1fs for "
                         "their runners)", len(pending), len(self.held), grace)

    def _pending_records(self) -> list[str]:
        lines = []
        for commit in [*self.jobs, *self.held, *self.queue, *self.writing,
                       *self.shard_sets]:
            lines.append(f"Q {commit}")
            if commit in self.shard_sets:
                lines.append(shard_record(commit, self.shard_sets[commit].total))
            if commit in self.meta:
                branch, previous = self.meta[commit]
                lines.append(meta_record(commit, branch, previous))
            if commit in self.retests:
                lines.append(f"R {commit}")
            lines.extend(assign_record(commit, a)
                         for a in self.assignments.get(commit, {}).values())
            lines.extend(f"L {commit}" for _ in range(self.lost.get(commit, 0)))
        return lines

    # ---- queueing -------------------------------------------------------
    def _known(self, commit: str) -> bool:
        return (commit in self.queued or commit in self.jobs or commit in self.held
                or commit in self.writing or commit in self.journalling
                or commit in self.shard_sets)

    def is_pending(self, commit: str) -> bool:
        """Queued, running or being written: its result is still to come."""
        with self.cond:
            return self._known(commit)

    def enqueue(self, commits: list[str], meta: dict | None = None) -> list[str]:
        """Queue new commits durably; return those that were new."""
        meta = meta or {}
        with self.cond:
            # dict.fromkeys: drops repeats in order, without a quadratic scan.
            new = list(dict.fromkeys(c for c in commits
                                     if not self._known(c) and c not in self.done))
            self.journalling.update(new)
        records = []
        for commit in new:
            records.append(f"Q {commit}")
            if commit in meta:
                records.append(meta_record(commit, *meta[commit]))
        self._queue_durably(new, records, {c: meta[c] for c in new if c in meta})
        return new

    def retest(self, commits: list[str]) -> list[str]:
        """Queue commits again even if they have a result (a "rebuild" of a
        flaky run); the new result replaces the file atomically.  A retest
        is a new round: results carrying an earlier round's token count as
        duplicates."""
        with self.cond:
            new = list(dict.fromkeys(c for c in commits if not self._known(c)))
            self.journalling.update(new)
        meta = {c: m for c in new if (m := self._meta_from_result(c))}
        records = [f"{kind} {c}" for c in new for kind in "QR"]
        records += [meta_record(c, *meta[c]) for c in meta]
        self._queue_durably(new, records, meta, retest=True)
        return new

    def _meta_from_result(self, commit: str) -> tuple[str, str | None] | None:
        """A retest keeps the branch and predecessor the first run had."""
        try:
            with open(os.path.join(self.results_dir, commit), "rb") as handle:
                head = handle.read(16 * 1024).partition(b"\n\n")[0]
            fields = decode_fields(head)
        except (OSError, ProtocolError):
            return None
        if "branch" not in fields:
            return None
        previous = fields.get("previous")
        return fields["branch"], previous if valid_full_commit(previous or "") else None

    def _queue_durably(self, commits, records, meta, retest=False) -> None:
        # fsync outside the condition: nothing else waits on it, and the
        # commits are invisible (journalling) until it is done.
        try:
            self.journal.append(records, sync=True)
        except BaseException:
            with self.cond:
                self.journalling.difference_update(commits)
            raise
        with self.cond:
            self.journalling.difference_update(commits)
            self.meta.update(meta)
            for commit in commits:
                if retest:
                    self.done.discard(commit)
                    self.retests.add(commit)
                    self.lost.pop(commit, None)
                    for a in self.assignments.pop(commit, {}).values():
                        self._remember_finished(commit, a)
                self.queue.append(commit)
                self.queued.add(commit)
            if commits:
                self.cond.notify_all()

    # ---- runners --------------------------------------------------------
    def register(self, address: tuple[str, int], instance: str, busy: str | None,
                 token: str | None = None, name: str | None = None,
                 limit: float | None = None) -> str:
        key = format_address(address)
        with self.cond:
            runner = self.runners.get(key)
            if runner and name and runner.name and runner.name != name:
                raise Reply(f"address {key} is registered by another runner")
            if name:
                # One address per runner key: a stolen key must not be able
                # to take the runner's work to an address of the thief's.
                # A runner that really moved (restarted on another port) is
                # accepted once its old address stops answering pings.
                for other in self.runners.values():
                    if other.name == name and other.key != key:
                        raise Reply(f"runner {name} is registered at {other.key}; another "
                                    "address is accepted once that one stops answering")
            if runner and runner.instance == instance:
                runner.misses = 0
                runner.limit = limit
                self._believe(runner, busy, token)
                return "known"
            if runner:
                # The runner restarted: whatever it was running is gone.
                log.warning("runner %s restarted%s", key, f" while running "
                            f"{runner.job.commit[:12]}; requeueing" if runner.job else "")
                self._drop(runner, count=True)
            runner = self.runners[key] = Runner(key, address, instance, name, limit=limit)
            if busy is not None:
                runner.set(OCCUPIED, occupied_with=busy)
                self._adopt(runner, busy, token)
            self._release_held_of(key)
            self.cond.notify_all()
            log.info("runner %s registered%s (%d runners)", key,
                     f" while busy with {busy[:12]}" if busy else "", len(self.runners))
            return "registered"

    def label_runner(self, address: tuple[str, int], label: str | None) -> None:
        """The name a registered runner gave itself, shown for it by
        ``state`` instead of its address.  It proves nothing (unlike an
        issued key's name), so it is only ever shown."""
        with self.cond:
            runner = self.runners.get(format_address(address))
            if runner is not None:
                runner.label = label

    def _believe(self, runner: Runner, busy: str | None, token: str | None) -> None:
        """A live runner's own word on what it runs beats our guess: a
        ``runtest`` whose reply was lost may well have been taken."""
        if busy is None:
            if runner.state in (SUSPECT, OCCUPIED):
                runner.set(IDLE)
                self.cond.notify_all()
        elif runner.state in (SUSPECT, IDLE):
            runner.set(OCCUPIED, occupied_with=busy)
            self._adopt(runner, busy, token)

    def _adopt(self, runner: Runner, commit: str, token: str | None) -> None:
        """A runner that is still running a commit we would otherwise run
        again keeps it, if it proves the assignment with its token."""
        a = self.assignments.get(commit, {}).get(token or "")
        if a is None or (a.name and a.name != runner.name):
            return
        shard_set = self.shard_sets.get(commit)
        if shard_set is not None and a.token in shard_set.tokens:
            self._adopt_shard(runner, commit, a, shard_set)
            return
        if commit in self.held:
            del self.held[commit]
        elif commit in self.queued:
            self.queue.remove(commit)
            self.queued.discard(commit)
        else:
            return
        job = Job(commit, a.token, runner.key, runner.address, time.monotonic(), runner.name,
                  request=self._request(commit))
        self.jobs[commit] = job
        runner.set(RUNNING, job)
        log.info("runner %s is still running %s; adopted", runner.key, commit[:12])

    def _adopt_shard(self, runner: Runner, commit: str, a: Assignment,
                     shard_set: ShardSet) -> None:
        """The same for one shard waiting to run again (its ``runtest``
        reply was lost, but the runner took it)."""
        index = shard_set.tokens[a.token]
        if (commit, index) not in self.shard_queue:
            return
        self.shard_queue.remove((commit, index))
        job = Job(commit, a.token, runner.key, runner.address, time.monotonic(), runner.name,
                  index, shard_set.total, self._request(commit, index, shard_set))
        shard_set.running[index] = job
        runner.set(RUNNING, job)
        log.info("runner %s is still running shard %d/%d of %s; adopted", runner.key, index,
                 shard_set.total, commit[:12])

    def _release_held_of(self, key: str) -> None:
        """The runner that held these commits is back and not running them:
        no need to wait out the grace period."""
        for commit, (holder, _) in list(self.held.items()):
            if holder == key:
                del self.held[commit]
                self._requeue(commit, head=True)

    def release_held(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self.cond:
            for commit, (holder, deadline) in list(self.held.items()):
                if now >= deadline:
                    del self.held[commit]
                    log.info("runner %s did not come back for %s; requeueing", holder,
                             commit[:12])
                    self._requeue(commit, head=True)

    def _drop(self, runner: Runner, count: bool) -> None:
        self.runners.pop(runner.key, None)
        if runner.job:
            self._lose(runner.job, count=count)
        runner.set(IDLE)

    # ---- assignment ------------------------------------------------------
    def next_assignment(self) -> Job | None:
        """Block until a commit and a free runner are both available; the
        claim (queue to job table, runner to running) is one step, and the
        assignment is journalled before it is returned to be sent."""
        while True:
            with self.cond:
                while True:
                    if self.stopping:
                        return None
                    if self.queue or self.shard_queue:
                        runner = next((r for r in self.runners.values() if r.free), None)
                        if runner:
                            break
                    self.cond.wait()
                shards = 1 if self.shard_queue else self._shard_count()
                if self.shard_queue or shards > 1:
                    job, records = self._assign_shard(runner, shards)
                    commit, assignment = job.commit, None
                else:
                    commit = self.queue.popleft()
                    self.queued.discard(commit)
                    job = Job(commit, new_token(), runner.key, runner.address,
                              time.monotonic(), runner.name, request=self._request(commit))
                    runner.set(RUNNING, job)
                    self.jobs[commit] = job
                    assignment = Assignment(job.token, runner.key, runner.name)
                    self.assignments.setdefault(commit, {})[job.token] = assignment
                    records = [assign_record(commit, assignment)]
            try:
                self.journal.append(records, sync=False)
                if job.shards:
                    with self.cond:
                        if job.commit in self.shard_sets:
                            self.shard_sets[job.commit].journalled = True
                return job
            except OSError:
                # Unrecorded, the token could not be proved after a restart:
                # undo the claim rather than hand out an unjournalled job.
                log.exception("cannot journal the assignment of %s", commit[:12])
                with self.cond:
                    self.assignments.get(commit, {}).pop(job.token, None)
                    if self._is_current(job):
                        runner.set(IDLE)
                        self._lose(job, count=False)
                self.cond_wait_a_bit()

    # ---- shards -----------------------------------------------------------
    def _shard_count(self) -> int:
        """How many shards the queue's next commit gets: only when more
        runners are free than commits are queued (a burst goes whole), each
        queued commit keeping a runner of its own."""
        if self.max_shards < 2 or not self.queue:
            return 1
        free = sum(r.free for r in self.runners.values())
        if free <= len(self.queue):
            return 1
        count = min(self.max_shards, free - len(self.queue) + 1)
        known = self.durations.table
        if known and self.min_shard_seconds > 0:
            # What the last runs taught: a short suite, or one of a single
            # test class, would only pay the shards' checkouts and start-ups
            # (the tail of a burst of a 1 s suite got slower when split).
            worth = min(len(known), int(sum(known.values()) // self.min_shard_seconds))
            count = min(count, max(worth, 1))
        return count

    def _assign_shard(self, runner: Runner, total: int) -> tuple[Job, list[str]]:
        """Give ``runner`` the next waiting shard, or split the next commit
        and give it shard 1.  Returns the job and its journal records (the
        ``S`` record first, before any shard's ``runtest`` is sent)."""
        if self.shard_queue:
            commit, index = self.shard_queue.popleft()
        else:
            commit = self.queue.popleft()
            self.queued.discard(commit)
            self.shard_sets[commit] = ShardSet(total, self.durations.encode())
            self.shard_queue.extend((commit, i) for i in range(2, total + 1))
            index = 1
            log.info("commit %s split into %d shards", commit[:12], total)
        shard_set = self.shard_sets[commit]
        job = Job(commit, new_token(), runner.key, runner.address, time.monotonic(),
                  runner.name, index, shard_set.total, self._request(commit, index, shard_set))
        runner.set(RUNNING, job)
        shard_set.running[index] = job
        shard_set.tokens[job.token] = index
        assignment = Assignment(job.token, runner.key, runner.name)
        self.assignments.setdefault(commit, {})[job.token] = assignment
        records = [assign_record(commit, assignment)]
        if not shard_set.journalled:
            records.insert(0, shard_record(commit, shard_set.total))
        if self.shard_queue:
            self.cond.notify_all()
        return job, records

    def _request(self, commit: str, index: int = 0, shard_set: ShardSet | None = None) -> bytes:
        """The ``runtest`` body of a job: the commit's branch and whether
        it is trusted (decided now, by the current --trusted-branch, from
        the branch journalled with the commit; so a retest, a shard run
        again and a job recovered after a restart carry them too), and
        for a shard its spec."""
        branch = self.meta.get(commit, (None, None))[0]
        if branch is not None and not BRANCH_RE.fullmatch(branch):
            branch = None  # (read back from an old result file): no scope to share
        return jobspec.encode(branch, jobspec.trusted_branch(branch, self.trusted_branches),
                              (index, shard_set.total) if shard_set else None,
                              shard_set.table if shard_set else b"")

    def _is_current(self, job: Job) -> bool:
        if job.shards:
            shard_set = self.shard_sets.get(job.commit)
            return shard_set is not None and shard_set.running.get(job.shard) is job
        return self.jobs.get(job.commit) is job

    def _current_job(self, commit: str, token: str) -> Job | None:
        """The running job (whole, or one shard) ``token`` belongs to."""
        job = self.jobs.get(commit)
        if job and job.token == token:
            return job
        shard_set = self.shard_sets.get(commit)
        if shard_set:
            job = shard_set.running.get(shard_set.tokens.get(token, 0))
            if job and job.token == token:
                return job
        return None

    def _shard_jobs(self) -> list[Job]:
        return [j for s in self.shard_sets.values() for j in s.running.values()]

    def _lose_shard(self, job: Job, count: bool) -> None:
        """A shard lost its runner: that shard alone runs again, first."""
        shard_set = self.shard_sets.get(job.commit)
        if shard_set is None or shard_set.running.get(job.shard) is not job:
            return
        del shard_set.running[job.shard]
        if job.shard in shard_set.reports:
            return
        if count and self._count_loss(job):
            return
        log.info("shard %d/%d of %s runs again", job.shard, job.shards, job.commit[:12])
        self.shard_queue.appendleft((job.commit, job.shard))
        self.cond.notify_all()

    def _record_shard(self, commit: str, token: str,
                      outcome: Outcome) -> Outcome | None | bool:
        """Keep one shard's result; when it is the last, claim the commit
        and return the merged outcome.  False: a duplicate; None:
        stored, shards still missing."""
        shard_set = self.shard_sets[commit]
        index = shard_set.tokens[token]
        if index in shard_set.reports:
            return False
        shard_set.reports[index] = outcome
        if (commit, index) in self.shard_queue:
            self.shard_queue.remove((commit, index))
        job = shard_set.running.pop(index, None)
        if job and job.token != token:
            holder = self.runners.get(job.runner)
            if holder and holder.job is job:
                holder.set(OCCUPIED, occupied_with=commit)
        if len(shard_set.reports) < shard_set.total:
            return None
        self.writing.add(commit)
        del self.shard_sets[commit]
        return sharding.merge(shard_set.total, shard_set.reports)

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
    def _check_token(self, commit: str, token: str, name: str | None,
                     what: str) -> Assignment:
        a = self.assignments.get(commit, {}).get(token)
        if a is None:
            raise Reply(f"{what} for {commit[:12]} refused: no such assignment")
        if name is not None and a.name != name:
            raise Reply(f"{what} for {commit[:12]} refused: assigned to another runner")
        return a

    def release(self, commit: str, token: str, name: str | None = None) -> bool:
        """A runner that is stopping hands its job back unrun."""
        with self.cond:
            job = self._current_job(commit, token)
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
            job = self._current_job(commit, token)
            if not job or (name is not None and job.name != name):
                raise Reply(f"progress for {commit[:12]} refused: not the current assignment")
            tail = self.tails.setdefault(commit, bytearray())
            tail += data[-TAIL_BYTES:]
            if len(tail) > TAIL_BYTES:
                del tail[:len(tail) - TAIL_BYTES]

    def log_tail(self, commit: str) -> bytes | None:
        """The live output of a running commit; None when it is not running."""
        with self.cond:
            if commit not in self.jobs and commit not in self.shard_sets:
                return None
            return bytes(self.tails.get(commit, b""))

    def record_result(self, commit: str, token: str, name: str | None,
                      outcome: Outcome) -> bool:
        """Write the verdict if this is the first result of a real
        assignment; False for a duplicate; Reply if the token proves no
        assignment (a forgery, or a result from a round before a retest
        that is long forgotten)."""
        with self.cond:
            a = self.finished_tokens.get((commit, token))
            if a is not None:
                if name is not None and a.name != name:
                    raise Reply(f"result for {commit[:12]} refused: assigned to another runner")
                self._free_after_result(commit, token, a)
                return False
            a = self._check_token(commit, token, name, "result")
            self._free_after_result(commit, token, a)
            if commit in self.done or commit in self.writing:
                return False
            if self.max_shards > 1:
                self.durations.learn(outcome.records)
            shard_set = self.shard_sets.get(commit)
            holder_job = None
            if shard_set is not None and token in shard_set.tokens:
                merged = self._record_shard(commit, token, outcome)
                if not merged:
                    return merged is None
                outcome = merged  # the last shard: claimed, all merged
            else:
                shard_set = None
                # Claim: out of the queue and the job table, so the
                # assignment loop cannot hand it out again while the file
                # is written without the lock.
                self.writing.add(commit)
                self._unqueue(commit)
                self.held.pop(commit, None)
                holder_job = self.jobs.pop(commit, None)
                if holder_job:
                    holder = self.runners.get(holder_job.runner)
                    if holder and holder.job is holder_job and holder_job.token != token:
                        # Still running it elsewhere: busy, but not with our work.
                        holder.set(OCCUPIED, occupied_with=commit)
            outcome = self._complete_fields(commit, outcome)
        try:
            self.write_result(commit, outcome)
        except BaseException:
            with self.cond:
                self.writing.discard(commit)
                if shard_set is not None:
                    self._unclaim_shards(commit, token, shard_set)
                else:
                    self._unclaim(commit, holder_job)
                self.cond.notify_all()
            raise
        with self.cond:
            self.writing.discard(commit)
            self._finish(commit, outcome.verdict)
        self._tell(commit, outcome)
        return True

    def _unclaim(self, commit: str, holder_job: Job | None) -> None:
        """The result could not be written: the commit is to be run again,
        by the runner still running it if there is one."""
        holder = self.runners.get(holder_job.runner) if holder_job else None
        if holder and holder.state == OCCUPIED and holder.occupied_with == commit:
            holder.set(RUNNING, holder_job)
            self.jobs[commit] = holder_job
        else:
            self._requeue(commit, head=True)

    def _unclaim_shards(self, commit: str, token: str, shard_set: ShardSet) -> None:
        """The merged result could not be written: the last shard's report
        is dropped and that shard runs again (unless its runner's resend,
        told ``busy``, comes first and completes the set)."""
        index = shard_set.tokens[token]
        shard_set.reports.pop(index, None)
        self.shard_sets[commit] = shard_set
        self.shard_queue.appendleft((commit, index))

    def _free_after_result(self, commit: str, token: str, a: Assignment) -> None:
        """The sender has finished this run: it is free again, whether or
        not its result is the one kept."""
        runner = self.runners.get(a.runner)
        if runner is None:
            return
        if (runner.state == RUNNING and runner.job.commit == commit
                and runner.job.token == token) or \
                (runner.state == OCCUPIED and runner.occupied_with in (commit, "unknown")) or \
                runner.state == SUSPECT:
            if runner.state == RUNNING:
                self.jobs.pop(commit, None)
            runner.set(IDLE)
            runner.misses = 0
            self.cond.notify_all()

    def _complete_fields(self, commit: str, outcome: Outcome) -> Outcome:
        """The dispatcher's own header fields: the commit, and the branch
        and previous commit the observer named."""
        added = {"commit": commit}
        if commit in self.meta:
            branch, previous = self.meta[commit]
            added["branch"] = branch
            if previous:
                added["previous"] = previous
        return outcome.with_header(**added)

    def write_result(self, commit: str, outcome: Outcome) -> None:
        """The result file is the proof a commit is done: written last,
        after the per-test JUnit file (see ``Outcome.write``)."""
        outcome.write(self.results_dir, commit)

    def _tell(self, commit: str, outcome: Outcome) -> None:
        for listener in self.listeners:
            try:
                listener(commit, outcome)
            except Exception:
                log.exception("result listener failed for %s", commit[:12])

    def _finish(self, commit: str, verdict: str | None) -> None:
        """Bookkeeping once ``commit``'s result file is on disk."""
        self.completed += 1
        self.done.add(commit)
        self.retests.discard(commit)
        self._unqueue(commit)
        self.held.pop(commit, None)
        job = self.jobs.pop(commit, None)
        if job:
            holder = self.runners.get(job.runner)
            if holder and holder.job is job:
                holder.set(OCCUPIED, occupied_with=commit)
        shard_set = self.shard_sets.pop(commit, None)
        if shard_set:
            # Given up: shards still running are no longer ours.
            for shard_job in shard_set.running.values():
                holder = self.runners.get(shard_job.runner)
                if holder and holder.job is shard_job:
                    holder.set(OCCUPIED, occupied_with=commit)
            for entry in [e for e in self.shard_queue if e[0] == commit]:
                self.shard_queue.remove(entry)
        for a in self.assignments.pop(commit, {}).values():
            self._remember_finished(commit, a)
        self.lost.pop(commit, None)
        self.meta.pop(commit, None)
        self.tails.pop(commit, None)
        self.cond.notify_all()
        try:
            self.journal.append([f"D {commit}"], sync=False)
            # Not while a dispatch's records are being fsynced outside the
            # lock: the rewrite would drop them after they were answered.
            if not self.journalling and self.journal.records > COMPACT_AFTER and \
                    self.journal.records > 4 * (
                    len(self.queue) + len(self.jobs) + len(self.held)):
                self.journal.rewrite(self._pending_records())
        except OSError:
            # The result file alone proves the commit done at the next start.
            log.exception("cannot journal the end of %s", commit[:12])
        log.info("result for %s: %s", commit[:12], verdict)

    def _remember_finished(self, commit: str, a: Assignment) -> None:
        self.finished_tokens[(commit, a.token)] = a
        while len(self.finished_tokens) > FINISHED_TOKENS:
            self.finished_tokens.popitem(last=False)

    def _unqueue(self, commit: str) -> None:
        if commit in self.queued:
            self.queued.discard(commit)
            self.queue.remove(commit)

    def _requeue(self, commit: str, head: bool) -> None:
        if commit in self.done or self._known(commit):
            return
        if head:
            self.queue.appendleft(commit)
        else:
            self.queue.append(commit)
        self.queued.add(commit)
        self.cond.notify_all()

    def _lose(self, job: Job, count: bool) -> None:
        """Take a job away from its runner; requeue it unless it is poison."""
        if job.shards:
            self._lose_shard(job, count)
            return
        if self.jobs.get(job.commit) is job:
            del self.jobs[job.commit]
        self.tails.pop(job.commit, None)
        if job.commit in self.done or job.commit in self.writing:
            return
        if count and self._count_loss(job):
            return
        self._requeue(job.commit, head=True)

    def _count_loss(self, job: Job) -> bool:
        """One more run of the commit lost its runner; True when that was
        the last allowed and the commit got its ``error`` verdict."""
        self.lost[job.commit] += 1
        try:
            self.journal.append([f"L {job.commit}"], sync=False)
        except OSError:
            # The count is a poison guard only: run it again all the same.
            log.exception("cannot journal the lost run of %s", job.commit[:12])
        return self.lost[job.commit] >= self.max_attempts and self._give_up(job)

    def _give_up(self, job: Job) -> bool:
        reason = (f"gave up: the run lost its runner {self.lost[job.commit]} times "
                  f"(last: {job.runner})")
        log.error("commit %s: %s", job.commit[:12], reason)
        outcome = self._complete_fields(job.commit, Outcome({
            "verdict": "error", "tests": 0, "failures": 0, "errors": 0, "skipped": 0,
            "runner": "dispatcher", "reason": reason, "started": now_stamp(),
            "duration": "0.000"}, (reason + "\n").encode()))
        try:
            self.write_result(job.commit, outcome)
        except OSError:
            # Neither done nor queued would strand it: keep it queued.
            log.exception("cannot write the verdict for %s; requeueing it", job.commit[:12])
            return False
        self._finish(job.commit, "error")
        threading.Thread(target=self._tell, args=(job.commit, outcome), daemon=True).start()
        return True

    # ---- health ---------------------------------------------------------
    def prefetch_targets(self, count: int) -> list[tuple[tuple[str, int], str | None]]:
        """(address, key name) of the first ``count`` idle runners, in the
        order next_assignment picks them."""
        with self.cond:
            idle = [r for r in self.runners.values() if r.free]
            return [(r.address, r.name) for r in idle[:max(count, 0)]]

    def runner_snapshot(self) -> list[Runner]:
        with self.cond:
            return [dataclasses.replace(r) for r in self.runners.values()]

    def ping_result(self, key: str, outcome: str, instance: str, busy: str | None,
                    misses_allowed: int, token: str | None = None,
                    pinged: str | None = None) -> None:
        """``outcome``: ``ok``, ``refused`` (nothing listens: the runner is
        gone, dropped at once) or ``timeout`` (slow or cut off: dropped
        after ``misses_allowed`` in a row)."""
        with self.cond:
            runner = self.runners.get(key)
            if runner is None:
                return
            if pinged is not None and runner.instance != pinged:
                # The ping was for the process that had this address before
                # it re-registered: its answer says nothing of this one.
                return
            if outcome == "ok" and instance != runner.instance:
                outcome = "refused"  # a different process now answers on that port
            if outcome == "ok":
                runner.misses = 0
                self._believe(runner, busy, token)
                return
            if outcome != "refused":
                runner.misses += 1
                if runner.misses < misses_allowed:
                    return
            self.runners.pop(key, None)
            log.warning("runner %s %s; dropped (%d left)", key,
                        "refused the connection" if outcome == "refused"
                        else f"missed {runner.misses} pings", len(self.runners))
            if runner.job:
                self._lose(runner.job, count=True)
            runner.set(IDLE)

    def expire_jobs(self, job_timeout: float) -> None:
        """The dispatcher's own deadline: a runner that answers pings but
        never reports loses its job to another runner.  A runner registered
        with a limit (its own limits allow longer) gets that long."""
        now = time.monotonic()
        with self.cond:
            for job in [j for j in [*self.jobs.values(), *self._shard_jobs()]
                        if now - j.started > self._deadline(j, job_timeout)]:
                log.warning("commit %s exceeded the job deadline on %s; reassigning",
                            job.commit[:12], job.runner)
                runner = self.runners.get(job.runner)
                if runner and runner.job is job:
                    runner.set(OCCUPIED, occupied_with=job.commit)
                self._lose(job, count=True)

    def _deadline(self, job: Job, job_timeout: float) -> float:
        """--job-timeout, or longer if the job's runner may by its own
        limits take longer (plus a little to report)."""
        runner = self.runners.get(job.runner)
        if runner is None or runner.limit is None:
            return job_timeout
        return max(job_timeout, runner.limit + REPORT_GRACE)

    # ---- views ------------------------------------------------------------
    def status(self) -> dict:
        with self.cond:
            return {"queued": len(self.queue),
                    "running": len(self.jobs) + len(self.held) + len(self.shard_sets),
                    "runners": len(self.runners),
                    "idle_runners": sum(r.free for r in self.runners.values()),
                    "done": len(self.done), "completed": self.completed}

    def describe(self) -> bytes:
        """The ``state`` reply (its schema: ci/state_schema.py): queue,
        running jobs, held commits and runners as JSON."""
        now = time.monotonic()
        with self.cond:
            def branch(commit):
                return self.meta.get(commit, (None, None))[0]

            def called(key: str, key_name: str | None) -> str:
                """Its own name, else its issued key's, else its address."""
                runner = self.runners.get(key)
                return (runner.label if runner else None) or key_name or key

            def busy_with(r: Runner) -> str | None:
                if r.job:
                    return r.job.commit
                return r.occupied_with if r.occupied_with not in (None, "unknown") else None

            state = state_schema.State(
                queue=[state_schema.QueueEntry(c, branch(c), i + 1)
                       for i, c in enumerate(itertools.islice(self.queue, 500))],
                running=[state_schema.RunningJob(
                    j.commit, branch(j.commit), called(j.runner, j.name),
                    round(now - j.started, 1), f"{j.shard}/{j.shards}" if j.shards else None)
                    for j in [*self.jobs.values(), *self._shard_jobs()]],
                held=[state_schema.HeldCommit(c, branch(c), r)
                      for c, (r, _) in self.held.items()],
                runners=[state_schema.RunnerInfo(called(r.key, r.name), r.key, r.state,
                                                 busy_with(r))
                         for r in self.runners.values()],
                # One snapshot: the counts agree with the lists (a re-entrant lock).
                counts=self.status())
        return json.dumps(state.to_json()).encode()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
