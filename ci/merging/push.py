"""What a push says and what it means: ``git push --porcelain`` prints a
line per ref, ``<flag>\\t<from>:<to>\\t<summary> (<reason>)``, and those
lines (not the exit status, not a guess) decide.  Pure parsing here; the
pushes themselves are ``MergeRepo``'s."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from ci.wire import valid_full_commit

MERGES_NAMESPACE = "refs/ci/merges/"

# Porcelain flags of a ref the remote now has as asked.
DONE_FLAGS = frozenset(" +*=-")


@dataclasses.dataclass(frozen=True)
class Landed:
    commit: str
    state = "landed"


@dataclasses.dataclass(frozen=True)
class Stale:
    """The lease failed: the target is no longer the expected old commit."""
    reason: str = "stale info: the target moved"
    state = "stale"


@dataclasses.dataclass(frozen=True)
class Failed:
    reason: str
    state = "failed"


class RefStatus(NamedTuple):
    flag: str
    source: str
    dest: str
    summary: str
    reason: str

    @property
    def done(self) -> bool:
        return self.flag in DONE_FLAGS

    def describe(self) -> str:
        return f"{self.summary} ({self.reason})" if self.reason else self.summary


def parse_porcelain(text: str) -> dict[str, RefStatus]:
    """Each ref line of ``git push --porcelain``'s output, by destination
    ref; ``To <url>`` and ``Done`` lines are skipped."""
    found = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or len(parts[0]) != 1:
            continue
        flag, refs, summary = parts
        source, sep, dest = refs.rpartition(":")
        if not sep or not dest:
            continue
        summary, reason = summary, ""
        if summary.endswith(")") and " (" in summary:
            summary, _, reason = summary[:-1].partition(" (")
        found[dest] = RefStatus(flag, source, dest, summary, reason)
    return found


def land_outcome(status: RefStatus | None, new: str):
    """Landed / Stale / Failed from the target ref's porcelain line; None
    when there is no line (the outcome is unclear: ask the remote)."""
    if status is None:
        return None
    if status.done and status.flag != "-":
        return Landed(new)
    if status.flag == "!" and status.reason == "stale info":
        return Stale()
    return Failed(status.describe())


def decide_from_remote(remote: str | None, old: str, new: str, why: str):
    """An unclear push (no report: the connection broke, the time ran out)
    decided by what the remote's target now is."""
    if remote == new:
        return Landed(new)
    if remote == old:
        return Failed(f"not pushed, the target is unchanged ({why})")
    return Stale(f"the target is now {remote[:12] if remote else 'gone'} ({why})")


def parse_ls_remote(text: str, ref: str) -> str | None:
    """The commit ``git ls-remote URL <ref>`` names for exactly ``ref``."""
    for line in text.splitlines():
        commit, _, name = line.partition("\t")
        if name == ref and valid_full_commit(commit):
            return commit
    return None


def merge_ref(commit: str) -> str:
    return MERGES_NAMESPACE + commit


def unfinished(statuses: dict[str, RefStatus], refs: list[str]) -> list[str]:
    """The refs of ``refs`` the remote did not take, each with why."""
    missing = []
    for ref in refs:
        status = statuses.get(ref)
        if status is None:
            missing.append(f"{ref}: no report")
        elif not status.done:
            missing.append(f"{ref}: {status.describe()}")
    return missing
