"""The outbox: finished results waiting for delivery to the dispatcher, one
file each (``<sequence>-<commit>-<token>``), written atomically so a crash
never leaves half a result to send, and delivered oldest first whenever
the dispatcher is reachable, so that a dispatcher restart loses nothing."""

from __future__ import annotations

import logging
import os
import threading
import time

from ci.backoff import Backoff
from ci.files import atomic_write, ensure_dir
from ci.wire import valid_full_commit

log = logging.getLogger(__name__)

# Error replies to one result before it is set aside as ``refused-*``.
MAX_REFUSALS = 10


class Outbox:
    """Finished results waiting for delivery, one file each, written
    atomically so a crash never leaves half a result to send."""

    def __init__(self, folder: str):
        self.folder = ensure_dir(folder, "outbox folder")
        # Results and their tokens: for the runner's eyes only.
        os.chmod(self.folder, 0o700)
        self._seq = int(time.time() * 1000)
        self._lock = threading.Lock()
        self.refusals: dict[str, int] = {}  # file name -> error replies so far
        # A write interrupted by a crash leaves its temporary file behind.
        for name in os.listdir(self.folder):
            if name.startswith(".tmp-"):
                try:
                    os.unlink(os.path.join(self.folder, name))
                except OSError:
                    pass

    def put(self, commit: str, token: str, body: bytes) -> str:
        """Store a result; its file name (sequence, commit, token) orders
        delivery and says where it goes."""
        with self._lock:
            self._seq += 1
            name = f"{self._seq:016d}-{commit}-{token}"
        atomic_write(os.path.join(self.folder, name), body)
        return name

    def items(self) -> list[tuple[str, str, str]]:
        """(file name, commit, token) of every waiting result, oldest first."""
        found = []
        for name in sorted(os.listdir(self.folder)):
            parts = name.split("-")
            if len(parts) == 3 and valid_full_commit(parts[1]):
                found.append((name, parts[1], parts[2]))
        return found

    def read(self, name: str) -> bytes:
        with open(os.path.join(self.folder, name), "rb") as handle:
            return handle.read()

    def store(self, commit: str, token: str, body: bytes, stop: threading.Event,
              retry_max: float) -> bool:
        """Put a result, retrying a failed write until it is stored (True)
        or ``stop`` is set (False).  The caller stays busy meanwhile: a
        worker that gave up would leave the runner answering ``busy``
        for ever, and the result would be lost."""
        backoff = Backoff(0.1, retry_max)
        while True:
            try:
                self.put(commit, token, body)
                return True
            except OSError as exc:
                delay = backoff.next()
                log.error("cannot store the result for %s (%s); retrying in %.1fs",
                          commit[:12], exc, delay)
                if stop.wait(delay):
                    return False

    def delivered(self, name: str) -> None:
        """The dispatcher took it."""
        self.remove(name)
        self.refusals.pop(name, None)

    def refused(self, name: str) -> int:
        """The dispatcher answered ``error``: count it, and after
        MAX_REFUSALS set the file aside as ``refused-*``, so it cannot
        block the results behind it.  Returns the count."""
        count = self.refusals[name] = self.refusals.get(name, 0) + 1
        if count >= MAX_REFUSALS:
            os.replace(os.path.join(self.folder, name),
                       os.path.join(self.folder, "refused-" + name))
            self.refusals.pop(name)
        return count

    def remove(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.folder, name))
        except FileNotFoundError:
            pass
