"""The result path's right of way over the pruner: the gate a pass waits
at, and the rest after each of its steps.

A pass over 100,000 result files shares the disk, the file system's
journal and the interpreter with the handlers that store results.  Resting
after each step (``rest_after``) lowers the odds that a result meets one;
this gate removes most of the meeting itself: a ``results`` handler holds it
from parsing the message until its file is written, and the pruner, before
each of its small steps (a header read, a commit's unlinks, an fsync, a
hold of the dispatcher's lock), waits until no handler holds it.  A result
then waits at most for the step already under way, not for a batch, and
the pruner's thread sleeps instead of competing for the interpreter while
the result is handled.

The wait is bounded (``longest``): a dispatcher storing results without a
pause between them would otherwise never let a pass finish.

The pruner's worker and the test history's writer are processes of their
own: ``share`` mirrors the count of results being stored into a memory
page (a memfd) they map read-only and poll (GateView), so they give way
too without a message per result.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
import time

log = logging.getLogger(__name__)

# The longest a pruner step waits for handlers before it goes ahead anyway.
LONGEST_WAIT = 1.0
# How often a process looking at the shared page (GateView) looks again.
POLL = 0.0002
# The shared page: the number of results being stored, a native int.
WORD = struct.Struct("=i")
# A pass's steps (the plan's header reads, the batches) are each followed by
# a rest this many times as long as the step took (--prune-rest), at least
# PAUSE between batches, at most REST_CAP.
REST = 1.0
REST_CAP = 0.05
PAUSE = 0.002
QUIET_PAUSE = 0.001
# A Pacer rests after this many steps (a few milliseconds of work: 256
# header reads, or 256 entries of the folder's listing or of the policy).
STEPS_PER_REST = 256


def rest_after(busy: float, factor: float, pause: float = PAUSE) -> float:
    """The rest after a step that took ``busy`` seconds: ``factor`` times
    as long (at least ``pause``, at most REST_CAP; factor 0: QUIET_PAUSE at
    most).  After every step, not only one that met a result: results come
    when they come, the last one says nothing of the next, and a pass that
    holds the disk and a core half the time meets a result half as often.
    The cap keeps one step slowed by a stall from resting for seconds."""
    return min(REST_CAP, max(pause, busy * factor)) if factor else min(pause, QUIET_PAUSE)


class Pacer:
    """Makes a long piece of work give way in small steps: ``step()``
    before each one (a header read, an entry of a listing, of the index
    or of the policy, an unlink) waits while a result is being stored,
    and before the one after every ``every`` steps rests ``factor`` times
    as long as they took (``rest_after``, no floor), calling
    ``before_rest`` first (the reaper's fsync).

    Why every step looks at the gate, even one of pure Python: a step
    under way when a result comes runs beside it, and work beside the
    result path cost a result about 0.1 ms here whatever its priority,
    while the same header reads looking at the gate before each cost
    nothing measurable (docs/performance.md#retention).  A look is a read
    of a shared word: cheap enough for every step."""

    def __init__(self, gate, factor: float = REST, every: int = STEPS_PER_REST,
                 before_rest=None):
        self.gate, self.factor, self.every = gate, factor, every
        self.before_rest = before_rest
        self.steps = 0
        self.mark = time.monotonic()

    def step(self) -> None:
        if self.steps and not self.steps % self.every:
            self.rest()
        self.gate.wait_clear()
        self.steps += 1

    __call__ = step      # a plan's ``pace``

    def rest(self) -> None:
        """The rest after the steps since the last one."""
        if self.before_rest is not None:
            self.gate.wait_clear()
            self.before_rest()
        time.sleep(rest_after(time.monotonic() - self.mark, self.factor, 0.0))
        self.mark = time.monotonic()


class ResultGate:
    """Counts the results being stored now and the ones stored so far; its
    own condition, so neither side touches the dispatcher's lock for it."""

    def __init__(self, longest: float = LONGEST_WAIT):
        self.cond = threading.Condition()
        self.inside = 0
        self.waiting = 0       # pruner steps waiting now (for tests)
        self.longest = longest
        # ``inside`` mirrored in a memory page other processes map (share).
        self.page: mmap.mmap | None = None
        self.page_fd = -1

    def __enter__(self) -> "ResultGate":
        with self.cond:
            self.inside += 1
            self._mirror()
        return self

    def __exit__(self, *exc) -> None:
        with self.cond:
            self.inside -= 1
            self._mirror()
            if not self.inside:
                self.cond.notify_all()

    def share(self) -> int:
        """A file descriptor of a memory page holding ``inside`` (for a
        child process: GateView); -1 where the system has no memfd."""
        with self.cond:
            if self.page is None:
                try:
                    fd = os.memfd_create("ci-result-gate", os.MFD_CLOEXEC)
                    os.ftruncate(fd, mmap.PAGESIZE)
                    self.page = mmap.mmap(fd, mmap.PAGESIZE)
                except (AttributeError, OSError, ValueError) as exc:
                    log.info("result gate not shared with the remover: %s", exc)
                    return -1
                self.page_fd = fd
                self._mirror()
            return self.page_fd

    def _mirror(self) -> None:
        if self.page is not None:
            WORD.pack_into(self.page, 0, self.inside)

    def wait_clear(self, stop: threading.Event | None = None) -> bool:
        """Block while a result is being stored, at most ``longest``
        seconds; True if it had to wait."""
        with self.cond:
            if not self.inside:
                return False
            deadline = time.monotonic() + self.longest
            self.waiting += 1
            try:
                while self.inside and not (stop is not None and stop.is_set()):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.cond.wait(min(left, 0.1))
            finally:
                self.waiting -= 1
            return True


class GateView:
    """A child process's look at a ResultGate's shared page (its ``fd``;
    -1: nothing to look at, never busy).  Polled: a result is stored in a
    few milliseconds, and the page has no condition to wait on."""

    def __init__(self, fd: int, longest: float = LONGEST_WAIT, poll: float = POLL):
        self.page = None
        self.longest, self.poll = longest, poll
        if fd >= 0:
            try:
                self.page = mmap.mmap(fd, mmap.PAGESIZE, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                log.warning("cannot map the result gate (fd %d): %s", fd, exc)

    def busy(self) -> bool:
        return self.page is not None and WORD.unpack_from(self.page, 0)[0] > 0

    def wait_clear(self) -> bool:
        """Wait while a result is being stored, at most ``longest``
        seconds; True if it had to wait."""
        if not self.busy():
            return False
        deadline = time.monotonic() + self.longest
        while self.busy() and time.monotonic() < deadline:
            time.sleep(self.poll)
        return True
