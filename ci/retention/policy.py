"""What ``--keep-results`` keeps: the policy and the pure decision of which
result files a pass prunes.

``--keep-results`` takes a count, an age, or both, separated by a comma:
``50`` keeps the 50 newest results of each branch, ``30d`` keeps every
result younger than 30 days (``s``, ``m``, ``h``, ``d`` and ``w`` units),
``50,30d`` keeps a result if either rule keeps it (it is pruned only once
it is past the 50 newest of its branch *and* older than 30 days).

Whatever the rules say, a result is never pruned while it is:

* its branch's latest verdict (the newest result of the branch, and the
  branch head the dashboard shows: the newest result no other result of
  the branch names as ``previous``);
* the commit that broke or fixed its branch (by the notifier's rule,
  ``ci.notify.decider.classify``, against its ``previous`` commit's
  verdict, read from the predecessor's result or tombstone);
* queued, running or being written (the caller leaves those out; the
  dispatcher checks again under its lock before it removes anything).

Pure: no I/O, no clock, so every rule is tested alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Callable, Iterable, Mapping

from ci.config import ConfigError
from ci.results import cell_names
from ci.notify.decider import classify

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhdw])")
# No branch (a commit dispatched without the observer's metadata): one group.
NO_BRANCH = ""
CHANGES = ("broken", "fixed")


@dataclasses.dataclass(frozen=True)
class KeepPolicy:
    """``count``: results kept per branch, newest first (None: no count
    rule); ``age``: seconds a result is kept whatever its rank (None: no
    age rule).  At least one is set."""
    count: int | None = None
    age: float | None = None

    def text(self) -> str:
        """The ``--keep-results`` value that parses back to this policy."""
        return ",".join([*([str(self.count)] if self.count is not None else []),
                         *([f"{self.age!r}s"] if self.age is not None else [])])

    def describe(self) -> str:
        parts = []
        if self.count is not None:
            parts.append(f"the newest {self.count} per branch")
        if self.age is not None:
            parts.append(f"everything younger than {self.age:g}s")
        return " and ".join(parts)


def parse_keep(text: str) -> KeepPolicy:
    """``N``, ``AGE`` or ``N,AGE`` (in either order); ConfigError otherwise."""
    count = age = None
    parts = [p.strip() for p in str(text).split(",")]
    if not 1 <= len(parts) <= 2 or not all(parts):
        raise ConfigError(f"--keep-results {text!r}: give a count (50), an age (30d) "
                          "or both (50,30d)")
    for part in parts:
        if part.isdigit():
            if count is not None or int(part) < 1:
                raise ConfigError(f"--keep-results {text!r}: the count must be one number, "
                                  "at least 1")
            count = int(part)
            continue
        match = _AGE_RE.fullmatch(part)
        if not match or age is not None or float(match.group(1)) <= 0:
            raise ConfigError(f"--keep-results {text!r}: {part!r} is neither a count nor an "
                              "age such as 90m, 12h, 30d or 8w")
        age = float(match.group(1)) * UNITS[match.group(2)]
    return KeepPolicy(count, age)


def keep_argument(text: str) -> KeepPolicy:
    """argparse type of --keep-results: a clear error for a bad value."""
    try:
        return parse_keep(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclasses.dataclass(frozen=True)
class Entry:
    """What a plan needs of one result file (its header and mtime)."""
    commit: str
    branch: str
    previous: str | None
    verdict: str
    finished: float
    # A matrix commit's cell names (its other files), from its header.
    cells: tuple[str, ...] = ()
    # The runner labels a commit without a matrix asked for (its header's
    # ``labels``, "" for none): its tombstone keeps them for a retest.
    labels: str = ""


def protected(entries: Mapping[str, Entry], pruned_verdicts: Mapping[str, str],
              pace: Callable[[], object] = lambda: None,
              pruned_named: Iterable[tuple[str, str]] = ()) -> set[str]:
    """Commits kept whatever the policy: each branch's latest verdict and
    head, and every commit that broke or fixed its branch.  A head is a
    commit no later one names, pruned ones too (``pruned_named``: their
    (branch, previous)): a retest of an old commit whose successor was
    pruned made it the head, and the real tip was pruned."""
    keep: set[str] = set()
    newest: dict[str, Entry] = {}
    heads: dict[str, Entry] = {}
    named: set[tuple[str, str | None]] = set(pruned_named)
    for e in entries.values():
        pace()
        if e.previous:
            named.add((e.branch, e.previous))
    for entry in entries.values():
        pace()
        if entry.branch not in newest or _later(entry, newest[entry.branch]):
            newest[entry.branch] = entry
        if (entry.branch, entry.commit) not in named and \
                (entry.branch not in heads or _later(entry, heads[entry.branch])):
            heads[entry.branch] = entry
        if _changed(entry, entries, pruned_verdicts):
            keep.add(entry.commit)
    keep.update(e.commit for e in newest.values())
    keep.update(e.commit for e in heads.values())
    return keep


def _later(a: Entry, b: Entry) -> bool:
    return (a.finished, a.commit) > (b.finished, b.commit)


def _changed(entry: Entry, entries: Mapping[str, Entry],
             pruned_verdicts: Mapping[str, str]) -> bool:
    """Did this commit break or fix its branch (the notifier's rule)?"""
    if not entry.previous or entry.previous == entry.commit or not entry.branch:
        return False
    before = entries.get(entry.previous)
    verdict = before.verdict if before is not None else pruned_verdicts.get(entry.previous)
    return verdict is not None and classify(verdict, entry.verdict) in CHANGES


def plan(entries: Mapping[str, Entry], policy: KeepPolicy, now: float,
         pruned_verdicts: Mapping[str, str] | None = None,
         pending: Iterable[str] = (), pace: Callable[[], object] = lambda: None,
         pruned_named: Iterable[tuple[str, str]] = ()) -> list[str]:
    """The commits to prune, oldest first.  ``entries``: every result
    file; ``pruned_verdicts``: verdicts of commits pruned before, so a
    change against a pruned predecessor is still recognised; ``pending``:
    queued or running (a retest), kept (their verdicts still judge the
    commits after them), and so are the commits after them (a retest's new
    verdict may make one that broke or fixed its branch); ``pace``: called
    before each entry of each loop (the worker's Pacer waits there while a
    result is being stored, and rests now and then: 100,000 entries are
    most of a second of pure Python); ``pruned_named``: see ``protected``."""
    pending = set(pending)
    keep = protected(entries, pruned_verdicts or {}, pace, pruned_named) | pending
    keep.update(e.commit for e in entries.values() if e.previous in pending)
    by_branch: dict[str, list[Entry]] = {}
    for entry in entries.values():
        pace()
        by_branch.setdefault(entry.branch, []).append(entry)
    doomed: list[Entry] = []
    for group in by_branch.values():
        pace()
        group.sort(key=lambda e: (e.finished, e.commit), reverse=True)
        for rank, entry in enumerate(group):
            pace()
            if entry.commit not in keep and _expired(policy, rank, entry, now):
                doomed.append(entry)
    pace()
    doomed.sort(key=lambda e: (e.finished, e.commit))
    return [e.commit for e in doomed]


def _expired(policy: KeepPolicy, rank: int, entry: Entry, now: float) -> bool:
    """Past every rule that is set (either rule alone keeps a result)."""
    if policy.count is not None and rank < policy.count:
        return False
    if policy.age is not None and now - entry.finished < policy.age:
        return False
    return True


def branch_of(fields: Mapping[str, str]) -> str:
    return fields.get("branch") or NO_BRANCH


def entry_of(commit: str, fields: Mapping | None, finished: float) -> Entry | None:
    """The plan's entry for a result file's header fields, finished at
    ``finished`` (None: no verdict, not a complete result): what the
    worker reads from a header and the dispatcher writes to the result
    index (ci/retention/index.py)."""
    if not fields or not fields.get("verdict"):
        return None
    cells = tuple(cell_names(fields))
    return Entry(commit, branch_of(fields), fields.get("previous") or None,
                 str(fields["verdict"]), finished, cells,
                 "" if cells else str(fields.get("labels") or ""))
