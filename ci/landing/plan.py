"""The land queue's planner: given the active entries of one target (in
queue order), the target's head and the queue depth, what to do next.

Pure (no git, no sockets, no clock) so that every rule of the queue can be
tested, and checked by a property test, without a repository.  The engine
(``engine.py``) carries the actions out, journals them, and plans again
until nothing is left to build, land or reject.

The rules, Zuul-like:

* Entries form a speculative chain.  Entry i's *base* is the tested commit
  of the nearest entry ahead of it that is not excluded, else the target
  head.  An entry is *excluded* for those behind it when it is red
  (``failing``) or conflicts with what is ahead (``blocked``).
* An entry whose build is not on its base (never built, the target moved,
  an entry ahead was rebuilt or excluded) is built again on its base, if
  it is within the first ``depth`` entries of the chain; else it waits.
* Only the front entry (every entry ahead landed or rejected: it is the
  first active one) is judged: built on the target head and passed ->
  land (a lease push from the target head to exactly its tested commit);
  red or conflicting -> rejected with the reason.  A red or conflicting
  entry behind the front is excluded and judged once it reaches the front
  (then rebuilt on the target, unless it was tested on exactly that).
"""

from __future__ import annotations

import dataclasses

# Verdicts of a finished test run (results.VERDICTS plus the merge's own).
GREEN = frozenset({"passed"})
RED = frozenset({"failed", "error", "timeout"})
CONFLICT = "conflict"
FINAL = GREEN | RED | {CONFLICT}


@dataclasses.dataclass(frozen=True)
class Entry:
    """What the planner needs of a queue entry.  ``tested`` is the merge
    commit built for it (None: not built, or its merge conflicted);
    ``base`` what it was built on (the merge's first parent); ``verdict``
    the tested commit's verdict so far (None or a non-final state while it
    is under test; ``conflict`` when the merge could not be made)."""
    id: int
    branch: str
    target: str
    head: str
    tested: str | None = None
    base: str | None = None
    verdict: str | None = None
    reason: str = ""

    @property
    def built(self) -> bool:
        return self.base is not None and (self.tested is not None or self.verdict == CONFLICT)


@dataclasses.dataclass(frozen=True)
class Build:
    """Merge the entry's head into ``base`` and test it."""
    id: int
    base: str
    state = "merging"


@dataclasses.dataclass(frozen=True)
class Land:
    """Move the target from ``old`` to ``new`` (the entry's tested commit,
    whose first parent is ``old``) with a lease push."""
    id: int
    old: str
    new: str
    state = "landing"


@dataclasses.dataclass(frozen=True)
class Reject:
    id: int
    reason: str
    state = "rejected"


@dataclasses.dataclass(frozen=True)
class Mark:
    """Nothing to do now; the entry is in ``state``."""
    id: int
    state: str


Action = Build | Land | Reject | Mark


def plan(entries: list[Entry], target_head: str, depth: int) -> list[Action]:
    """One action per entry, in queue order (``entries`` are the active
    entries of ONE target, front first).  At most one ``Land``: the front's.

    After a ``Build`` the entries behind it wait (their base is the commit
    that build will make): the engine builds, then plans again."""
    if depth < 1:
        raise ValueError("depth must be at least 1")
    actions: list[Action] = []
    base = target_head
    window = 0          # entries of the chain built or being built on their base
    stalled = False     # an entry ahead is being (re)built now
    for index, entry in enumerate(entries):
        front = index == 0
        if stalled:
            actions.append(Mark(entry.id, "waiting"))
            continue
        if not entry.built or entry.base != base:
            if window < depth:
                actions.append(Build(entry.id, base))
                window += 1
                stalled = True
            else:
                actions.append(Mark(entry.id, "waiting"))
                stalled = True   # every later entry is beyond the window too
            continue
        verdict = entry.verdict
        if verdict == CONFLICT:
            if front:
                actions.append(Reject(entry.id, _reason("conflict with " + entry.target,
                                                        entry.reason)))
            else:
                actions.append(Mark(entry.id, "blocked"))
            continue                          # excluded: base unchanged
        if verdict in RED:
            if front:
                actions.append(Reject(entry.id, _reason(verdict, entry.reason)))
            else:
                actions.append(Mark(entry.id, "failing"))
            continue                          # excluded: base unchanged
        if window >= depth:
            # Built on its base, but the window has since shrunk (a lower
            # --queue-depth after a restart): keep what it has, build no more.
            actions.append(Mark(entry.id, "passed" if verdict in GREEN else "testing"))
            base = entry.tested
            stalled = True
            continue
        window += 1
        if verdict in GREEN:
            if front:
                actions.append(Land(entry.id, target_head, entry.tested))
            else:
                actions.append(Mark(entry.id, "passed"))
        else:
            actions.append(Mark(entry.id, "testing"))
        base = entry.tested
    return actions


def _reason(what: str, detail: str) -> str:
    detail = " ".join((detail or "").split())
    return f"{what}: {detail}" if detail and detail != "-" else what
