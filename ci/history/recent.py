"""The tests that failed most recently on each branch, for failing tests
first (``runtest``'s ``failing_first``, see ci/jobspec.py).

Kept in memory by the dispatcher and taught by every result as it is
claimed, under the dispatcher's lock (``DispatcherState``), so the very
next job of the branch already names the tests its last result failed:
the history's writer is asynchronous and could still be behind.  A branch
not seen since the dispatcher started is read once from the history
store (``HistoryReader.recent_failures``); without a store it starts
empty.  Not thread-safe: the dispatcher holds its condition around use.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable

from ci import jobspec
from ci.history import store

log = logging.getLogger(__name__)

# Branches remembered at most (each with at most MAX_FAILING_FIRST ids).
MAX_BRANCHES = 1000


class RecentFailures:
    """Per branch, the ids of the tests that failed most recently, newest
    first, at most ``jobspec.MAX_FAILING_FIRST``.  ``load(branch)``: the
    history's answer for a branch not seen yet (may raise; then empty)."""

    def __init__(self, load: Callable[[str], Iterable[str]] | None = None,
                 limit: int = jobspec.MAX_FAILING_FIRST):
        self.load = load
        self.limit = limit
        self.branches: collections.OrderedDict[str, list[str]] = collections.OrderedDict()

    def _known(self, branch: str) -> list[str]:
        if branch not in self.branches:
            ids: list[str] = []
            if self.load is not None:
                try:
                    ids = [t for t in self.load(branch) if jobspec.usable_test_id(t)]
                except Exception as exc:   # the history is a help, never a need
                    log.info("no recent failures of %s from the history: %s", branch, exc)
            self.branches[branch] = ids[:self.limit]
            while len(self.branches) > MAX_BRANCHES:
                self.branches.popitem(last=False)
        self.branches.move_to_end(branch)
        return self.branches[branch]

    def for_branch(self, branch: str | None) -> tuple[str, ...]:
        """The ids to run first for a commit of ``branch`` (none without one)."""
        return tuple(self._known(branch)) if branch else ()

    def learn(self, branch: str | None, records) -> None:
        """A result of ``branch`` arrived: its failing tests go first."""
        if not branch or not records:
            return
        failed = [r.id for r in records if r.outcome in store.FAILING]
        failed = list(dict.fromkeys(t for t in failed if jobspec.usable_test_id(t)))
        if not failed:
            return
        known = self._known(branch)
        rest = [t for t in known if t not in set(failed)]
        known[:] = (failed + rest)[:self.limit]
