"""The dispatcher's journal: an append-only file of one record a line,
replayed at start to rebuild the queue after a crash.

Records (fields separated by one space; commit ids are full ids; where a
record says ``<commit>``, a matrix cell's records say ``<commit>:<cell>``,
its work's key: every guarantee of a commit holds per cell)::

    Q <commit>                          queued (fsynced before ``dispatch`` is answered)
    M <commit> <previous|-> <branch> [merge=... [conflict=...]]
                                        the observer's metadata for a queued commit;
                                        a merge commit's (or a conflict's) fields as
                                        the dispatch line had them (ci/mergeinfo.py;
                                        an ``M`` without them, as older journals
                                        have it, is a plain commit's)
    R <commit>                          test again although a result exists (retest)
    A <commit> <token> <runner> <name|->  assigned to a runner with this token
    L <commit>                          a run lost its runner (poison counting)
    S <commit> <shards>                 this round is split into shards (before any
                                        shard's ``A``): its tokens prove shards, never
                                        the whole commit; a restart runs it again
    D <commit>                          done: its result file is on disk
    C <commit>:<cell> <python|-> <labels|-> [axis=value ...]
                                        the cell's definition (labels comma-separated),
                                        journalled with its ``Q``; ``C <commit> - <labels>``:
                                        a commit without a matrix whose recipe asks
                                        for labels
    E <commit> <reason>                 the observer could not read its matrix: the
                                        ``error`` verdict with this (%-quoted) reason

Only ``Q``, ``M`` and ``R`` need fsync before a reply.  ``A`` is written
before the ``runtest`` it records is sent, so that after a restart a
runner still running the commit can prove the assignment with its token.
Only lines that end with a newline are read: a torn last line (a crash
mid-write) is never taken, even when what is left of it parses (``M``
cut before ``conflict=`` would run a conflict's merge, ``D <commit>:<cell>``
cut to ``D <commit>`` would end the whole commit).  A line that does not
parse is skipped, so a damaged tail never stops a restart.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import urllib.parse

from ci import matrix, mergeinfo
from ci.appendlog import AppendLog
from ci.files import whole_lines
from ci.wire import TOKEN_RE, valid_full_commit

BRANCH_RE = re.compile(r"[^\s\x00-\x1f\x7f]{1,255}")


@dataclasses.dataclass
class AssignmentRecord:
    """The journal's record of one ``runtest`` that was really handed out
    (an ``A`` line): the token proves it after a restart.  The live job,
    with its runner's address and start time, is ``work.Job``."""
    token: str
    runner: str          # the runner's address key, host:port
    name: str | None     # the name of the runner's issued key, if any


@dataclasses.dataclass
class Replayed:
    order: list = dataclasses.field(default_factory=list)       # queued, first first
    assigned: dict = dataclasses.field(default_factory=dict)    # commit -> [AssignmentRecord]
    lost: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    done: set = dataclasses.field(default_factory=set)
    retest: set = dataclasses.field(default_factory=set)
    # commit -> (branch, previous, merge info, conflicting paths)
    meta: dict = dataclasses.field(default_factory=dict)
    sharded: set = dataclasses.field(default_factory=set)
    cells: dict = dataclasses.field(default_factory=dict)       # key -> matrix.Cell
    group_keys: dict = dataclasses.field(default_factory=dict)  # commit -> {key}
    errors: dict = dataclasses.field(default_factory=dict)      # key -> reason


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


def make_key(commit: str, cell: str = "") -> str:
    """A unit of work's key: the commit, or ``<commit>:<cell>``."""
    return f"{commit}:{cell}" if cell else commit


def split_key(key: str) -> tuple[str, str] | None:
    """(commit, cell) of a key; None for one that is neither."""
    commit, sep, cell = key.partition(":")
    if not valid_full_commit(commit) or (sep and not (cell and matrix.is_cell_name(cell))):
        return None
    return commit, cell


def key_commit(key: str) -> str:
    return key.partition(":")[0]


# ---- the records, built and parsed here only ---------------------------------

QUEUED, META, RETEST, ASSIGNED, LOST, SHARDED, DONE = "Q", "M", "R", "A", "L", "S", "D"
CELL, ERROR = "C", "E"
# The kinds that are the commit id alone.
BARE_KINDS = (QUEUED, RETEST, LOST, DONE)


def queue_record(commit: str) -> str:
    return f"{QUEUED} {commit}"


def retest_record(commit: str) -> str:
    return f"{RETEST} {commit}"


def lost_record(commit: str) -> str:
    return f"{LOST} {commit}"


def done_record(commit: str) -> str:
    return f"{DONE} {commit}"


def meta_record(commit: str, branch: str, previous: str | None,
                merge: mergeinfo.MergeInfo | None = None,
                conflicts: tuple[str, ...] | None = None) -> str:
    return f"{META} {commit} {previous or '-'} {branch}" + merge_fields(merge, conflicts)


def merge_fields(merge: mergeinfo.MergeInfo | None, conflicts: tuple[str, ...] | None) -> str:
    """`` merge=... conflict=...`` as a dispatch line has them ("" for a
    plain commit)."""
    if merge is None:
        return ""
    text = " " + mergeinfo.encode_merge_field(merge)
    return text + (" " + mergeinfo.encode_conflicts(conflicts) if conflicts is not None else "")


def shard_record(commit: str, shards: int) -> str:
    return f"{SHARDED} {commit} {shards}"


def assign_record(commit: str, a: AssignmentRecord) -> str:
    return f"{ASSIGNED} {commit} {a.token} {a.runner} {a.name or '-'}"


def cell_record(key: str, cell: matrix.Cell) -> str:
    axes = "".join(f" {axis}={value}" for axis, value in cell.axes)
    return f"{CELL} {key} {cell.python or '-'} {','.join(sorted(cell.labels)) or '-'}{axes}"


def error_record(key: str, reason: str) -> str:
    return f"{ERROR} {key} {urllib.parse.quote(reason, safe='')}"


def _parse_cell(key: str, parts: list[str]) -> matrix.Cell | None:
    try:
        python = None if parts[0] == "-" else parts[0]
        labels = frozenset() if parts[1] == "-" else matrix.parse_labels(
            parts[1].replace(",", " "))
        axes = matrix.parse_axes(" ".join(parts[2:]))
    except (IndexError, matrix.MatrixError):
        return None
    if python is not None and not matrix.PYTHON_RE.fullmatch(python):
        return None
    name = split_key(key)[1]
    if not name and (python is not None or axes):
        return None     # a commit's only, unnamed cell carries labels at most
    return matrix.Cell(name, python, axes, labels)


@dataclasses.dataclass(frozen=True)
class Record:
    """One parsed journal line.  ``value``: None for the bare kinds, the
    (branch, previous, merge info, conflicts) of ``M``, the ``AssignmentRecord`` of ``A``,
    the shard count of ``S``."""
    kind: str
    commit: str
    value: object = None


def parse_record(line: str) -> Record | None:
    """The record of one (whole) journal line; None for one that does not
    parse (damage): replay skips it."""
    parts = line.split(" ")
    if len(parts) < 2 or split_key(parts[1]) is None:
        return None
    kind, commit = parts[0], parts[1]
    if kind in BARE_KINDS and len(parts) == 2:
        return Record(kind, commit)
    if kind == META:
        parsed = parse_meta_line(" ".join([key_commit(commit), *parts[2:4]]))
        merge, conflicts = mergeinfo.parse_extra_fields(parts[4:])
        return Record(kind, commit, (parsed[2], parsed[1], merge, conflicts)) \
            if parsed else None
    if kind == ASSIGNED and len(parts) == 5 and TOKEN_RE.fullmatch(parts[2]):
        name = None if parts[4] == "-" else parts[4]
        return Record(kind, commit, AssignmentRecord(parts[2], parts[3], name))
    if kind == SHARDED and len(parts) == 3 and parts[2].isdigit():
        return Record(kind, commit, int(parts[2]))
    if kind == CELL:
        cell = _parse_cell(commit, parts[2:])
        return Record(kind, commit, cell) if cell else None
    if kind == ERROR and len(parts) == 3:
        return Record(kind, commit, urllib.parse.unquote(parts[2]))
    return None


def replay_lines(data: bytes) -> Replayed:
    """Fold journal bytes into what is pending.  Pure, for tests."""
    out = Replayed()
    order: dict[str, None] = {}
    for raw in whole_lines(data):
        record = parse_record(raw.decode("ascii", "replace"))
        if record is None:
            continue
        commit = record.commit
        if record.kind == QUEUED:
            order.setdefault(commit)
        elif record.kind == META:
            out.meta[commit] = record.value
        elif record.kind == ASSIGNED:
            out.assigned.setdefault(commit, []).append(record.value)
        elif record.kind == LOST:
            out.lost[commit] += 1
        elif record.kind == DONE:
            out.done.add(commit)
            out.lost.pop(commit, None)   # the poison count is per round
            for key in out.group_keys.pop(commit, ()):
                out.cells.pop(key, None)   # the commit's own result: complete
            out.retest.discard(commit)
            out.sharded.discard(commit)
        elif record.kind == SHARDED:
            out.sharded.add(commit)
        elif record.kind == CELL:
            out.cells[commit] = record.value
            out.group_keys.setdefault(key_commit(commit), set()).add(commit)
        elif record.kind == ERROR:
            out.errors[commit] = record.value
        elif record.kind == RETEST:
            out.retest.add(commit)
            # A retest starts a new round: earlier assignments and lost
            # runs are history.
            out.assigned.pop(commit, None)
            out.lost.pop(commit, None)
            out.sharded.discard(commit)
    out.order = list(order)
    return out


class Journal:
    """The dispatcher's journal on an ``AppendLog`` (its lock is the one
    lock of the file).  Lock order where both are taken: the dispatcher's
    condition first, then the file's lock (never the other way)."""

    def __init__(self, path: str):
        self.path = path
        self._log = AppendLog(path)

    @property
    def records(self) -> int:
        return self._log.records

    def replay(self) -> Replayed:
        return replay_lines(self._log.read())

    def rewrite(self, lines: list[str]) -> None:
        """Atomically replace the journal with only what is still pending."""
        data = ("\n".join(lines) + "\n").encode() if lines else b""
        self._log.rewrite(data, len(lines))

    def append(self, records: list[str], sync: bool) -> None:
        if records:
            self._log.append(("\n".join(records) + "\n").encode(), len(records), sync)

    def close(self) -> None:
        self._log.close()