"""The dispatcher's copy of the land queue's snapshot (issue 22): the
observer owns the queue and sends its snapshot after every change
(``queue-state``); the dispatcher only keeps the latest one, durably in
``<state-dir>/queue.json``, and serves it (``queue``) to the dashboard and
the API.

Kept apart from ``DispatcherState`` with a lock of its own: a snapshot
has nothing to do with the commit queue, and storing one (an fsync) must
never hold up assignment or results.
"""

from __future__ import annotations

import logging
import os
import threading

from ci import queue_snapshot
from ci.files import atomic_write

log = logging.getLogger(__name__)

FILE_NAME = "queue.json"


class LandQueueView:
    """The latest snapshot, as checked JSON bytes and as its dict."""

    def __init__(self, path: str | None):
        # None: kept in memory only (a dispatcher built without a state
        # folder, as some tests build one).
        self.path = path
        self._lock = threading.Lock()
        self._snapshot = queue_snapshot.empty()
        self._data = queue_snapshot.encode(self._snapshot)

    def load(self) -> None:
        """Take the snapshot kept before a restart.  A missing file is an
        empty queue; an unreadable or invalid one is logged and ignored
        (the observer sends a new one with its next change)."""
        if self.path is None:
            return
        try:
            with open(self.path, "rb") as handle:
                data = handle.read(queue_snapshot.MAX_BYTES + 1)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot read the land queue snapshot %s: %s", self.path, exc)
            return
        try:
            snapshot = queue_snapshot.parse_snapshot(data)
        except queue_snapshot.SnapshotError as exc:
            log.error("ignoring the land queue snapshot %s: %s", self.path, exc)
            return
        with self._lock:
            self._snapshot, self._data = snapshot, queue_snapshot.encode(snapshot)
        log.info("land queue snapshot loaded: %d entries, %d recent",
                 len(snapshot["entries"]), len(snapshot["recent"]))

    def replace(self, data: bytes) -> dict:
        """Check ``data`` and make it the snapshot, on disk first; raises
        SnapshotError (nothing changes) or OSError (nothing changes
        either: the old file stays whole)."""
        snapshot = queue_snapshot.parse_snapshot(data)
        encoded = queue_snapshot.encode(snapshot)
        with self._lock:
            # Under the lock: two snapshots written at once must leave the
            # file and the memory agreeing on the same one.
            if self.path is not None:
                atomic_write(self.path, encoded)
            self._snapshot, self._data = snapshot, encoded
        return snapshot

    def json(self) -> bytes:
        with self._lock:
            return self._data

    def snapshot(self) -> dict:
        with self._lock:
            return self._snapshot


def open_view(state_dir: str) -> LandQueueView:
    view = LandQueueView(os.path.join(state_dir, FILE_NAME))
    view.load()
    return view
