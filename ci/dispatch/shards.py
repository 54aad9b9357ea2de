"""Sharding on the dispatcher's side: when to split a commit, handing out
its shards, a lost shard running again, and collecting the shards'
reports until the last one completes the merged result.

``ShardPlanner`` is a part of ``DispatcherState`` (ci/dispatch/state.py),
whose lock, work table and ``shard_queue`` (the shards waiting to run,
first first) these methods use; its locking rule holds here too.
"""

from __future__ import annotations

import logging
import time

from ci import sharding
from ci.dispatch.journal import BRANCH_RE, AssignmentRecord, assign_record, shard_record
from ci.dispatch.runners import RUNNING, Runner
from ci.outcome import Outcome
from ci.dispatch.work import (Job, Merged, ShardReport, ShardSet, Work, WorkKey, WorkState,
                              new_token)

log = logging.getLogger(__name__)


class ShardPlanner:
    """Splitting commits over runners; mixed into ``DispatcherState``."""

    def _shard_count(self, work: Work | None = None) -> int:
        """How many shards ``work`` (from the queue; its head if not said)
        gets: only when more runners that fit it are free than units are
        queued (a burst goes whole), each queued unit keeping a runner of
        its own."""
        if self.max_shards < 2 or not self.queue:
            return 1
        work = work or self.work[self.queue[0]]
        free = len(self._fitting(work.cell, free_only=True))
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

    def _assign_shard(self, runner: Runner, total: int, key: WorkKey,
                      index: int) -> tuple[Job, list[str]]:
        """Give ``runner`` the waiting shard ``index`` of ``key``, or (0)
        split that queued work and give it shard 1.  Returns the job and
        its journal records (the ``S`` record first, before any shard's
        ``runtest`` is sent)."""
        work = self.work[key]
        if index:
            self.shard_queue.remove((key, index))
        else:
            self.queue.remove(key)
            work.move(WorkState.SHARDED)
            branch = work.branch if work.branch and BRANCH_RE.fullmatch(work.branch) else None
            work.shards = ShardSet(total, sharding.encode_table(self.durations.table),
                                   first=self.recent_failures.for_branch(branch))
            self.shard_queue.extend((work.key, i) for i in range(2, total + 1))
            index = 1
            log.info("commit %s split into %d shards", work.commit[:12], total)
        shard_set = work.shards
        job = Job(work.commit, new_token(), runner.key, runner.address, time.monotonic(),
                  runner.name, index, shard_set.total, self._request(work, index), work.key)
        self.token_keys[job.token] = work.key
        runner.set(RUNNING, job)
        shard_set.running[index] = job
        shard_set.tokens[job.token] = index
        assignment = AssignmentRecord(job.token, runner.key, runner.name)
        work.assignments[job.token] = assignment
        records = [assign_record(work.key, assignment)]
        if not shard_set.journalled:
            records.insert(0, shard_record(work.key, shard_set.total))
        if self.shard_queue:
            self.cond.notify_all()
        return job, records

    def _lose_shard(self, job: Job, count: bool) -> None:
        """A shard lost its runner: that shard alone runs again, first."""
        work = self.work.get(job.key)
        shard_set = work.shards if work else None
        if shard_set is None or shard_set.running.get(job.shard) is not job:
            return
        del shard_set.running[job.shard]
        if job.shard in shard_set.reports:
            return
        if count and self._count_loss(work, job):
            return
        log.info("shard %d/%d of %s runs again", job.shard, job.shards, job.commit[:12])
        self.shard_queue.appendleft((work.key, job.shard))
        self.cond.notify_all()

    def _record_shard(self, work: Work, token: str, outcome: Outcome) -> ShardReport | Merged:
        """Keep one shard's result.  When it is the last, claim the commit
        (WRITING) and return the merged result."""
        shard_set = work.shards
        index = shard_set.tokens[token]
        if index in shard_set.reports:
            return ShardReport.DUPLICATE
        shard_set.reports[index] = outcome
        if (work.key, index) in self.shard_queue:
            self.shard_queue.remove((work.key, index))
        job = shard_set.running.pop(index, None)
        if job and job.token != token:
            self._occupy_with(job)
        if len(shard_set.reports) < shard_set.total:
            return ShardReport.STORED
        work.move(WorkState.WRITING)
        work.shards = None
        work.merging = shard_set.total
        return Merged(sharding.merge(shard_set.total, shard_set.reports), shard_set)

    def _unclaim_shards(self, work: Work, token: str, shard_set: ShardSet) -> None:
        """The merged result could not be written: the last shard's report
        is dropped and that shard runs again (unless its runner's resend,
        told ``busy``, comes first and completes the set)."""
        index = shard_set.tokens[token]
        shard_set.reports.pop(index, None)
        work.shards, work.merging = shard_set, None
        work.move(WorkState.SHARDED)
        self.shard_queue.appendleft((work.key, index))
