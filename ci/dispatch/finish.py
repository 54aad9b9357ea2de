"""The end of a unit of work: a result that claims it and is written
outside the lock (or given back if the write fails), the bookkeeping once
its file is on disk, and runs that lost their runner (requeued, or given
the ``error`` verdict at the poison cap).

``ResultKeeper`` is a part of ``DispatcherState`` (ci/dispatch/state.py);
its locking rule holds here too: ``record_result`` takes the lock (and
releases it around the file write), every ``_`` method expects it held.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from ci import matrix, mergeinfo, results
from ci.dispatch.journal import AssignmentRecord, done_record, lost_record, split_key
from ci.dispatch.runners import IDLE, OCCUPIED, RUNNING, SUSPECT
from ci.dispatch.work import Job, Merged, ShardReport, ShardSet, Work, WorkKey, WorkState
from ci.outcome import Outcome
from ci.retention import index as result_index
from ci.wire import Reply, one_line

log = logging.getLogger(__name__)

# The journal is rewritten once this many records are superseded.
COMPACT_AFTER = 10_000
# Tokens of finished assignments remembered, so a late duplicate is told
# "duplicate" rather than refused as a forgery.
FINISHED_TOKENS = 20_000


def now_stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def tell_listeners(listeners: list, commit: str, outcome: Outcome) -> None:
    """Call every result listener; one that fails is logged, not fatal."""
    for listener in listeners:
        try:
            listener(commit, outcome)
        except Exception:
            log.exception("result listener failed for %s", commit[:12])


def tell_later(listeners: list, commit: str, outcome: Outcome) -> None:
    """The same from a thread of its own: for callers holding the lock."""
    threading.Thread(target=tell_listeners, args=(listeners, commit, outcome),
                     daemon=True).start()


@dataclasses.dataclass
class Claim:
    """A result that claimed its commit (WRITING) and is to be written
    outside the lock; what to give back if the write fails."""
    work: Work
    token: str
    outcome: Outcome
    shard_set: ShardSet | None = None   # the last shard's set, if it completed one


class ResultKeeper:
    """Results and lost runs; mixed into ``DispatcherState``."""

    def record_result(self, commit: str, token: str, name: str | None,
                      outcome: Outcome) -> bool:
        """Write the verdict if this is the first result of a real
        assignment; False for a duplicate; Reply if the token proves no
        assignment (a forgery, or a result from a round before a retest
        that is long forgotten)."""
        with self.cond:
            claim = self._claim_result(commit, token, name, outcome)
            if not isinstance(claim, Claim):
                return claim
        try:
            self.write_result(claim.work.key, claim.outcome)
        except BaseException:
            with self.cond:
                self._unclaim(claim)
                self.cond.notify_all()
            raise
        with self.cond:
            told = self._finish(claim.work, claim.outcome)
        if told is not None:
            tell_listeners(self.listeners, commit, told)
        return True

    def _claim_result(self, commit: str, token: str, name: str | None,
                      outcome: Outcome) -> Claim | bool:
        """Under the lock: a Claim to write, or what ``record_result``
        answers without writing (False: a duplicate; True: a shard kept)."""
        a = self.finished_tokens.get((self._key_of(commit, token), token))
        if a is not None:
            if name is not None and a.name != name:
                raise Reply(f"result for {commit[:12]} refused: assigned to another runner")
            self._free_after_result(commit, token, a)
            return False
        work = self._work(commit, token)
        if work is None and self._finished(self._key_of(commit, token)):
            # Stored before a restart whose journal no longer names the
            # assignment (a crash between the file and its ``D``, or a
            # compaction before the reply went out): the runner sends it
            # again.  Refused, it held the runner's outbox for rounds and
            # was set aside as refused; nothing is written, the first stands.
            return False
        a = self._check_token(work, commit, token, name, "result")
        # Before the runner is free again: the branch's next job already
        # names the tests this result failed (see ci/history/recent.py).
        self.recent_failures.learn(work.branch, outcome.records)
        self._free_after_result(commit, token, a)
        if work.key in self.done or work.state is WorkState.WRITING:
            return False
        if self.max_shards > 1:
            self.durations.learn(outcome.records)
        if work.shards is not None and token in work.shards.tokens:
            got = self._record_shard(work, token, outcome)
            if not isinstance(got, Merged):
                return got is ShardReport.STORED
            return Claim(work, token, self._complete_fields(work, got.outcome), got.shard_set)
        self._claim(work)
        holder = self.runners.get(work.job.runner) if work.job else None
        if holder and holder.job is work.job and work.job.token != token:
            # Still running it elsewhere: busy, but not with our work.
            holder.set(OCCUPIED, occupied_with=commit)
        return Claim(work, token, self._complete_fields(work, outcome))

    def _unclaim(self, claim: Claim) -> None:
        """The result could not be written: the commit is to be run again,
        by the runner still running it if there is one."""
        work = claim.work
        if claim.shard_set is not None:
            self._unclaim_shards(work, claim.token, claim.shard_set)
            return
        holder = self.runners.get(work.job.runner) if work.job else None
        if holder and holder.state == OCCUPIED and holder.occupied_with == work.commit:
            work.move(WorkState.RUNNING)
            holder.set(RUNNING, work.job)
        elif work.shards is not None:
            work.move(WorkState.SHARDED)   # an earlier round's whole result lost its file
        else:
            self._to_queue(work, head=True)

    def _free_after_result(self, commit: str, token: str, a: AssignmentRecord) -> None:
        """The sender has finished this run: it is free again, whether or
        not its result is the one kept."""
        runner = self.runners.get(a.runner)
        if runner is None:
            return
        if (runner.state == RUNNING and runner.job.commit == commit
                and runner.job.token == token) or \
                (runner.state == OCCUPIED and runner.occupied_with in (commit, "unknown")) or \
                runner.state == SUSPECT:
            runner.set(IDLE)
            runner.misses = 0
            self.cond.notify_all()

    def _complete_fields(self, work: Work, outcome: Outcome) -> Outcome:
        """The dispatcher's own header fields: the commit, and the branch
        and previous commit the observer named."""
        added = {"commit": work.commit}
        cell = work.cell
        if cell.name:
            added["cell"] = cell.name
            if cell.python:
                added["python"] = cell.python
            if cell.axes:
                added["axes"] = matrix.format_axes(cell.axes)
        if cell.labels:
            added["labels"] = " ".join(sorted(cell.labels))
        if work.meta:
            added["branch"] = work.meta.branch
            if work.meta.previous:
                added["previous"] = work.meta.previous
            added.update(merge_header(work.meta))
        return outcome.with_header(**added)

    def write_result(self, key: str, outcome: Outcome) -> None:
        """The result file is the proof a commit (or its cell: ``key``) is
        done: written last, after the per-test JUnit file (see
        ``Outcome.write``); a commit's own file gets its line in the result
        index (ci/retention/index.py).  Every result file is written here."""
        commit, cell = split_key(key)
        written = outcome.write(self.results_dir, commit, cell, spares=self.spares)
        if not cell:
            result_index.add(self.result_index, commit, outcome.header, written)

    def _finish(self, work: Work, outcome: Outcome) -> Outcome | None:
        """Bookkeeping once the work's result file is on disk (WRITING);
        the outcome to tell the listeners: the work's own, or for a matrix
        cell the commit's once every cell is done (else None)."""
        self.completed += 1
        work.move(WorkState.DONE)
        del self.work[work.key]
        self.done.add(work.key)
        self.pruned.discard(work.key)
        if work.retest:
            self.retests_finished += 1
        self._occupy_with(work.job)
        if work.shards:
            # Given up: shards still running are no longer ours.
            for shard_job in work.shards.running.values():
                self._occupy_with(shard_job)
            for entry in [e for e in self.shard_queue if e[0] == work.key]:
                self.shard_queue.remove(entry)
        for a in work.assignments.values():
            self._remember_finished(work.key, a)
        self.cond.notify_all()
        log.info("result for %s: %s", work.short, outcome.verdict)
        told = self._complete_commit(work.commit) if work.cell.name else None
        try:
            self.journal.append([done_record(work.key)] + (
                [done_record(work.commit)] if told else []), sync=False)
            if self._compaction_due():
                self._compact()
        except OSError:
            # The result file alone proves the commit done at the next start.
            log.exception("cannot journal the end of %s", work.short)
        return told if work.cell.name else outcome

    def _compact(self) -> None:
        self.journal.rewrite(self._pending_records())
        self.compacted_records = self.journal.records

    def _compaction_due(self) -> bool:
        """Rewrite the journal once most of it is superseded: past twice
        what the last rewrite kept, so that records pending for long (a
        matrix commit's finished cells while one waits for a scarce label,
        which ``active`` does not count) do not make every result rewrite
        and fsync the whole journal under the lock.  Not while a
        dispatch's records are being fsynced outside the lock (the rewrite
        would drop them after they were answered)."""
        if self.journal.records <= max(COMPACT_AFTER, 2 * self.compacted_records):
            return False
        active = sum(w.state in (WorkState.QUEUED, WorkState.RUNNING, WorkState.HELD)
                     for w in self.work.values())
        return self.journal.records > 4 * active and \
            not self._in_state(WorkState.JOURNALLING)

    def _remember_finished(self, key: WorkKey, a: AssignmentRecord) -> None:
        self.finished_tokens[(key, a.token)] = a
        self.token_keys[a.token] = key
        while len(self.finished_tokens) > FINISHED_TOKENS:
            (_, token), _ = self.finished_tokens.popitem(last=False)
            self.token_keys.pop(token, None)

    # ---- lost runs --------------------------------------------------------
    def _lose(self, job: Job, count: bool) -> None:
        """Take a job away from its runner; requeue it unless it is poison."""
        if job.shards:
            self._lose_shard(job, count)
            return
        work = self.work.get(job.key)
        if work is None:
            return
        work.tail.clear()
        if work.state is WorkState.WRITING:
            return
        if work.state is WorkState.RUNNING and work.job is job:
            self._to_queue(work, head=True)
        if count:
            self._count_loss(work, job)

    def _count_loss(self, work: Work, job: Job) -> bool:
        """One more run of the work lost its runner; True when that was
        the last allowed and the commit got its ``error`` verdict."""
        work.losses += 1
        try:
            self.journal.append([lost_record(work.key)], sync=False)   # a cell's own
        except OSError:
            # The count is a poison guard only: run it again all the same.
            log.exception("cannot journal the lost run of %s", work.commit[:12])
        return work.losses >= self.max_attempts and work.state is not WorkState.WRITING \
            and self._give_up(work, job)

    def _give_up(self, work: Work, job: Job) -> bool:
        """Poison: write the ``error`` verdict; False if it cannot be
        written, and the work stays as it is (queued, or its shards)."""
        return self._write_error(work, f"gave up: the run lost its runner {work.losses} "
                                       f"times (last: {job.runner})")

    def _write_error(self, work: Work, reason: str) -> bool:
        """The ``error`` verdict for work that will not run (poison, no
        runner could take it, an unreadable matrix), written under the lock
        (rare, and nothing may run it meanwhile); False if it cannot be
        written, and the work stays as it is."""
        log.error("commit %s: %s", work.short, reason)
        return self._write_verdict(work, "error", reason, (reason + "\n").encode())

    def _write_conflict(self, work: Work) -> bool:
        """The ``conflict`` verdict of a branch whose merge with its target
        could not be made (the observer said so: ``conflict=``): no run,
        as for ``_write_error``; the header names the paths."""
        merge, paths = work.meta.merge, work.meta.conflicts or ()
        reason, output = conflict_text(merge, paths)
        log.info("commit %s: %s", work.short, reason)
        return self._write_verdict(work, results.CONFLICT, reason, output)

    def _write_verdict(self, work: Work, verdict: str, reason: str, output: bytes) -> bool:
        outcome = self._complete_fields(work, Outcome({
            "verdict": verdict, "tests": 0, "failures": 0, "errors": 0, "skipped": 0,
            "runner": "dispatcher", "reason": reason, "started": now_stamp(),
            "duration": "0.000"}, output))
        try:
            self.write_result(work.key, outcome)
        except OSError:
            # Neither done nor queued would strand it: keep it queued.
            log.exception("cannot write the verdict for %s; requeueing it", work.short)
            return False
        self._claim(work)
        told = self._finish(work, outcome)
        if told is not None:
            tell_later(self.listeners, work.commit, told)
        return True

    def _write_unrunnable(self, work: Work) -> bool:
        """Write the verdict of work that must never run (an unreadable
        matrix, a conflict); False for work that is to run."""
        if work.error is not None:
            return self._write_error(work, work.error)
        if work.meta is not None and work.meta.merge is not None \
                and work.meta.conflicts is not None:
            return self._write_conflict(work)
        return False


def merge_header(meta) -> dict:
    """The header fields of a merge commit (or of a conflict): which
    target it was merged into, the branch's own commit, the conflicts."""
    if meta is None or meta.merge is None:
        return {}
    fields = {"merged_into": mergeinfo.format_merged_into(meta.merge),
              "merge_head": meta.merge.head}
    if meta.conflicts is not None:
        fields["conflicts"] = mergeinfo.format_paths_within(meta.conflicts)
    return fields


def conflict_text(merge: mergeinfo.MergeInfo, paths: tuple[str, ...]) -> tuple[str, bytes]:
    """(the one-line reason, the output) of a ``conflict`` verdict."""
    named = ", ".join(paths) if paths else "the observer named no readable path"
    reason = one_line(f"merge conflict with {merge.target_branch} at "
                      f"{merge.target_commit[:12]}: {named}", 300)
    lines = [f"[ci] {merge.head} cannot be merged into {merge.target_branch} at "
             f"{merge.target_commit}: nothing was run.",
             f"[ci] conflicting files ({len(paths)}):" if paths else
             "[ci] the observer named no readable conflicting path.",
             *(f"    {one_line(p, mergeinfo.MAX_PATH_CHARS)}" for p in paths)]
    return reason, ("\n".join(lines) + "\n").encode("utf-8", "replace")
