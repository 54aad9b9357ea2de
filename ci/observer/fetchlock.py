"""One lock per clone for the fetches that update its remote-tracking
refs.  The observer fetches its clone from two threads: the poll (every
branch, update_repo.sh) and the land queue's asks (the branch and its
target as the upstream has them now, on a listener thread).  Two fetches
updating the same ref at once make one fail ("cannot lock ref ... is at X
but expected Y"), which refused a person's ``land`` with "git failed"
whenever it met a poll after the target moved: they take turns instead.

Keyed by the clone's real path, so every part of one process that fetches
a clone finds the same lock without being handed it."""

from __future__ import annotations

import os
import threading

_locks: dict[str, threading.RLock] = {}
_guard = threading.Lock()


def fetch_lock(repo: str) -> threading.RLock:
    """The lock every fetch into ``repo`` holds while it runs."""
    key = os.path.realpath(repo)
    with _guard:
        lock = _locks.get(key)
        if lock is None:
            lock = _locks[key] = threading.RLock()
        return lock
