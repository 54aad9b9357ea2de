"""The test history's writer process: a child of the dispatcher that owns
the store's only read-write connection (``python -m ci.history.child``).

Why a process and not a thread: encoding a result's records and SQLite's
work take a few milliseconds of CPU per result, which a thread in the
dispatcher would take from the request handlers under the GIL.  So the
dispatcher sends only one short line per result down this process's
stdin (ci/history/writer.py), and this process reads the result's files
itself, as the catch-up does:

* ``result <commit>``: read ``test_results/<commit>`` and its JUnit file
  and write the run (replacing the commit's earlier run: a retest);
* ``forget <commit>``: drop the commit's run (its result was pruned;
  once the pass is over, in run order: ``StoreWriter._drop_pruned``);
* ``catchup``: lines were dropped (the pipe was full): catch up from the
  result files.

It prints ``ready`` on stdout after every catch-up (the first one builds a
missing or broken store).  It exits when its stdin closes, so a dispatcher
that dies, even by SIGKILL, leaves no writer behind.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sqlite3
import sys
import threading
import time

from ci.config import ArgumentParser, configure_logging, positive
from ci.history import store
from ci.retention.gate import GateView
from ci.wire import valid_full_commit

log = logging.getLogger(__name__)

# Lines waiting in this process, at most: past it, the results are left
# to the catch-up from their files.
MAX_PENDING_LINES = 100_000
# Results written per transaction, at most.
BATCH_RUNS = 64
# After a failed write (locked, disk full), wait this long before trying again.
RETRY_DELAY = 1.0
# A line longer than this is no line of ours.
MAX_LINE = 200
KINDS = ("result", "forget")
# Writing waits until no line came for SETTLE seconds (a burst of results
# is over), unless the oldest waiting line is MAX_DEFER seconds old.
SETTLE = 0.2
MAX_DEFER = 10.0
# Pruned runs (``forget`` lines) are dropped once no such line came for
# FORGET_SETTLE seconds (a pass is over) or FORGET_CAP of them wait, in the
# order the store holds them (run id: oldest first), FORGET_CHUNK runs per
# transaction, resting FORGET_REST times as long as each took.
FORGET_SETTLE = 2.0
FORGET_CAP = 200_000
FORGET_CHUNK = 500
FORGET_REST = 1.0
# Added to the process's nice value (lower_priority).
NICENESS = 10


class StoreWriter:
    """The writing loop (main thread) fed by a reader of stdin (its own
    thread) through a queue; ``pending`` is guarded by ``_count_lock``."""

    def __init__(self, path: str, results_dir: str, out=None,
                 max_pending: int = MAX_PENDING_LINES, gate: GateView | None = None):
        self.path = path
        self.results_dir = results_dir
        self.out = out
        self.max_pending = max_pending
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.pending = 0
        self._count_lock = threading.Lock()
        # Set when the store may lack results the files have.
        self.behind = threading.Event()
        self.behind.set()
        self.stop_event = threading.Event()
        self.conn: sqlite3.Connection | None = None
        # The dispatcher's result gate (a transaction waits while a result
        # is being stored); none: never waits.
        self.gate = gate or GateView(-1)
        # When the reader last queued a line (``clock``; for ``_settle``).
        self.clock = time.monotonic
        self.last_line = 0.0
        # Pruned commits whose runs are still to drop (an ordered set), and
        # when the last ``forget`` was taken: the writing loop's own.
        self.pruned: dict[str, None] = {}
        self.last_forget = 0.0

    # ---- the reader thread ------------------------------------------------
    def feed(self, stream) -> None:
        """Queue every line of ``stream``; at its end (the dispatcher is
        gone or stopping), stop the writer."""
        try:
            for raw in iter(lambda: stream.readline(MAX_LINE), b""):
                self.take_line(raw)
        finally:
            self.stop_event.set()
            self.inbox.put(None)

    def take_line(self, raw: bytes) -> None:
        parts = raw.decode("ascii", "replace").split()
        if parts == ["catchup"]:
            self.behind.set()
        elif len(parts) == 2 and parts[0] in KINDS and valid_full_commit(parts[1]):
            with self._count_lock:
                full = self.pending >= self.max_pending
                self.pending += not full
            if full:
                self.behind.set()
            else:
                self.last_line = self.clock()
                self.inbox.put((parts[0], parts[1], self.last_line))
        else:
            log.warning("test history writer: ignored line %r", raw[:80])

    # ---- the writing loop -------------------------------------------------
    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                if self.conn is None or self.behind.is_set():
                    self._recover()
                batch = self._take(0.5 if self.conn is not None else RETRY_DELAY)
                if batch and self.conn is not None:
                    self._settle(batch[0][2])
                    self.gate.wait_clear()
                    self._write(batch)
                if self.pruned and self.conn is not None and (
                        self.clock() - self.last_forget >= FORGET_SETTLE or
                        len(self.pruned) >= FORGET_CAP):
                    self._drop_pruned()
        finally:
            if self.conn is not None:
                self.conn.close()

    def _take(self, timeout: float) -> list:
        """Up to BATCH_RUNS queued lines, waiting ``timeout`` for the first."""
        batch = []
        try:
            item = self.inbox.get(timeout=timeout)
            while item is not None:
                batch.append(item)
                if len(batch) >= BATCH_RUNS:
                    break
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass
        with self._count_lock:
            self.pending -= len(batch)
        return batch

    def _settle(self, oldest: float) -> None:
        """Wait while results are still coming (a line less than SETTLE
        seconds ago), at most until the oldest waiting line is MAX_DEFER
        seconds old.  A burst of results is when the dispatcher needs the
        machine most: measured on 2 cores, writing during it (several ms of
        CPU a result) made every result of the burst take longer to store;
        now the store follows a burst's end instead.  Under a steady stream
        the lines soon are MAX_DEFER old and are written without a pause,
        so the store lags by at most that much."""
        while not self.stop_event.is_set():
            wait = min(self.last_line + SETTLE, oldest + MAX_DEFER) - self.clock()
            if wait <= 0:
                return
            self.stop_event.wait(wait)

    def _drop_pruned(self) -> None:
        """Drop the pruned commits' runs, oldest first, a chunk per
        transaction, each after a look at the result gate and followed by
        a rest as long as it took.  Why wait for the pass to end: it sends
        its ``forget`` lines in the folder's hash order, and runs dropped in
        that order were scattered over every page of the tables, so each
        transaction of 64 rewrote hundreds of pages into the WAL (100,000
        forgets doubled the result path's p95 while they ran); in run-id
        order a transaction rewrites a few.  A commit whose result file is
        back (a retest) keeps its new run."""
        commits = [c for c in self.pruned
                   if not os.path.exists(os.path.join(self.results_dir, c))]
        self.pruned.clear()
        try:
            runs = sorted(store.run_ids(self.conn, commits))
        except sqlite3.Error as exc:
            self._failed(exc)
            return
        for start in range(0, len(runs), FORGET_CHUNK):
            if self.stop_event.is_set():
                return                  # the next start's catch-up drops the rest
            self.gate.wait_clear()
            began = time.monotonic()
            try:
                with store.transaction(self.conn):
                    store.forget_runs(self.conn, runs[start:start + FORGET_CHUNK])
            except sqlite3.Error as exc:
                self._failed(exc)
                return
            self.stop_event.wait((time.monotonic() - began) * FORGET_REST)

    def _recover(self) -> None:
        """Open (or rebuild) the store and catch up with the results folder;
        on failure, try again after a pause.  The catch-up drops every run
        whose file is gone, so the pruned commits waiting are forgotten."""
        self.behind.clear()
        self.pruned.clear()
        started = time.monotonic()
        try:
            if self.conn is None:
                self.conn = store.open_store(self.path)
            read = store.catch_up(self.conn, self.results_dir, self.stop_event.is_set)
        except (sqlite3.Error, OSError) as exc:
            self._failed(exc)
            return
        if read:
            log.info("test history: %d results read from %s in %.1f s", read,
                     self.results_dir, time.monotonic() - started)
        self._say(b"ready\n")

    def _say(self, line: bytes) -> None:
        if self.out is None:
            return
        try:
            self.out.write(line)
            self.out.flush()
        except (BrokenPipeError, ValueError):
            self.out = None             # nobody listens any more

    def _write(self, batch: list) -> None:
        """The batch's results in its order, in one transaction, each run
        read from its files (a file gone since: nothing to write); its
        ``forget`` lines join ``pruned`` (``_drop_pruned``), and a result
        for a commit waiting there (a retest after the prune) takes it out:
        its new run replaces the old one."""
        try:
            with store.transaction(self.conn):
                for kind, commit, _ in batch:
                    if kind == "forget":
                        self.pruned[commit] = None
                        self.last_forget = self.clock()
                        continue
                    self.pruned.pop(commit, None)
                    run = store.run_from_files(self.results_dir, commit)
                    if run is not None:
                        store.write_run(self.conn, run)
        except (sqlite3.Error, ValueError) as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        """A write failed: the files still hold everything, so the store is
        marked behind and caught up later.  A corrupt store is reopened
        (and so rebuilt)."""
        corrupt = isinstance(exc, sqlite3.DatabaseError) and \
            not isinstance(exc, sqlite3.OperationalError)
        log.warning("test history %s: %s%s; catching up from the result files later",
                    self.path, exc, " (the store looks corrupt)" if corrupt else "")
        if corrupt and self.conn is not None:
            self.conn.close()
            self.conn = None
        self.behind.set()
        self.stop_event.wait(RETRY_DELAY)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        description="The dispatcher's test history writer (started by dispatcher.py; "
                    "reads one line per result on stdin, exits when stdin closes).")
    parser.add_argument("--store", required=True, help="the store file (history.sqlite3)")
    parser.add_argument("--results-dir", required=True, help="the dispatcher's results folder")
    parser.add_argument("--max-pending", type=positive(int), default=MAX_PENDING_LINES,
                        help="lines queued at most; past it, left to the catch-up "
                             f"(default {MAX_PENDING_LINES})")
    parser.add_argument("--gate-fd", type=int, default=-1,
                        help="file descriptor of the dispatcher's result gate page "
                             "(-1: none, never wait)")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log level")
    return parser


def lower_priority() -> None:
    """Yield the CPU to the dispatcher: on a machine whose cores a burst of
    results keeps busy, this process's parsing and SQLite work (several ms
    a result) otherwise took the cores the request handlers were waiting
    for, and every result took longer to be stored.  At a lower priority it
    works in what the dispatcher leaves; when it falls behind, its pipe
    fills and it catches up from the result files (ci/history/writer.py)."""
    try:
        os.nice(NICENESS)
    except OSError as exc:
        log.warning("cannot lower the history writer's priority: %s", exc)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    # The dispatcher ends this process (stdin closed, then SIGTERM); a
    # Ctrl-C meant for it must not cut a transaction here first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lower_priority()
    writer = StoreWriter(os.path.abspath(args.store), os.path.abspath(args.results_dir),
                         sys.stdout.buffer, args.max_pending, GateView(args.gate_fd))
    threading.Thread(target=writer.feed, args=(sys.stdin.buffer,), name="history-in",
                     daemon=True).start()
    writer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
