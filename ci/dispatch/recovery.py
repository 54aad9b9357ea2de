"""Start-up: the dispatcher's state rebuilt from the journal and the
results folder after a restart (or a crash), and the journal rewritten to
what is still unfinished.

``Recovery`` is a part of ``DispatcherState`` (ci/dispatch/state.py),
which holds the lock and the work table these methods use; its locking
rule holds here too."""

from __future__ import annotations

import logging
import os
import time

from ci import matrix, results
from ci.dispatch.finish import tell_later
from ci.dispatch.journal import (assign_record, key_commit, lost_record, retest_record,
                                 shard_record, split_key)
from ci.dispatch.work import Meta, Work, WorkKey, WorkState, work_key

log = logging.getLogger(__name__)


class Recovery:
    """Mixed into ``DispatcherState``: its lock and work table (see there
    for the locking rule)."""

    def recover(self, grace: float = 0.0) -> None:
        """Rebuild the queue from the journal and the results folder.

        Commits that were running at the crash are held for ``grace``
        seconds: their runner, still running them, re-registers within a
        heartbeat and keeps them, so nothing is run twice."""
        with self.cond:
            named = (results.split_result_name(n) for n in os.listdir(self.results_dir))
            self.done = {work_key(*pair) for pair in named if pair}
            if self.tombstones is not None:
                self.pruned = {work_key(c) for c in self.tombstones.load()} - self.done
            got = self.journal.replay()
            # A matrix commit's cells are finished with the commit (its own
            # file is written once they all are): a tombstone names only
            # the commit, and a pass moves the cells' files before the
            # commit's own, so a crash between leaves only the commit's.
            pending = [c for c in got.order if c in got.retest or not (
                self._finished(work_key(c)) or self._finished(work_key(key_commit(c))))]
            deadline = time.monotonic() + grace
            for key in pending:
                self._recover_one(key, got, grace, deadline)
            # Finished by its ``D``, or by its file alone (a crash between
            # the two): a result sent again is a duplicate, not a stranger's.
            unfinished = set(pending)
            for key, assigned in got.assigned.items():
                if key in got.done or (key not in unfinished and self._finished(work_key(key))):
                    for a in assigned:
                        self._remember_finished(key, a)
            completed = self._recover_groups(got)
            self._compact()
            # Journalled but its verdict not yet written at the crash: it is
            # written now, never run (an unreadable matrix, a conflict).
            for work in [self.work[k] for k in list(self.queue)]:
                self._write_unrunnable(work)
            for commit, outcome in completed:
                tell_later(self.listeners, commit, outcome)
            if pending:
                log.info("recovered %d commit(s) to test (%d were running; held %.1fs for "
                         "their runners)", len(pending), len(self._in_state(WorkState.HELD)),
                         grace)

    def _recover_one(self, key: WorkKey, got, grace: float, deadline: float) -> None:
        commit, cell = split_key(key)
        history = got.assigned.get(key)
        for a in history or ():
            self.token_keys[a.token] = key
        if history and key in got.sharded:
            # Shard results are kept in memory only: a restart runs
            # the commit again, and late shard results are dropped.
            for a in history:
                self._remember_finished(key, a)
            history = None
        held = bool(history) and grace > 0
        # Made in the state it recovers to: no transition leads there.
        work = self.work[key] = Work(key, commit, WorkState.HELD if held else WorkState.QUEUED,
                                     retest=key in got.retest, losses=got.lost[key],
                                     cell=got.cells.get(key, matrix.Cell(cell)),
                                     error=got.errors.get(key))
        if key in got.meta:
            work.meta = Meta(*got.meta[key])
        self.done.discard(key)
        self.pruned.discard(key)
        if history:
            work.assignments = {a.token: a for a in history}
        if held:
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
        lines = self._group_records()
        for work in order:
            lines.extend(self._records_of(work))
            if work.retest:     # before S: replaying R starts a new round
                lines.append(retest_record(work.key))
            # S while its shards run, and while their merged result is
            # being written: replayed without it, the shards' assignments
            # would pass for the whole commit's, and one shard's resent
            # result would be taken for the commit's verdict.
            shards = work.shards.total if work.shards is not None else work.merging
            if shards is not None:
                lines.append(shard_record(work.key, shards))
            lines.extend(assign_record(work.key, a) for a in work.assignments.values())
            lines.extend(lost_record(work.key) for _ in range(work.losses))
        return lines
