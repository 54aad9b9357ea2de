"""The test history's one writer: a thread fed by a queue, off the
dispatch path.

The dispatcher tells it of each result written (``result_written``, a
result listener like the notifier's): that call only puts the commit's
header and records on a queue and never waits, not for the disk, not for
SQLite's lock, not for a writer that is stalled.  What the queue cannot
take (more than ``max_pending`` records waiting) is not lost: the result
files hold it, and the writer catches up from them once the queue is
drained.  The same catch-up runs at start (``store.open_store`` has
rebuilt a missing or broken store by then), so the store is never behind
the results folder for long.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time

from ci.history import store

log = logging.getLogger(__name__)

# Records waiting for the writer, at most (about 200 bytes each): past it,
# results are left to the catch-up from their files.
MAX_PENDING_RECORDS = 200_000
# Results written per transaction, at most.
BATCH_RUNS = 64
# After a failed write (locked, disk full), wait this long before trying again.
RETRY_DELAY = 1.0


class HistoryWriter:
    """Owns the store's only read-write connection, used on its own thread
    only.  ``pending`` is guarded by ``_count_lock``, held for a few
    instructions by either side; everything else is the thread's."""

    def __init__(self, path: str, results_dir: str,
                 max_pending: int = MAX_PENDING_RECORDS):
        self.path = path
        self.results_dir = results_dir
        self.max_pending = max_pending
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.pending = 0
        self._count_lock = threading.Lock()
        # Set when the store may lack results the files have: the writer
        # then catches up from the folder.
        self.behind = threading.Event()
        self.behind.set()
        self.stop_event = threading.Event()
        # Set once the first catch-up is over (tests, the benchmark).
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="history", daemon=True)
        self.conn: sqlite3.Connection | None = None

    # ---- the dispatcher's side --------------------------------------------
    def result_written(self, commit: str, outcome) -> None:
        """Never blocks: queued for the writer, or left to the catch-up."""
        self._put(commit, dict(outcome.header), outcome.records)

    def forget(self, commits: list[str]) -> None:
        """Drop the runs of pruned commits (--keep-results); never blocks.
        Queued in order with the results, so a retest written after the
        prune keeps its new run.  Dropped when the queue is full: the
        catch-up drops runs whose result files are gone anyway.  One item
        for the whole list: the writer drops them in a few statements."""
        if commits:
            self._put("", None, tuple(commits))

    def _put(self, commit: str, header: dict | None, records) -> None:
        """A run to write (``header`` None: ``records`` are the commits
        whose runs to forget)."""
        size = len(records or ()) + 1
        with self._count_lock:
            full = self.pending + size > self.max_pending
            if not full:
                self.pending += size
        if full:
            self.behind.set()
            log.debug("history queue full: %s is left to the catch-up", commit[:12])
            return
        self.inbox.put((commit, header, records))

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        self.inbox.put(None)
        self.thread.join(timeout)

    # ---- the writer thread ------------------------------------------------
    def _run(self) -> None:
        try:
            while not self.stop_event.is_set():
                if self.conn is None or self.behind.is_set():
                    self._recover()
                batch = self._take(0.5 if self.conn is not None else RETRY_DELAY)
                if batch and self.conn is not None:
                    self._write(batch)
        finally:
            if self.conn is not None:
                self.conn.close()

    def _take(self, timeout: float) -> list:
        """Up to BATCH_RUNS queued results, waiting ``timeout`` for the first."""
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
            self.pending -= sum(len(records or ()) + 1 for _, _, records in batch)
        return batch

    def _recover(self) -> None:
        """Open (or rebuild) the store and catch up with the results folder;
        on failure, try again after a pause."""
        self.behind.clear()
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
        self.ready.set()

    def _write(self, batch: list) -> None:
        """The batch in its order, in one transaction."""
        try:
            with store.transaction(self.conn):
                for commit, header, records in batch:
                    if header is None:
                        store.forget_commits(self.conn, list(records))
                        continue
                    stamp = store.file_stamp(os.path.join(self.results_dir, commit))
                    if stamp is not None:
                        store.write_run(self.conn, store.run_from_header(
                            {**header, "commit": commit}, records, stamp))
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
