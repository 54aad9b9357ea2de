"""The benchmarks' interleaved comparison (bench_retention.py --interleave
and --reference, bench_frees.py): a process stopped and continued in turns,
so that what it costs is read from halves of the same stretch of time."""

from __future__ import annotations

import os
import signal
import time


class Interleaver:
    """Stops and continues a process (SIGSTOP/SIGCONT) every ``PHASE``
    seconds: ``pid``, or the pruner's worker, found as the child of
    ``parent`` (the dispatcher) running ``ci.retention.worker``.  Samples
    taken while it works and while it is stopped then come from interleaved
    halves of the same stretch: drift in the machine's speed falls on both
    alike.  Samples in the first ``SETTLE`` after a switch are not taken.
    (A stop makes a pass's batch look slow; the pass's rest after it is
    capped at 50 ms, so it does not rest through the running halves.)
    ``working``: whether the process runs now."""

    PHASE, SETTLE = 1.5, 0.15

    def __init__(self, parent: int | None = None, pid: int | None = None,
                 working: bool = True):
        self.parent = parent
        self.pid = pid
        self.working, self.switch_at = working, time.monotonic() + self.PHASE
        self.looked = 0.0

    def find_worker(self) -> int | None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    ppid = int(handle.read().rsplit(b")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    command = handle.read()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.parent and b"ci.retention.worker" in command:
                return int(entry)
        return None

    def state(self) -> bool | None:
        """Before a sample: True (working), False (stopped) or None (no
        worker yet); switches first when a half is over."""
        if self.pid is None:
            if time.monotonic() - self.looked < 0.5:     # not a /proc scan per sample
                return None
            self.looked = time.monotonic()
            self.pid = self.find_worker()
            if self.pid is None:
                return None
            self.switch_at = time.monotonic() + self.PHASE
        if time.monotonic() >= self.switch_at:
            self.working = not self.working
            os.kill(self.pid, signal.SIGCONT if self.working else signal.SIGSTOP)
            self.switch_at = time.monotonic() + self.PHASE
            time.sleep(self.SETTLE)
        return self.working

    def release(self) -> None:
        if self.pid is not None and not self.working:
            os.kill(self.pid, signal.SIGCONT)
            self.working = True
