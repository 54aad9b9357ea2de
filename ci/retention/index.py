"""The result index: one line per result file the dispatcher stores, with
what the pruner's plan needs of its header, so that a new pruner worker
(after a restart of the dispatcher) plans without reading every header.

Why: on a machine whose page cache does not keep old result files (a
virtual machine that hands free memory back, or simply a large folder), a
plan over 100,000 results read them from the disk, about 3 KB each (290 MB
here, 5 to 40 s), and every one of those reads shared the disk with the
results being stored.  The index is one file read from its start.

It is a cache, never the truth: each line carries the file's stamp
(modification time in ns, size, inode number) taken from the written file
itself before it was renamed into place, and the worker uses a line only
while the file's stat still shows that stamp; any other file (written by
an older version, replaced since, a line lost) has its header read as
before.  So the index is appended without an fsync, a torn or damaged line
is skipped, and the worker rewrites it from what it knows after a pass
(dropping the lines of pruned and replaced files); lines the dispatcher
appended meanwhile may be lost by that rewrite, which only costs their
header reads at the next new worker.

A line (JSON)::

    [commit, [mtime_ns, size, inode], branch, previous|null, verdict, mtime, [cells], labels]

(``labels`` is left out when empty, and a line without it has none.)
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable

from ci.files import atomic_write
from ci.retention import policy as keep
from ci.wire import valid_full_commit

log = logging.getLogger(__name__)

FILE_NAME = "result-index"
# A line longer than this is not one of ours (a matrix commit names at
# most MAX_HEADER_CELLS cells).
MAX_LINE = 64 * 1024

Stamp = tuple[int, int, int]


def stamp_of(st: os.stat_result) -> Stamp:
    """What a line must match: a file replaced since has another inode, a
    file rewritten in place another mtime or size."""
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def format_line(stamp: Stamp, entry: keep.Entry) -> str:
    row = [entry.commit, list(stamp), entry.branch, entry.previous, entry.verdict,
           entry.finished, list(entry.cells)] + ([entry.labels] if entry.labels else [])
    return json.dumps(row, separators=(",", ":")) + "\n"


def parse_line(line: bytes) -> tuple[Stamp, keep.Entry] | None:
    """The stamp and entry of one line; None for one that does not parse
    (a torn last line, damage)."""
    if len(line) > MAX_LINE:
        return None
    try:
        commit, stamp, branch, previous, verdict, finished, cells, *labels = json.loads(line)
        labels = labels[0] if len(labels) == 1 else ""
        stamp = tuple(int(n) for n in stamp)
        if not (valid_full_commit(commit) and len(stamp) == 3 and isinstance(branch, str)
                and (previous is None or valid_full_commit(previous))
                and isinstance(verdict, str) and verdict
                and isinstance(finished, (int, float)) and not isinstance(finished, bool)
                and isinstance(cells, list) and all(isinstance(c, str) for c in cells)
                and isinstance(labels, str)):
            return None
    except (ValueError, TypeError):
        return None
    return stamp, keep.Entry(commit, branch, previous, verdict, float(finished), tuple(cells),
                             labels)


def append(path: str, stamp: Stamp, entry: keep.Entry) -> None:
    """One line at the end (opened and closed each time, so a rewrite by
    the worker is followed at once); OSError is the caller's to log."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, format_line(stamp, entry).encode())
    finally:
        os.close(fd)


def add(path: str | None, commit: str, header, written: os.stat_result) -> None:
    """The line for a commit's own result file the dispatcher just stored
    (``header`` its fields, ``written`` its stat: atomic_write's), in the
    index at ``path`` (None: none kept).  A failure is logged, not raised:
    it only costs that header's read."""
    if path is None:
        return
    entry = keep.entry_of(commit, header, written.st_mtime)
    if entry is None:
        return
    try:
        append(path, stamp_of(written), entry)
    except OSError as exc:
        log.warning("cannot add %s to the result index: %s", commit[:12], exc)


def load(path: str, pace: Callable[[], object] = lambda: None
         ) -> tuple[dict[str, tuple[Stamp, keep.Entry]], int]:
    """commit -> (stamp, entry), the last line of each commit winning, and
    the number of lines read; ({}, 0) without a file.  ``pace``: called
    before each line (the worker's Pacer: 100,000 lines are half a second
    of Python)."""
    found: dict[str, tuple[Stamp, keep.Entry]] = {}
    lines = 0
    try:
        with open(path, "rb") as handle:
            for line in handle:
                pace()
                lines += 1
                parsed = parse_line(line)
                if parsed is not None:
                    found[parsed[1].commit] = parsed
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot read the result index %s: %s", path, exc)
    return found, lines


def rewrite(path: str, known: dict[str, tuple[Stamp, keep.Entry | None]],
            pace: Callable[[], object] = lambda: None) -> None:
    """The index replaced by what the worker knows (its header cache: the
    complete results in the folder now); ``pace`` as for ``load``."""
    lines = []
    for stamp, entry in known.values():
        pace()
        if entry is not None:
            lines.append(format_line(stamp, entry))
    atomic_write(path, "".join(lines).encode(), fsync=False)
