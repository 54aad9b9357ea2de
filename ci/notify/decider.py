"""The broke/fixed decision: which event, if any, each test result makes,
in each branch's commit order whatever order the results arrive in.

Pure: no I/O, no threads, no clock.  A predecessor the decider has not
been given is asked of a lookup the caller supplies, so the rules can be
tested (and fuzzed) alone, and the notifier can replay a journal into the
same state after a restart.  A commit is compared with the commit
dispatched before it on its branch (``previous``); its decision waits
until that commit has been decided.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Callable, Iterable
from ci.results import VERDICTS
from ci.wire import valid_full_commit


# ``first-failure`` is no decision of the decider: the dispatcher tells it
# while a commit's tests run (Notifier.failing_now), before its result.
# ``landed`` and ``rejected`` are no decisions either: the observer's land
# queue tells them (Notifier.queue_event, ci/notify/queue_events.py).
KINDS = ("broken", "fixed", "still-failing", "passed", "failed", "first-failure",
         "landed", "rejected")
# A rejection is news for the person who asked to land, like a break: every
# preset has it; a landing only ``all`` (or naming it: ``change,landed``).
NOTIFY_ON = {
    "change": frozenset({"broken", "fixed", "rejected"}),
    "early": frozenset({"broken", "fixed", "first-failure", "rejected"}),
    "failure": frozenset({"broken", "fixed", "still-failing", "failed", "rejected"}),
    "all": frozenset(KINDS),
}
DEFAULT_NOTIFY_ON = "change"


def parse_notify_on(text: str) -> frozenset:
    """``--notify-on``: a preset, an event kind, or several of them joined
    by commas (``change,landed``, ``broken,fixed``): the union of their
    kinds.  ValueError naming what is allowed."""
    kinds: set[str] = set()
    for word in str(text).split(","):
        word = word.strip()
        if word in NOTIFY_ON:
            kinds |= NOTIFY_ON[word]
        elif word in KINDS:
            kinds.add(word)
        else:
            raise ValueError(f"{word[:40]!r} is neither a preset ({', '.join(NOTIFY_ON)}) "
                             f"nor an event ({', '.join(KINDS)})")
    return frozenset(kinds)


def is_failing(verdict: str) -> bool:
    """``failed``, ``error``, ``timeout`` and ``conflict`` (the branch cannot
    be merged with its target) all mean the branch is not green."""
    return verdict != "passed"


def classify(previous_verdict: str | None, verdict: str) -> str:
    """The event kind for ``verdict`` after ``previous_verdict``.

    Without an earlier verdict there is no change to report: the kind is
    ``passed`` or ``failed`` (a branch's first commit, or one whose
    predecessor's result is unknown), never ``broken``, since we cannot say
    this commit broke anything."""
    if previous_verdict is None:
        return "failed" if is_failing(verdict) else "passed"
    if is_failing(verdict):
        return "still-failing" if is_failing(previous_verdict) else "broken"
    return "fixed" if is_failing(previous_verdict) else "passed"


@dataclasses.dataclass(frozen=True)
class Result:
    """One result file's header, as much of it as a decision needs; the
    other header fields ride along (``fields``) for the event's text."""
    commit: str
    branch: str | None
    previous: str | None
    verdict: str
    fields: dict = dataclasses.field(default_factory=dict, compare=False)


@dataclasses.dataclass(frozen=True)
class Decision:
    """What a result means for its branch; ``announce`` says whether the
    kind is one the operator asked to be told of (every decision is
    journalled either way)."""
    result: Result
    kind: str
    previous_verdict: str | None
    # How many times this commit has been decided (a retest adds one).
    n: int
    retest: bool
    announce: bool

    @property
    def event_id(self) -> str:
        """Derived from the branch, commit, kind, verdict and ``n``, so the
        same decision made again after a crash carries the same id and a
        receiver can drop the repeat."""
        r = self.result
        text = "\n".join([r.branch or "", r.commit, self.kind, r.verdict, str(self.n)])
        return hashlib.sha256(text.encode()).hexdigest()[:32]


# What a lookup of a commit the decider has not seen may answer.
PENDING = "pending"    # queued or running: its result will come
UNKNOWN = "unknown"    # no result and none expected: judge the next one alone


class Decider:
    """Branch state: which commits were decided (with their verdict) and
    which results wait for their predecessor.

    Rules:
    * a result whose ``previous`` is absent, itself, or unknown (no result
      and not pending) is judged alone: ``passed`` / ``failed``;
    * a result whose ``previous`` is decided is compared with it;
    * otherwise it waits; when the predecessor is decided, the waiters are
      decided in turn, so decisions come out in commit order;
    * a previous commit with a result the decider has not been given yet is
      taken from the lookup and decided first;
    * a new verdict for a decided commit (a retest) is compared with that
      commit's own earlier verdict: failed -> passed is ``fixed``, passed ->
      failed is ``broken``; the same verdict again decides nothing;
    * a result without a branch is never announced (its verdict still
      serves as the predecessor of a commit that has one).

    Not thread-safe: one thread (the notifier's) owns it."""

    def __init__(self, kinds: Iterable[str] = NOTIFY_ON[DEFAULT_NOTIFY_ON]):
        self.kinds = frozenset(kinds)
        self.judged: dict[str, tuple[str, int]] = {}
        self.pool: dict[str, Result] = {}
        # commit -> pooled commits waiting for it to be decided
        self.waiters: dict[str, list[str]] = collections.defaultdict(list)
        # pooled commit -> the commit it waits for
        self.blocked_on: dict[str, str] = {}

    def add(self, results: Iterable[Result],
            lookup: Callable[[str], object] = lambda commit: UNKNOWN) -> list[Decision]:
        """Take new results; return every decision they make possible, in
        order.  ``lookup(commit)`` answers for a predecessor the decider has
        not seen: PENDING, UNKNOWN, or its Result."""
        out: list[Decision] = []
        ready: collections.deque = collections.deque()
        fresh: list[str] = []
        for result in results:
            if not result.branch:
                # Never announced, but it may be the predecessor someone waits for.
                for waiter in self.waiters.pop(result.commit, []):
                    self.blocked_on.pop(waiter, None)
                    ready.append((waiter, result.verdict))
                continue
            old = self.judged.get(result.commit)
            if old is not None:
                if old[0] != result.verdict:
                    out.append(self._decide(result, old[0], retest=True))
                continue
            if result.commit not in self.pool:
                fresh.append(result.commit)
            # A newer verdict for a waiting commit simply replaces the old.
            self.pool[result.commit] = result
        for commit in fresh:
            self._examine(commit, lookup, ready)
        while ready:
            commit, previous_verdict = ready.popleft()
            result = self.pool.pop(commit)
            out.append(self._decide(result, previous_verdict, retest=False))
            for waiter in self.waiters.pop(commit, []):
                self.blocked_on.pop(waiter, None)
                self._examine(waiter, lookup, ready)
        return out

    def waiting(self) -> dict[str, str]:
        """Pooled commit -> the commit it waits for (for logs and tests)."""
        return dict(self.blocked_on)

    def _examine(self, start: str, lookup, ready) -> None:
        todo = [start]
        while todo:
            commit = todo.pop()
            previous = self.pool[commit].previous
            if previous is None or previous == commit:
                ready.append((commit, None))
            elif previous in self.judged:
                ready.append((commit, self.judged[previous][0]))
            elif previous in self.pool:
                if self._leads_to(previous, commit):
                    ready.append((commit, None))  # a cycle (bad metadata): break it here
                else:
                    self._wait(commit, previous)
            else:
                found = lookup(previous)
                if found == PENDING:
                    self._wait(commit, previous)
                elif not isinstance(found, Result) or found.commit != previous:
                    ready.append((commit, None))
                elif not found.branch:
                    ready.append((commit, found.verdict))
                else:
                    # Its own result_written is still on the way (or was lost in a
                    # crash): decide it first, whatever order the calls come in.
                    self.pool[previous] = found
                    self._wait(commit, previous)
                    todo.append(previous)

    def _wait(self, commit: str, previous: str) -> None:
        self.blocked_on[commit] = previous
        self.waiters[previous].append(commit)

    def _leads_to(self, start: str, target: str) -> bool:
        """Does following the wait links from ``start`` reach ``target``?"""
        current = start
        for _ in range(len(self.pool) + 1):
            if current == target:
                return True
            if current not in self.blocked_on:
                return False
            current = self.blocked_on[current]
        return True

    def _decide(self, result: Result, previous_verdict: str | None, retest: bool) -> Decision:
        n = self.judged.get(result.commit, ("", 0))[1] + 1
        kind = classify(previous_verdict, result.verdict)
        self.judged[result.commit] = (result.verdict, n)
        return Decision(result, kind, previous_verdict, n, retest, kind in self.kinds)




# --------------------------------------------------------------------------
# Result headers as decider input.

def result_from_fields(commit: str, fields: dict) -> Result | None:
    """The Result a result file's header fields describe, or None when its
    verdict is not one we know (such a file decides nothing)."""
    verdict = str(fields.get("verdict", ""))
    if verdict not in VERDICTS:
        return None
    branch = str(fields.get("branch") or "") or None
    previous = str(fields.get("previous") or "")
    previous = previous if valid_full_commit(previous) else None
    return Result(commit, branch, previous, verdict,
                  {k: str(v) for k, v in fields.items()})
