"""Child commands in process groups of their own, and their killing: the
one place the runner (checkout, setup, tests) and the observer (fetch)
start and end the work they hand to other programs.

A test suite starts helpers of its own, so a command is ended by killing
its whole group.  If the runner itself is SIGKILLed it cannot do that, so
it keeps a watchdog (the observer's fetches are short and bounded, and it
kills their group when it stops): a tiny child process that
holds the read end of a pipe and is told every group's id; when the pipe
closes (the daemon died, however), it kills the last group it was told
of and exits.  That ends a killed runner's tests within milliseconds,
on any POSIX system, which ``PR_SET_PDEATHSIG`` (Linux only, the direct
child only) could not.

The watchdog can only be told a group once it exists, that is once
``Popen`` has returned; a daemon killed in between would leave a command
nobody watches.  So a watched command is held: it starts as a shell that
waits for a line from its parent and only then becomes the command
(``_HOLD``); a parent that dies first closes the pipe, and the command
never runs.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)

# The watchdog's whole program: read group ids, kill the last on EOF.
# Run with -S -I so it starts in a few milliseconds and imports nothing
# from the tested project or ours.
_WATCHDOG = r"""
import os, signal, sys
pgid = 0
buf = b""
while True:
    try:
        data = os.read(0, 4096)
    except InterruptedError:
        continue
    if not data:
        break
    buf += data
    *lines, buf = buf.split(b"\n")
    for line in lines:
        try:
            pgid = int(line)
        except ValueError:
            pass
if pgid > 1:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


# A held command: a shell that reads one line from its stdin (a pipe from
# the parent), then execs the command with stdin from /dev/null; at the
# pipe's end without a line it exits, and the command never ran.  (Unlike
# Popen, the shell runs an executable file without "#!" as a script.)
_HOLD = ("/bin/sh", "-c", 'read -r go && exec "$@" </dev/null', "held")


class Watchdog:
    """Kills the current group if this process dies without doing it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-S", "-I", "-c", _WATCHDOG], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True)
        except OSError as exc:
            log.warning("no watchdog for child processes (%s): a SIGKILLed daemon may "
                        "leave its tests running until its next start", exc)

    def watch(self, pgid: int) -> None:
        """Tell the watchdog which group to kill (0: none)."""
        with self._lock:
            if self._proc is None or self._proc.stdin is None:
                return
            try:
                self._proc.stdin.write(b"%d\n" % pgid)
                self._proc.stdin.flush()
            except OSError:
                pass

    def stop(self) -> None:
        with self._lock:
            if self._proc is None:
                return
            try:
                self._proc.stdin.write(b"0\n")
                self._proc.stdin.close()
            except OSError:
                pass
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None


class Child:
    """One child process group at a time, which another thread may end:
    the start / wait / kill / reap that the runner's slot, the observer's
    fetch and the notify command share.

    The rule it exists for: a group is forgotten (under the lock that
    ``kill`` and ``cancel`` take) *before* its leader is reaped.  Once
    reaped, the leader's PID, and so the group id, may belong to another
    process, which a kill from another thread must never reach.  Waiting
    uses ``wait_exit``, which does not reap; so output goes to files, not
    pipes that would have to be read while waiting."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        # Set by cancel(): no command starts any more.
        self.cancelled = False

    def start(self, cmd: list[str], on_start=None, **popen) -> subprocess.Popen | None:
        """Start ``cmd`` in a group of its own (None once cancelled).
        ``on_start(proc)`` runs under the lock, before a cancel can see it,
        and before the command itself runs (it is held until then: a
        watchdog told of the group there sees all of the command)."""
        with self._lock:
            if self.cancelled:
                return None
            if on_start is None:
                proc = self._proc = start(cmd, **popen)
                return proc
            proc, release = start_held(cmd, **popen)
            self._proc = proc
            try:
                on_start(proc)
            except BaseException:
                os.close(release)     # the command never runs: its shell ends
                self._proc = None
                proc.wait()
                raise
            let_go(release)
        return proc

    def finish(self, proc: subprocess.Popen, timeout: float, end_group: bool = True,
               on_end=None) -> bool:
        """Wait up to ``timeout`` for ``proc``; True if it exited in time.
        Its group is killed when it timed out, and always with ``end_group``
        (what the leader started may outlive it); then it is forgotten
        (``on_end()`` runs under the lock too) and only then reaped."""
        exited = False
        try:
            exited = wait_exit(proc, timeout)
        finally:
            with self._lock:
                if end_group or not exited:
                    kill_group(proc.pid)
                self._proc = None
                if on_end is not None:
                    on_end()
            proc.wait()
        return exited

    def kill(self) -> None:
        """Kill the running group, if any; later commands still start."""
        with self._lock:
            if self._proc is not None:
                kill_group(self._proc.pid)

    def cancel(self) -> None:
        """Kill the running group and start no other (stopping)."""
        with self._lock:
            self.cancelled = True
            if self._proc is not None:
                kill_group(self._proc.pid)


def start(cmd: list[str], **kwargs) -> subprocess.Popen:
    """Popen in a new session (so a new process group led by the child)."""
    return subprocess.Popen(cmd, start_new_session=True, **kwargs)


def start_held(cmd: list[str], stdin=subprocess.DEVNULL, **kwargs) -> tuple[subprocess.Popen, int]:
    """``start`` a command held until ``let_go`` is called with the pipe's
    write end returned (or that end is closed, by us or by our death: then
    it never runs).  It runs with stdin from /dev/null.  A program that
    cannot be found or run raises here, as ``Popen`` would, rather than
    inside the shell."""
    if stdin != subprocess.DEVNULL:
        raise ValueError("a held command reads nothing on its stdin")
    check_runnable(cmd[0], kwargs.get("env"), kwargs.get("cwd"))
    read_end, write_end = os.pipe()
    try:
        proc = start([*_HOLD, *cmd], stdin=read_end, **kwargs)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return proc, write_end


def let_go(write_end: int) -> None:
    """The held command runs (the shell ends if it is gone already)."""
    try:
        os.write(write_end, b"go\n")
    except OSError:
        pass
    finally:
        os.close(write_end)


def check_runnable(program: str, env: dict | None = None, cwd=None) -> None:
    """The error ``Popen`` raises for ``program``, looked up as it would
    (a path relative to ``cwd``, else along ``env``'s PATH): not found,
    or found and not executable (by us; the test user's own rights are
    checked when a runner starts)."""
    where = os.fspath(cwd) if cwd else os.getcwd()
    if os.sep in program:
        candidates = [os.path.join(where, program)]
    else:     # a relative folder of PATH is the child's, below its cwd
        candidates = [os.path.join(where, folder, program)
                      for folder in os.get_exec_path(env)]
    found = [path for path in candidates if os.path.isfile(path)]
    if any(os.access(path, os.X_OK) for path in found):
        return
    code = errno.EACCES if found else errno.ENOENT
    raise OSError(code, os.strerror(code), program)


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to ``timeout`` for ``proc`` to exit; False on timeout.

    ``Popen.wait(timeout)`` polls with sleeps of up to 50 ms, which added
    about 25 ms to every checkout and every test run; a pidfd wakes us the
    moment the child exits.  Without pidfd support, fall back to it."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while not poller.poll(max(0, math.ceil((deadline - time.monotonic()) * 1000))):
            if time.monotonic() >= deadline:
                return False
        return True
    finally:
        os.close(fd)


def boot_id() -> str:
    """This boot's id (Linux; "-" elsewhere): a PID from another boot
    names nothing of ours."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip() or "-"
    except OSError:
        return "-"


def start_time(pid: int) -> str | None:
    """A process's start time (Linux), to tell a reused PID from ours."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
