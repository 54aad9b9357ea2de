"""Retention on the dispatcher's side: commits whose results were pruned
stay finished (their tombstones), and the files of a pruned batch are
removed outside the lock while a retest of one of them waits.

``PrunedCommits`` is a part of ``DispatcherState`` (ci/dispatch/state.py)."""

from __future__ import annotations

import logging
from ci.dispatch.journal import key_commit
from ci.dispatch.work import WorkKey, work_key
from ci.retention.tombstones import Tombstone

log = logging.getLogger(__name__)


class PrunedCommits:
    """Mixed into ``DispatcherState``: its lock and work table (see there
    for the locking rule)."""

    def retests_so_far(self) -> int:
        """Taken before a pruning pass plans (see ``remove_pruned``)."""
        with self.cond:
            return self.retests_finished

    def remove_pruned(self, commits: list[str], remove, forget,
                      retests: int | None = None) -> list[str] | None:
        """Retention (ci/retention/pruner.py): for the commits still
        finished and not pending, ``remove(picked)`` deletes their files
        (returning, per commit, None or the OSError that stopped it) and
        they count as pruned; ``forget(removed)`` is told (it must not
        block).  The lock is held only to pick the commits and mark them
        (pruned and ``unlinking``), not for the unlinks, which can wait on
        the file system's journal behind every result's fsync; a retest of
        a commit being unlinked waits until its files are gone, so a new
        result is never removed.  None, and nothing removed, once a retest
        has finished since ``retests`` (``retests_so_far`` before the
        plan): its new verdict may make a commit of the plan one that
        broke or fixed its branch, which the plan did not weigh."""
        with self.cond:
            if retests is not None and self.retests_finished != retests:
                return None
            picked = [c for c in commits if self._mark_unlinking(work_key(c))]
        removed, failed = [], []
        try:
            for commit, error in zip(picked, remove(picked) if picked else []):
                if error is None:
                    removed.append(commit)
                else:
                    log.warning("cannot prune %s: %s", commit[:12], error)
                    failed.append(commit)
            if removed:
                forget(removed)      # before a retest can queue its new run
        finally:
            with self.cond:
                self._unlinked(picked, set(picked) - set(removed))
        return removed

    def remove_leftovers(self, commits: list[str], remove) -> int:
        """The second sweep of a pass: ``remove(picked)`` deletes the XML
        files of the commits still pruned and not queued, running or
        being written again (a retest's new XML is not an old one), marked
        ``unlinking`` meanwhile so that a retest of one waits for it, as
        it does for the first sweep.  How many were removed."""
        with self.cond:
            picked = [c for c in commits if self._mark_leftover(work_key(c))]
        removed = 0
        try:
            for commit, error in zip(picked, remove(picked) if picked else []):
                if error is None:
                    removed += 1
                else:
                    log.warning("cannot remove the XML of pruned %s: %s", commit[:12], error)
        finally:
            with self.cond:
                self.unlinking.difference_update(work_key(c) for c in picked)
                self.cond.notify_all()
        return removed

    def _mark_leftover(self, key: WorkKey) -> bool:
        if key not in self.pruned or key in self.work or key in self.groups \
                or key in self.unlinking:
            return False
        self.unlinking.add(key)
        return True

    def _mark_unlinking(self, key: WorkKey) -> bool:
        if key in self.work or key in self.groups or key not in self.done:
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

    def pruned_stones(self, targets: list[str]) -> dict[str, Tombstone]:
        """The tombstones of the pruned commits among ``targets`` (their
        branch, predecessor and a matrix commit's cells): the lock is taken only to pick the commits
        known as pruned, the file (it may be long) is read without it; a
        commit whose result file is still there reads it there instead
        (``_retest_works``)."""
        found = {}
        if self.tombstones is None:
            return found
        # Only commits known as pruned: each look reads the whole file.
        with self.cond:
            pruned = [c for c in dict.fromkeys(key_commit(t) for t in targets)
                      if work_key(c) in self.pruned]
        for commit in pruned:
            # Even with its file still there: a batch may be moving it
            # (the retest waits for it), and its file is read first anyway.
            stone = self.tombstones.find(commit)
            if stone is not None:
                found[commit] = stone
        return found
