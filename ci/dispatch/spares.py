"""Spare files: empty files made ahead of time in the results folder's
``.spare`` subfolder, so that storing a result takes one instead of
creating a file on the result path.

Why: creating a file allocates an inode, and on ext4 without a journal
(the machines this project's CI runs on) the allocator passes over every
inode freed in the last few seconds, reading each one's deletion time.
After a pruning pass had removed tens of thousands of result files,
creating one in that folder took 1.5 ms instead of 0.15 ms, during the
pass and for about 15 s after it (measured with ``perf``: the time was in
the kernel's ``recently_deleted``; issue 21).  A result writes two files
(its JUnit XML, then the result file), so every result took 1 to 3 ms
more.  Renaming a spare into place allocates nothing.  The pool is
refilled by a thread of its own, each file made only while no result is
being stored (the dispatcher's result gate, ci/retention/gate.py), so the
slow creates overlap no result.

When the pool is empty (a burst of results), or the subfolder cannot be
made, ``atomic_write`` creates its file as before: spares only save time.

A spare is renamed out of ``.spare`` without an fsync of ``.spare`` (the
results folder's fsync makes the result durable).  After a crash on a
file system without a journal, the old name may therefore still be on
disk beside the result's.  So the leftovers a start clears are only the
empty files (never written: no result is empty); a file with data is left
where it is.
"""

from __future__ import annotations

import collections
import logging
import os
import stat
import tempfile
import threading

from ci.files import own_subfolder

log = logging.getLogger(__name__)

SUBFOLDER = ".spare"
# Files kept ready: a result takes two, a matrix cell two more.
SIZE = 64
# After a create failed (disk full, folder gone), the refill waits this long.
RETRY_DELAY = 5.0
PREFIX = "s-"


class SpareFiles:
    """The pool (``ready``: paths of empty files) and the refilling thread,
    guarded by one condition."""

    def __init__(self, folder: str, gate=None, size: int = SIZE):
        self.parent = os.path.abspath(folder)
        self.folder = os.path.join(self.parent, SUBFOLDER)
        self.gate = gate            # a ResultGate: its wait_clear() before each create
        self.size = size
        self.cond = threading.Condition()
        self.ready: collections.deque[str] = collections.deque()
        self.stopping = False
        self.made = 0               # files created so far (for tests)
        self.thread: threading.Thread | None = None

    # ---- the result path ---------------------------------------------------
    def open(self, folder: str) -> tuple[int, str] | None:
        """A descriptor open for writing on an empty spare file and its path,
        for a file to be renamed into ``folder``; None if there is none
        ready or ``folder`` is not the one this pool serves."""
        if os.path.abspath(folder) != self.parent:
            return None
        with self.cond:
            if not self.ready:
                return None
            path = self.ready.popleft()
            self.cond.notify_all()
        try:
            return os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC), path
        except OSError as exc:
            log.warning("spare file %s unusable: %s", path, exc)
            return None

    # ---- the refill ----------------------------------------------------------
    def start(self) -> bool:
        """Make the subfolder (or check the one there), clear its empty
        leftovers and start filling; False (and no pool) if it cannot."""
        try:
            self._prepare()
        except OSError as exc:
            log.warning("no spare files in %s (results are written as before): %s",
                        self.folder, exc)
            return False
        self.thread = threading.Thread(target=self._fill, name="spare-files", daemon=True)
        self.thread.start()
        return True

    def _prepare(self) -> None:
        own_subfolder(self.folder)
        kept = 0
        with os.scandir(self.folder) as listing:
            for entry in listing:
                try:
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                        os.unlink(entry.path)
                    else:
                        kept += 1
                except OSError:
                    kept += 1
        if kept:
            log.warning("%d file(s) with data left in %s (from a crash?): not touched",
                        kept, self.folder)

    def _fill(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.stopping or len(self.ready) < self.size)
                if self.stopping:
                    return
            if self.gate is not None:
                self.gate.wait_clear()
            try:
                fd, path = tempfile.mkstemp(dir=self.folder, prefix=PREFIX)
                os.close(fd)
            except OSError as exc:
                log.warning("cannot make a spare file in %s: %s", self.folder, exc)
                with self.cond:
                    self.cond.wait_for(lambda: self.stopping, RETRY_DELAY)
                continue
            with self.cond:
                self.ready.append(path)
                self.made += 1
                self.cond.notify_all()

    def wait_full(self, timeout: float) -> bool:
        """Until the pool holds ``size`` files (tests, benchmarks)."""
        with self.cond:
            return self.cond.wait_for(lambda: len(self.ready) >= self.size, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """End the refill and remove the spares still ready (and the
        subfolder, when nothing else is in it)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)
        with self.cond:
            left, self.ready = list(self.ready), collections.deque()
        for path in left:
            try:
                os.unlink(path)
            except OSError:
                pass
        try:
            os.rmdir(self.folder)
        except OSError:
            pass
