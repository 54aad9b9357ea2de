"""The result path's right of way over the pruner.

A pass over 100,000 result files shares the disk, the file system's
journal and the interpreter with the handlers that store results.  Resting
between batches only lowers the odds that a result meets a batch; this
gate removes most of the meeting itself: a ``results`` handler holds it
from parsing the message until its file is written, and the pruner, before
each of its small steps (a header read, a commit's unlinks, an fsync, a
hold of the dispatcher's lock), waits until no handler holds it.  A result
then waits at most for the step already under way, not for a batch, and
the pruner's thread sleeps instead of competing for the interpreter while
the result is handled.

The wait is bounded (``longest``): a dispatcher storing results without a
pause between them would otherwise never let a pass finish.
"""

from __future__ import annotations

import threading
import time

# The longest a pruner step waits for handlers before it goes ahead anyway.
LONGEST_WAIT = 1.0


class ResultGate:
    """Counts the results being stored now and the ones stored so far; its
    own condition, so neither side touches the dispatcher's lock for it."""

    def __init__(self, longest: float = LONGEST_WAIT):
        self.cond = threading.Condition()
        self.inside = 0
        self.crossings = 0     # entries and exits so far (``seen``)
        self.waiting = 0       # pruner steps waiting now (for tests)
        self.longest = longest

    def __enter__(self) -> "ResultGate":
        with self.cond:
            self.inside += 1
            self.crossings += 1
        return self

    def __exit__(self, *exc) -> None:
        with self.cond:
            self.inside -= 1
            self.crossings += 1
            if not self.inside:
                self.cond.notify_all()

    def seen(self) -> int:
        """Results that entered or left so far (a pass compares it around a
        batch): one that was being stored when the batch began (the wait
        for it ran out) and is written during it competed with it too."""
        with self.cond:
            return self.crossings

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
