"""What /proc says about a process (Linux), for the tests and benchmarks
that check no process outlives its job and measure what daemons cost.

A zombie (dead, not yet reaped) runs no code: it counts as gone."""

from __future__ import annotations

import os
import subprocess
import sys


def stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state
    first, then ppid, process group, session...), or None when the process
    is gone.  The name is cut off at its last ``)``: it may hold spaces."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split() or None
    except OSError:
        return None


def process_alive(pid: int) -> bool:
    """True for a live process; a zombie is not."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def group_members(group: int, session: bool = False) -> list[int]:
    """Live processes whose process group (or, with ``session``, whose
    session too) is ``group``."""
    if group <= 1:
        # Group 0 holds the kernel's threads, 1 is init's: never a test's.
        raise ValueError(f"not a test's process group: {group}")
    members = []
    for entry in os.listdir("/proc"):
        fields = stat_fields(int(entry)) if entry.isdigit() else None
        if fields is None or fields[0] == "Z":
            continue
        if int(fields[2]) == group or (session and int(fields[3]) == group):
            members.append(int(entry))
    return members


def cmdline(pid: int) -> bytes | None:
    """The process's arguments, NUL-separated, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return None


def status_mb(pid: int, key: str) -> float:
    """A memory line of ``/proc/PID/status`` (``VmHWM``, ``VmRSS``...) in
    MB; NaN when the line is missing."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def children_of(pid: int) -> list[int]:
    """The child processes of every thread of ``pid`` (a child started by
    one of its threads is that thread's, not the main thread's)."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(p) for p in handle.read().split()]
    except OSError:
        pass
    return found


def watchdog_of(pid: int) -> int:
    """A runner's watchdog: its child running procgroup's watchdog code."""
    for child in children_of(pid):
        if b"killpg" in (cmdline(child) or b""):
            return child
    raise AssertionError("no watchdog child")


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_measured(script: str, *args: str, cwd: str, timeout: float = 60) -> tuple[str, float]:
    """Run ``script`` (``args`` in its ``sys.argv``) in a fresh interpreter
    in ``cwd``: (what it printed, its own peak resident memory in MB, its
    git children apart).  What one call costs, apart from the test's own
    process; TimeoutExpired past ``timeout`` (the child is killed).  The
    peak is ``VmHWM``: ``ru_maxrss`` keeps the forked test process's own
    size from before the exec."""
    code = script + ("\nimport sys\nsys.stdout.write('\\n' + [line.split()[1] for line in "
                     "open('/proc/self/status') if line.startswith('VmHWM:')][0] + '\\n')\n")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"the measured script exited {proc.returncode}: {proc.stderr}")
    printed, _, peak = proc.stdout.rstrip("\n").rpartition("\n")
    return printed, int(peak) / 1024
