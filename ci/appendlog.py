"""An append-only file of records, one lock around it: the shape both the
dispatcher's journal and the notification journal have.

Appends are written straight to the file (no buffer), and fsynced when the
caller says its records must be on disk before it answers anyone; an append
that fails part-way is cut back off.  Only whole lines are read back
(``files.whole_lines``), and a torn last line is cut off when the file is
opened, before anything is appended after it.  A rewrite (compaction)
replaces the file atomically and reopens it, so a crash leaves either the
old file or the new one.  What a record means, and when to compact, is the
owner's.
"""

from __future__ import annotations

import os
import threading

from ci.files import atomic_write, open_append


class AppendLog:
    """The file and its lock; ``records`` counts the lines written since
    the last rewrite (the owner compares it with what it still needs)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._handle = None
        self.records = 0

    def read(self) -> bytes:
        """The whole file (b"" when there is none yet)."""
        try:
            with open(self.path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return b""

    def open(self) -> None:
        """Open to append (a torn last line cut off: see ``open_append``)."""
        with self._lock:
            if self._handle is None:
                self._handle = open_append(self.path)

    def append(self, data: bytes, count: int, sync: bool) -> None:
        """Write ``count`` records (``data``, whole lines); with ``sync``
        they are on disk when this returns.  OSError when closed."""
        with self._lock:
            if self._handle is None:
                raise OSError(f"{os.path.basename(self.path)} is closed")
            fd = self._handle.fileno()
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if sync:
                    os.fsync(fd)
            except OSError:
                # Part of it written (a full disk): cut back to the last
                # whole record, or the next append would be glued to the
                # part and lost with it at the next read.
                try:
                    os.ftruncate(fd, end)
                except OSError:
                    pass        # cut when the file is next opened
                raise
            self.records += count

    def rewrite(self, data: bytes, count: int) -> None:
        """Atomically replace the file with ``data`` (``count`` records).
        Written first: if that fails, the old file and handle stay in use
        (a closed handle would make every later append fail)."""
        with self._lock:
            atomic_write(self.path, data)
            if self._handle:
                self._handle.close()
            self._handle = open(self.path, "ab")
            self.records = count

    def close(self) -> None:
        """Flush and fsync what was appended, then close (idempotent)."""
        with self._lock:
            if self._handle:
                try:
                    self._handle.flush()
                    os.fsync(self._handle.fileno())
                finally:
                    self._handle.close()
                    self._handle = None
