"""The dispatcher's journal: an append-only file of one record a line,
replayed at start to rebuild the queue after a crash.

Records (fields separated by one space; commit ids are full ids)::

    Q <commit>                          queued (fsynced before ``dispatch`` is answered)
    M <commit> <previous|-> <branch>    the observer's metadata for a queued commit
    R <commit>                          test again although a result exists (retest)
    A <commit> <token> <runner> <name|->  assigned to a runner with this token
    L <commit>                          a run lost its runner (poison counting)
    S <commit> <shards>                 this round is split into shards (before any
                                        shard's ``A``): its tokens prove shards, never
                                        the whole commit; a restart runs it again
    D <commit>                          done: its result file is on disk

Only ``Q``, ``M`` and ``R`` need fsync before a reply.  ``A`` is written
before the ``runtest`` it records is sent, so that after a restart a
runner still running the commit can prove the assignment with its token.
A torn last line (a crash mid-write) or any line that does not parse is
skipped, so a damaged tail never stops a restart.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import threading

from ci.wire import TOKEN_RE
from ci.files import atomic_write
from ci.wire import valid_full_commit

BRANCH_RE = re.compile(r"[^\s\x00-\x1f\x7f]{1,255}")


@dataclasses.dataclass
class Assignment:
    """One ``runtest`` that was really handed out: the token proves it."""
    token: str
    runner: str          # the runner's address key, host:port
    name: str | None     # the name of the runner's issued key, if any


@dataclasses.dataclass
class Replayed:
    order: list = dataclasses.field(default_factory=list)       # queued, first first
    assigned: dict = dataclasses.field(default_factory=dict)    # commit -> [Assignment]
    lost: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    done: set = dataclasses.field(default_factory=set)
    retest: set = dataclasses.field(default_factory=set)
    meta: dict = dataclasses.field(default_factory=dict)        # commit -> (branch, previous)
    sharded: set = dataclasses.field(default_factory=set)


def parse_meta_line(line: str) -> tuple[str, str | None, str] | None:
    """``<commit> <previous|-> <branch>`` (the dispatch body's line format,
    also the ``M`` record's); None if it does not parse."""
    parts = line.split(" ")
    if len(parts) != 3 or not valid_full_commit(parts[0]):
        return None
    previous = None if parts[1] == "-" else parts[1]
    if previous is not None and not valid_full_commit(previous):
        return None
    if not BRANCH_RE.fullmatch(parts[2]):
        return None
    return parts[0], previous, parts[2]


def meta_record(commit: str, branch: str, previous: str | None) -> str:
    return f"M {commit} {previous or '-'} {branch}"


def shard_record(commit: str, shards: int) -> str:
    return f"S {commit} {shards}"


def assign_record(commit: str, a: Assignment) -> str:
    return f"A {commit} {a.token} {a.runner} {a.name or '-'}"


def replay_lines(data: bytes) -> Replayed:
    """Fold journal bytes into what is pending.  Pure, for tests."""
    out = Replayed()
    order: dict[str, None] = {}
    for raw in data.split(b"\n"):
        parts = raw.decode("ascii", "replace").split(" ")
        if len(parts) < 2 or not valid_full_commit(parts[1]):
            continue
        kind, commit = parts[0], parts[1]
        if kind == "Q" and len(parts) == 2:
            order.setdefault(commit)
        elif kind == "M":
            parsed = parse_meta_line(" ".join(parts[1:]))
            if parsed:
                out.meta[commit] = (parsed[2], parsed[1])
        elif kind == "A" and len(parts) == 5 and TOKEN_RE.fullmatch(parts[2]):
            name = None if parts[4] == "-" else parts[4]
            out.assigned.setdefault(commit, []).append(Assignment(parts[2], parts[3], name))
        elif kind == "L" and len(parts) == 2:
            out.lost[commit] += 1
        elif kind == "D" and len(parts) == 2:
            out.done.add(commit)
            out.retest.discard(commit)
            out.sharded.discard(commit)
        elif kind == "S" and len(parts) == 3:
            out.sharded.add(commit)
        elif kind == "R" and len(parts) == 2:
            out.retest.add(commit)
            # A retest starts a new round: earlier assignments are history.
            out.assigned.pop(commit, None)
            out.sharded.discard(commit)
    out.order = list(order)
    return out


class Journal:
    """The file and one lock.  Lock order where both are taken: the
    dispatcher's condition first, then this lock (never the other way)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._handle = None
        self.records = 0

    def replay(self) -> Replayed:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            data = b""
        return replay_lines(data)

    def rewrite(self, lines: list[str]) -> None:
        """Atomically replace the journal with only what is still pending."""
        data = ("\n".join(lines) + "\n").encode() if lines else b""
        with self._lock:
            # Write first: if that fails, the old file and handle stay in
            # use; a closed handle would make every later append fail.
            atomic_write(self.path, data)
            if self._handle:
                self._handle.close()
            self._handle = open(self.path, "ab")
            self.records = len(lines)

    def append(self, records: list[str], sync: bool) -> None:
        if not records:
            return
        with self._lock:
            if self._handle is None:
                raise OSError("journal is closed")
            self._handle.write(("\n".join(records) + "\n").encode())
            self._handle.flush()
            if sync:
                os.fsync(self._handle.fileno())
            self.records += len(records)

    def close(self) -> None:
        with self._lock:
            if self._handle:
                self._handle.flush()
                os.fsync(self._handle.fileno())
                self._handle.close()
                self._handle = None
