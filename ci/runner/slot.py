"""The process slot: the one child process group a runner has running at
a time (a checkout, a setup, the tests, a prefetch), and what every child
is started with.

A stop request from another thread kills the group and leaves no orphans
(``procgroup.Child``); the watchdog kills it if the runner is SIGKILLed,
and the pidfile lets the next start make sure.  With ``--test-user`` the
slot starts the commit's commands as that user, in a per-run sandbox
(``sandbox.cleanup``), and the runner's own git work as itself.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess

from ci import procgroup
from ci.files import atomic_write
from ci.runner.sandbox.cleanup import UserSandbox
from ci.runner.sandbox.private_git import PrivateRepository
from ci.runner.sandbox.user import TestUser

log = logging.getLogger(__name__)

# Environment variables a test never sees: the runner's credentials.
SECRET_ENV = ("CI_SECRET",)


def child_env(user: TestUser | None = None) -> dict:
    """The tests run the repository's code: do not hand them our secret.

    Unbuffered, so what a test prints lands before unittest's summary on
    stderr, not after it at exit, where it could pass for the summary."""
    env = dict(os.environ)
    for name in SECRET_ENV:
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    return user.env(env) if user else env


@dataclasses.dataclass(frozen=True)
class RunMode:
    """How ``ProcessSlot.run`` runs a command, beyond what, where and how
    long.  ``live``: its output is the current job's, to be shown as it
    grows.  ``as_runner``: as this runner's user even with --test-user (its
    own git work, in a repository the test user cannot change)."""
    live: bool = True
    as_runner: bool = False


def git_run_args(private: PrivateRepository | None, live: bool = True) -> dict:
    """``slot.run``'s env and mode for the runner's git work: with a
    private repository, as the runner's user, in that repository."""
    if private is None:
        return {"env": child_env(), "mode": RunMode(live)}
    return {"env": private.git_env(child_env()), "mode": RunMode(live, as_runner=True)}


class ProcessSlot:
    """Holds the child process group currently running, so a stop request
    from another thread can kill it and leave no orphans; the watchdog
    kills it if this runner is SIGKILLed, and the pidfile lets the next
    start make sure."""

    def __init__(self, pidfile: str | None = None, watchdog: procgroup.Watchdog | None = None,
                 user: TestUser | None = None, sandbox: UserSandbox | None = None):
        self._child = procgroup.Child()
        self.pidfile = pidfile
        self.watchdog = watchdog
        self.user = user
        # With --test-user: each run's private HOME/TMPDIR, and what ends
        # the user's processes and files after it.
        self.sandbox = sandbox
        # The file the running command writes to, for live progress, and
        # the order folder its tests tell their failures in (ordering.py).
        self.output = None
        self.order = None

    @property
    def cancelled(self) -> bool:
        return self._child.cancelled

    def reap_leftovers(self) -> None:
        """Kill the process group a previous, killed runner left behind
        (and with a sandbox, every process and file of the test user)."""
        if self.sandbox is not None:
            self.sandbox.recover()
        if not self.pidfile:
            return
        try:
            with open(self.pidfile) as handle:
                pgid, started, *boot = handle.read().split()
            pgid = int(pgid)
        except (OSError, ValueError):
            return
        leader_start = procgroup.start_time(pgid)
        # The leader may be gone with its children still running; but if
        # the PID now belongs to another process, the group is not ours,
        # nor is any group after a reboot (which ended ours): there the
        # leader's number may lead another's daemons.
        if boot[:1] not in ([], [procgroup.boot_id()]):
            log.info("not killing process group %d: named before the machine restarted",
                     pgid)
        elif leader_start is None or leader_start == started:
            if pgid > 1 and procgroup.group_alive(pgid):
                log.warning("killing process group %d left running by a previous runner",
                            pgid)
                procgroup.kill_group(pgid)
        os.unlink(self.pidfile)

    def run(self, cmd: list[str], cwd: str, timeout: float, out,
            env=None, mode: RunMode = RunMode()) -> tuple[int, bool]:
        """Run ``cmd`` with output to file ``out``; return (exit code, timed
        out).  ``mode``: whether the output is shown live, and as whom."""
        as_user = self.user is not None and not mode.as_runner
        extra = self.user.popen_args() if as_user else {}
        if as_user and self.sandbox is not None:
            env = self.sandbox.env(child_env(self.user) if env is None else env)

        def started(proc) -> None:
            self.output = out if mode.live else None
            self._watch(proc.pid)

        proc = self._child.start(cmd, on_start=started, cwd=cwd, stdout=out,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, **extra)
        if proc is None:
            return -signal.SIGKILL, False
        try:
            # The whole group goes (test suites start helpers of their own).
            exited = self._child.finish(proc, timeout, on_end=self._ended)
        finally:
            if as_user and self.sandbox is not None:
                # What escaped the group (setsid, a double fork) goes too.
                self.sandbox.end_processes()
        return proc.returncode, not exited

    def _watch(self, pid: int) -> None:
        """A group started: the watchdog and the pidfile name it."""
        if self.watchdog:
            self.watchdog.watch(pid)
        self._record(pid)

    def _ended(self) -> None:
        """The group is killed and about to be reaped: forget it."""
        self.output = None
        if self.watchdog:
            self.watchdog.watch(0)
        self._record(None)

    def end_run(self) -> None:
        """After a job's setup and tests: nothing of the test user's may
        reach the next run (see sandbox.cleanup)."""
        if self.sandbox is not None:
            self.sandbox.end()

    def _record(self, pid: int | None) -> None:
        if not self.pidfile:
            return
        try:
            if pid is None:
                os.unlink(self.pidfile)
            else:
                atomic_write(self.pidfile, f"{pid} {procgroup.start_time(pid)} "
                                           f"{procgroup.boot_id()}\n".encode(), fsync=False)
        except OSError:
            pass

    def cancel(self) -> None:
        """Stopping: kill the running group; nothing starts after this."""
        self._child.cancel()
