"""The benchmarks' interleaved comparison (bench_retention.py --interleave
and --reference, bench_frees.py): a process stopped and continued in turns,
so that what it costs is read from halves of the same stretch of time."""

from __future__ import annotations

import os
import random
import signal
import statistics
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


def halves(timed: list) -> list[tuple[bool, list[float]]]:
    """``timed`` ((when, latency, working), in order) cut into its halves:
    each run of samples with the same state (None: no worker yet, left
    out)."""
    cut: list[tuple[bool, list[float]]] = []
    for _, took, state in timed:
        if state is None:
            continue
        if not cut or cut[-1][0] is not state:
            cut.append((state, []))
        cut[-1][1].append(took)
    return cut


def rise_interval(timed: list, rounds: int = 2000,
                  seed: int = 1) -> tuple[float, float, float, int] | None:
    """The median's rise while the process works (working samples' median
    minus stopped ones') and a 95% interval for it: resampled a cycle (a
    running half and the stopped half after it) at a time, so that drift
    within a run, which makes neighbouring samples alike, widens the
    interval as it should (resampling single samples would take them as
    independent and give an interval far too narrow).  (rise, low, high,
    cycles), or None with fewer than 4 cycles."""
    cut = halves(timed)
    cycles = [(cut[i], cut[i + 1]) for i in range(0, len(cut) - 1, 2)]
    if len(cycles) < 4:
        return None

    def rise(chosen) -> float:
        working = [t for pair in chosen for state, got in pair if state for t in got]
        stopped = [t for pair in chosen for state, got in pair if not state for t in got]
        return statistics.median(working) - statistics.median(stopped)
    draw = random.Random(seed)
    spread = sorted(rise(draw.choices(cycles, k=len(cycles))) for _ in range(rounds))
    return rise(cycles), spread[int(rounds * 0.025)], spread[int(rounds * 0.975) - 1], len(cycles)


def describe_rise(timed: list) -> str:
    """The rise and its interval, as the benchmarks print them."""
    found = rise_interval(timed)
    if found is None:
        return "too few cycles for an interval"
    rise, low, high, cycles = found
    return (f"median {rise * 1000:+.2f} ms while it runs, 95% interval "
            f"{low * 1000:+.2f} to {high * 1000:+.2f} ms over {cycles} cycles")
