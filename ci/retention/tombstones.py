"""Tombstones: what is left of a pruned result, one line per commit in the
dispatcher's state folder (``pruned-results``), so that pruning never
makes a commit look untested.

The dispatcher's recovery counts a commit as done when it has a result
file *or* a tombstone, so a pruned commit still named by the journal is
not queued again after a restart, and a ``dispatch`` naming it again is
skipped as for any finished commit.  The tombstone file is not the
journal: the journal's compaction never touches it.  A line keeps what
the dashboard and the next prune need (the verdict, so a later commit's
broke/fixed mark can still be judged against it; the branch, for the
per-branch counts)::

    <commit> <verdict> <finished> <pruned> <previous|-> <branch|->

Lines are appended and fsynced *before* the files are removed: a crash in
between leaves a tombstone beside a result file, and the file wins (a
tombstone only speaks for a commit without one).  The file stays bounded:
past ``MAX_TOMBSTONES`` lines it is rewritten without the oldest quarter
(a commit pruned that long ago is far behind every branch's last
dispatched commit, so nothing sends it again).  As in the journal, a line
counts only with its newline (a torn last line cut before its cells
still parses) and a damaged one is skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

from ci.files import atomic_write, open_append, whole_lines
from ci.wire import valid_full_commit

log = logging.getLogger(__name__)

FILE_NAME = "pruned-results"
MAX_TOMBSTONES = 500_000
NONE = "-"


@dataclasses.dataclass(frozen=True)
class Tombstone:
    commit: str
    verdict: str
    finished: float          # when its result was written (the file's mtime)
    pruned: float            # when it was pruned
    previous: str | None
    branch: str | None
    # A matrix commit's cells (``matrix.encode_plan``'s field, "" for none):
    # a retest of it, once its cell files are gone, runs them again.
    cells: str = ""


def format_line(t: Tombstone) -> str:
    return (f"{t.commit} {t.verdict} {t.finished:.0f} {t.pruned:.0f} "
            f"{t.previous or NONE} {t.branch or NONE}" + (f" {t.cells}" if t.cells else ""))


def parse_line(line: str) -> Tombstone | None:
    """The tombstone of one line; None for one that does not parse."""
    parts = line.split(" ")
    if len(parts) not in (6, 7) or not valid_full_commit(parts[0]) or not parts[1].isalpha():
        return None
    try:
        finished, pruned = float(parts[2]), float(parts[3])
    except ValueError:
        return None
    previous = None if parts[4] == NONE else parts[4]
    if previous is not None and not valid_full_commit(previous):
        return None
    return Tombstone(parts[0], parts[1], finished, pruned, previous,
                     None if parts[5] == NONE else parts[5], parts[6] if len(parts) == 7 else "")


def parse_lines(data: bytes) -> dict[str, Tombstone]:
    """commit -> its newest tombstone, in file order."""
    out: dict[str, Tombstone] = {}
    for raw in whole_lines(data):
        tombstone = parse_line(raw.decode("utf-8", "replace"))
        if tombstone is not None:
            out.pop(tombstone.commit, None)
            out[tombstone.commit] = tombstone
    return out


def read(path: str) -> dict[str, Tombstone]:
    """Every tombstone in the file at ``path`` (none when it is missing)."""
    try:
        with open(path, "rb") as handle:
            return parse_lines(handle.read())
    except FileNotFoundError:
        return {}


class TombstoneFile:
    """The file and one lock; only the pruner thread writes it, the
    dispatcher reads it once at start."""

    def __init__(self, path: str, limit: int = MAX_TOMBSTONES):
        self.path = path
        self.limit = limit
        self._lock = threading.Lock()
        self.lines = 0

    def load(self) -> dict[str, Tombstone]:
        found = read(self.path)
        self.lines = len(found)
        return found

    def find(self, commit: str) -> Tombstone | None:
        """A commit's newest tombstone, read from the file line by line (a
        retest of a pruned commit: rare, so nothing is kept in memory)."""
        prefix = commit.encode() + b" "
        found = None
        with self._lock:
            try:
                with open(self.path, "rb") as handle:
                    for raw in handle:
                        if raw.startswith(prefix) and raw.endswith(b"\n"):
                            found = parse_line(raw.rstrip(b"\n").decode("utf-8", "replace")) \
                                or found
            except FileNotFoundError:
                return None
        return found

    def find_many(self, commits) -> dict[str, Tombstone]:
        """The newest tombstone of each of ``commits`` that has one, from
        one pass over the file (the ``verdicts`` command's pruned commits)."""
        wanted = {c.encode() for c in commits}
        found: dict[str, Tombstone] = {}
        if not wanted:
            return found
        with self._lock:
            try:
                with open(self.path, "rb") as handle:
                    for raw in handle:
                        if raw.partition(b" ")[0] in wanted and raw.endswith(b"\n"):
                            stone = parse_line(raw.rstrip(b"\n").decode("utf-8", "replace"))
                            if stone is not None:
                                found[stone.commit] = stone
            except FileNotFoundError:
                pass
        return found

    def append(self, tombstones: list[Tombstone]) -> list[str]:
        """Durably, before the files they stand for are removed.  Returns
        the commits whose tombstones a trim dropped (usually none).  A line
        a crash tore is cut off first: glued to it, the first of these
        would be unreadable while its files are gone (a pruned commit with
        neither, tested again as new)."""
        if not tombstones:
            return []
        data = "".join(format_line(t) + "\n" for t in tombstones).encode()
        with self._lock:
            with open_append(self.path) as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            self.lines += len(tombstones)
            if self.lines > self.limit:
                return self._trim()
        return []

    def _trim(self) -> list[str]:
        """Rewrite without the oldest quarter of the limit (by pruning
        time); the commits dropped."""
        kept = sorted(read(self.path).values(), key=lambda t: t.pruned)
        cut = len(kept) - self.limit * 3 // 4 if len(kept) > self.limit else 0
        dropped, kept = [t.commit for t in kept[:cut]], kept[cut:]
        atomic_write(self.path, "".join(format_line(t) + "\n" for t in kept).encode())
        self.lines = len(kept)
        log.info("tombstones trimmed to %d (oldest dropped)", len(kept))
        return dropped


class VerdictFollower:
    """The verdicts of the pruned commits, from the file, following it as
    it grows: each ``verdicts()`` reads only the lines appended since the
    last one, and the whole file again after a trim (a new file) or when
    it shrank.  For the pruner's worker, which plans a pass every few
    minutes against a file of up to MAX_TOMBSTONES lines."""

    def __init__(self, path: str):
        self.path = path
        self.known: dict[str, str] = {}
        # (branch, previous) of every pruned commit: they still name their
        # predecessors (policy.protected: which commit is a branch's head).
        self.named: set[tuple[str, str]] = set()
        self.inode = None
        self.offset = 0

    def verdicts(self) -> dict[str, str]:
        try:
            with open(self.path, "rb") as handle:
                st = os.fstat(handle.fileno())
                if st.st_ino != self.inode or st.st_size < self.offset:
                    self.known, self.inode, self.offset = {}, st.st_ino, 0
                    self.named = set()
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            self.known, self.inode, self.offset, self.named = {}, None, 0, set()
            return self.known
        whole = data[:data.rfind(b"\n") + 1]      # a line still being written waits
        self.offset += len(whole)
        stones = parse_lines(whole)
        self.known.update((c, t.verdict) for c, t in stones.items())
        self.named.update((t.branch, t.previous) for t in stones.values()
                          if t.branch and t.previous)
        return self.known
