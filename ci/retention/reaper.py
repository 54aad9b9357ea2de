"""The pruner worker's reaper: frees what a pass moved into the trash.

Removing is two steps.  The worker's ``remove`` and ``drop`` move each file into the results
folder's ``.pruned`` subfolder (a rename: the commit is gone from the
folder, no block is freed).  The reaper, a thread of its own, unlinks
what is there once no request has come for ``REAP_AFTER`` seconds, one
file at a time, an fsync every ``REAP_SYNC`` files, then a rest three
times as long as they took (``REAP_REST``).  Why: on a file system
mounted with ``discard`` (ext4 without a journal on a virtual disk here),
freeing a file's blocks costs the next flush, whoever issues it; 50 frees
waiting when a result is stored added about 0.1 to 0.3 ms to its fsyncs,
four or fewer added nothing measurable (docs/performance.md#retention);
even so, unlinking without a rest cost a result about 0.15 ms while it
ran (a discard in flight when its flush came), resting three times as
long nothing measurable.  Freeing that way takes longer than a pass may
(5 to 6 minutes for 190,000 files here), so the pass moves and the
reaper frees after it; what it has not freed when the dispatcher stops
is freed by the next worker.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from ci import results
from ci.files import own_subfolder
from ci.retention.gate import GateView, Pacer

log = logging.getLogger(__name__)

# The reaper starts once no request has come for this many seconds (a
# pass sends one every few milliseconds).
REAP_AFTER = 1.0
# The reaper's fsync of the trash after this many unlinks: the frees a
# result's flush can meet (see the docstring).
REAP_SYNC = 4
# After each REAP_SYNC unlinks and their fsync the reaper rests this many
# times as long as they took (at most gate.REST_CAP): its frees then hold
# the disk a quarter of the time, and a result's flush meets one in flight
# that much less often.
REAP_REST = 3.0


class Reaper:
    """Unlinks what ``remove`` moved into the trash, while the worker has no
    request to serve: one thread, one file at a time, each unlink after a
    look at the result gate and an fsync every REAP_SYNC of them, then a
    rest (REAP_REST), so a result's flush meets at most that many frees,
    and seldom any.  ``quiet_since`` is None while a request is being
    served (and so during a pass, whose requests follow each other
    closely)."""

    def __init__(self, trash: str, gate: GateView, after: float = REAP_AFTER):
        self.trash = trash
        self.gate = gate
        self.after = after
        self.cond = threading.Condition()
        self.quiet_since: float | None = None
        self.pending = True        # what an earlier worker left is reaped too
        self.reaped = 0            # files unlinked so far (for tests)
        self.thread: threading.Thread | None = None
        self.prepared = False

    def prepare(self) -> None:
        """The trash folder, this user's (made and checked once, at the
        first batch; OSError until it can be)."""
        if not self.prepared:
            own_subfolder(self.trash)
            self.prepared = True

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="reaper", daemon=True)
        self.thread.start()

    def busy(self) -> None:
        with self.cond:
            self.quiet_since = None

    def idle(self) -> None:
        with self.cond:
            self.quiet_since = time.monotonic()
            self.cond.notify_all()

    def wake(self) -> None:
        with self.cond:
            self.pending = True
            self.cond.notify_all()

    def _quiet(self) -> bool:
        """No request for ``after`` seconds; else waits a little."""
        with self.cond:
            since = self.quiet_since
            if since is not None and time.monotonic() - since >= self.after:
                return True
            self.cond.wait(self.after if since is None else
                           self.after - (time.monotonic() - since))
            return False

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending)
            if not self._quiet():
                continue
            with self.cond:
                self.pending = False
            if not self.reap():
                with self.cond:
                    self.pending = True

    def reap(self) -> bool:
        """One sweep of the trash: True when it got to the end, False when
        a request came (the next quiet moment sweeps again)."""
        began, count, done = time.monotonic(), 0, False
        try:
            fd = os.open(self.trash, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return True
        except OSError as exc:
            log.warning("cannot open %s: %s", self.trash, exc)
            return True
        pacer = Pacer(self.gate, REAP_REST, REAP_SYNC, before_rest=lambda: os.fsync(fd))
        try:
            with os.scandir(fd) as listing:
                for item in listing:
                    if self.quiet_since is None:
                        return False
                    if not results.result_or_xml(item.name):
                        continue
                    pacer.step()
                    try:
                        os.unlink(item.name, dir_fd=fd)
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        log.warning("cannot remove %s from %s: %s", item.name, self.trash, exc)
                        continue
                    count += 1
                    self.reaped += 1
            os.fsync(fd)
            done = True
            return True
        finally:
            os.close(fd)
            if count:
                log.info("freed %d pruned file(s) in %.1fs%s", count, time.monotonic() - began,
                         "" if done else " (paused for a request)")
