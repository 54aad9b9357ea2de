"""A test runner: registers with the dispatcher, takes one commit at a time,
checks it out in its own clone (``test_runner_script.sh``), runs the tests
in a child process group and reports the verdict.

Reliability: a finished result goes to an on-disk outbox first and is
delivered (with backoff) whenever the dispatcher is reachable, so a
dispatcher restart loses nothing.  The runner re-registers by itself, on a
heartbeat, and so is noticed again by a dispatcher that forgot it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from ci.runner import environments
import helpers
from ci import jobspec
from ci.runner import junit_capture
from ci.runner import private_git
from ci import procgroup
from ci.runner import recipe
from ci.outcome import Outcome
from ci import sharding
from ci import state_schema
from ci.runner import user_sandbox
from ci.runner import user_access
from ci.backoff import Backoff
from ci.config import (ArgumentParser, ConfigError, add_common_arguments, configure_logging,
    positive)
from ci.files import atomic_write, ensure_dir
from ci.git import script_path
from ci.security import Security, check_bind_allowed, persist_nonces, security_from_args
from ci.wire import (Message, PeerClosed, ProtocolError, ReadTimeout, Reply, TOKEN_RE,
    encode_fields, format_address, one_line, parse_address, valid_commit, valid_full_commit)

log = logging.getLogger(__name__)

DEFAULT_HOST = "localhost"
FIRST_PORT, LAST_PORT = 8900, 9000
DEFAULT_DISPATCHER = "localhost:8888"
DEFAULT_TIMEOUT = 600.0
DEFAULT_CHECKOUT_TIMEOUT = 300.0
# Re-registering this often lets a restarted dispatcher find us quickly.
DEFAULT_HEARTBEAT = 5.0
# Cap on the delay between delivery attempts while the dispatcher is away.
DEFAULT_RETRY_MAX = 5.0
# Error replies to one result before it is set aside as ``refused-*``.
MAX_REFUSALS = 10
# Room left in a message for the fields around the output.
MESSAGE_OVERHEAD = 64 * 1024
# How often the running command's new output is sent, and the most sent
# at once (the dispatcher keeps a tail of 64 KiB anyway).
DEFAULT_PROGRESS_INTERVAL = 1.0
PROGRESS_CHUNK = 64 * 1024


# --------------------------------------------------------------------------
# Judging a run: pure functions.

@dataclasses.dataclass
class Counts:
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    found: bool = False


UNITTEST_RAN = re.compile(rb"^Ran (\d+) tests? in [\d.]+s\s*$", re.M)
UNITTEST_STATUS = re.compile(rb"^(OK|FAILED)(?: \(([^)\n]*)\))?\s*$", re.M)
# Any "N word" list: plugins add outcomes of their own (e.g. "2 rerun").
PYTEST_SUMMARY = re.compile(rb"^=*\s*((?:\d+ [a-z]+(?:, )?)+) in [\d.]+s", re.M)
IMPORT_FAILURE_MARKERS = (b"unittest.loader._FailedTest", b"Failed to import test module",
                          b"ERROR collecting", b"ImportError while importing test module")


def parse_counts(output: bytes) -> Counts:
    """Read the test counts from the last unittest or pytest summary.

    The last summary wins, so text printed by the tests themselves earlier
    in the output cannot change the counts."""
    counts = Counts()
    ran = list(UNITTEST_RAN.finditer(output))
    summary = list(PYTEST_SUMMARY.finditer(output))
    if ran and (not summary or ran[-1].start() > summary[-1].start()):
        counts.tests, counts.found = int(ran[-1].group(1)), True
        status = [m for m in UNITTEST_STATUS.finditer(output) if m.start() > ran[-1].start()]
        if status and status[0].group(2):
            for part in status[0].group(2).split(b","):
                name, _, value = part.strip().partition(b"=")
                if value.isdigit():
                    # An unexpected success fails a unittest run (exit 1) as
                    # a failure does; without it the verdict was "error".
                    if name in (b"failures", b"unexpected successes"):
                        counts.failures += int(value)
                    elif name == b"errors":
                        counts.errors = int(value)
                    elif name == b"skipped":
                        counts.skipped = int(value)
        return counts
    if summary:
        counts.found = True
        for part in summary[-1].group(1).split(b", "):
            value, _, name = part.partition(b" ")
            number = int(value)
            if name in (b"passed", b"xfailed", b"xpassed"):
                counts.tests += number
            elif name == b"failed":
                counts.tests += number
                counts.failures = number
            elif name == b"skipped":
                counts.tests += number
                counts.skipped = number
            elif name in (b"error", b"errors"):
                # Counted as tests, as unittest counts its errors in "Ran N".
                counts.tests += number
                counts.errors = number
    return counts


def classify(exit_code: int, timed_out: bool, output: bytes,
             known: dict | None = None) -> tuple[str, Counts, str]:
    """Return (verdict, counts, reason).  ``passed`` only for exit status 0.
    ``known`` counts (from per-test records) replace the summary's."""
    counts = parse_counts(output) if known is None else Counts(found=True, **known)
    if timed_out:
        return "timeout", counts, "test command exceeded the time limit and was killed"
    if exit_code == 0:
        return "passed", counts, ""
    if any(marker in output for marker in IMPORT_FAILURE_MARKERS):
        return "error", counts, "test modules could not be imported (see output)"
    if counts.found and (counts.failures or counts.errors):
        return "failed", counts, ""
    return "error", counts, f"test command exited {exit_code} without reporting failing tests"


def default_test_command(repo: str, python: str | None = None) -> list[str]:
    """``python -m unittest discover -s tests``; ``-t .`` when tests/ is a
    package, so that tests importing the project from the root work."""
    command = [python or sys.executable, "-m", "unittest", "discover", "-s", "tests"]
    if os.path.exists(os.path.join(repo, "tests", "__init__.py")):
        command += ["-t", "."]
    return command


def read_bounded(handle, limit: int) -> bytes:
    """Read a whole output file, or its head and tail with a visible marker
    when it exceeds ``limit`` (summaries are at the end, so the tail is
    the larger part)."""
    size = handle.seek(0, os.SEEK_END)
    handle.seek(0)
    if size <= limit:
        return handle.read()
    keep = max(limit - 200, 0)
    head = handle.read(keep // 4)
    handle.seek(size - (keep - keep // 4))
    tail = handle.read()
    marker = (f"\n[... output truncated by the runner: {size - len(head) - len(tail)} "
              f"of {size} bytes omitted ...]\n").encode()
    return head + marker + tail


# --------------------------------------------------------------------------
# Running things in their own process group.

class ProcessSlot:
    """Holds the child process group currently running, so a stop request
    from another thread can kill it and leave no orphans; the watchdog
    kills it if this runner is SIGKILLed, and the pidfile lets the next
    start make sure."""

    def __init__(self, pidfile: str | None = None, watchdog: procgroup.Watchdog | None = None,
                 user: "TestUser | None" = None,
                 sandbox: user_sandbox.UserSandbox | None = None):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self.cancelled = False
        self.pidfile = pidfile
        self.watchdog = watchdog
        self.user = user
        # With --test-user: each run's private HOME/TMPDIR, and what ends
        # the user's processes and files after it.
        self.sandbox = sandbox
        # The file the running command writes to, for live progress.
        self.output = None

    def reap_leftovers(self) -> None:
        """Kill the process group a previous, killed runner left behind
        (and with a sandbox, every process and file of the test user)."""
        if self.sandbox is not None:
            self.sandbox.recover()
        if not self.pidfile:
            return
        try:
            with open(self.pidfile) as handle:
                pgid, started = handle.read().split()
            pgid = int(pgid)
        except (OSError, ValueError):
            return
        leader_start = procgroup.start_time(pgid)
        # The leader may be gone with its children still running; but if
        # the PID now belongs to another process, the group is not ours.
        if leader_start is None or leader_start == started:
            if pgid > 1 and procgroup.group_alive(pgid):
                log.warning("killing process group %d left running by a previous runner",
                            pgid)
                procgroup.kill_group(pgid)
        os.unlink(self.pidfile)

    def run(self, cmd: list[str], cwd: str, timeout: float, out,
            env=None, live: bool = True, as_runner: bool = False) -> tuple[int, bool]:
        """Run ``cmd`` with output to file ``out``; return (exit code, timed out).
        ``live``: the output is the current job's, to be shown as it grows.
        ``as_runner``: as this runner's user even with --test-user (its own
        git work, in a repository the test user cannot change)."""
        as_user = self.user is not None and not as_runner
        extra = self.user.popen_args() if as_user else {}
        if as_user and self.sandbox is not None:
            env = self.sandbox.env(child_env(self.user) if env is None else env)
        with self._lock:
            if self.cancelled:
                return -signal.SIGKILL, False
            proc = procgroup.start(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, **extra)
            self._proc = proc
            self.output = out if live else None
            if self.watchdog:
                self.watchdog.watch(proc.pid)
            self._record(proc.pid)
        timed_out = False
        try:
            timed_out = not procgroup.wait_exit(proc, timeout)
        finally:
            with self._lock:
                # Kill the whole group (test suites start helpers of their
                # own) and forget it before the leader is reaped: after the
                # wait its PID may belong to someone else, whom a cancel()
                # must not kill.
                procgroup.kill_group(proc.pid)
                self._proc = None
                self.output = None
                if self.watchdog:
                    self.watchdog.watch(0)
                self._record(None)
            proc.wait()
            if as_user and self.sandbox is not None:
                # What escaped the group (setsid, a double fork) goes too.
                self.sandbox.end_processes()
        return proc.returncode, timed_out

    def end_run(self) -> None:
        """After a job's setup and tests: nothing of the test user's may
        reach the next run (see user_sandbox)."""
        if self.sandbox is not None:
            self.sandbox.end()

    def _record(self, pid: int | None) -> None:
        if not self.pidfile:
            return
        try:
            if pid is None:
                os.unlink(self.pidfile)
            else:
                atomic_write(self.pidfile,
                                     f"{pid} {procgroup.start_time(pid)}\n".encode(),
                                     fsync=False)
        except OSError:
            pass

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._proc is not None:
                procgroup.kill_group(self._proc.pid)


class TestUser:
    """``--test-user``: setup and tests run as this unprivileged user, so a
    test cannot read the runner's key file, its environment, its outbox or
    its state folder (all the runner user's, mode 600/700), nor change the
    repository later checkouts read (see private_git)."""

    def __init__(self, name: str):
        import pwd
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ConfigError(f"--test-user: no such user {name!r}") from None
        if os.geteuid() != 0:
            raise ConfigError("--test-user needs the runner to run as root (it "
                                      "switches to that user for each test run)")
        if entry.pw_uid == 0:
            raise ConfigError("--test-user must be an unprivileged user, not root")
        self.name, self.uid, self.gid = name, entry.pw_uid, entry.pw_gid
        self.home = entry.pw_dir

    def popen_args(self) -> dict:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def env(self, env: dict) -> dict:
        env = dict(env, USER=self.name, LOGNAME=self.name)
        env["HOME"] = self.home if os.path.isdir(self.home) else "/tmp"
        # The clone's repository is the runner's (private_git): the tests'
        # own git may read it, which git refuses for another owner's
        # repository unless told (a command-scope setting, git >= 2.36).
        count = env.get("GIT_CONFIG_COUNT", "")
        count = int(count) if count.isdigit() else 0
        env.update({"GIT_CONFIG_COUNT": str(count + 1), f"GIT_CONFIG_KEY_{count}":
                    "safe.directory", f"GIT_CONFIG_VALUE_{count}": "*"})
        return env

    def own(self, path: str) -> None:
        """Hand a folder the runner made for one run to the test user."""
        os.chown(path, self.uid, self.gid)

    def can_read(self, path: str) -> bool:
        """Whether this user could open ``path`` (its folders included):
        asked of the kernel, in a child switched to the user."""
        path = os.path.abspath(path)
        pid = os.fork()
        if pid == 0:
            code = 2
            try:
                os.setgroups([])
                os.setgid(self.gid)
                os.setuid(self.uid)
                code = 1
                os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY))
                code = 0
            finally:
                os._exit(code)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code not in (0, 1):
            raise ConfigError(f"--test-user {self.name}: cannot check who may read "
                                      f"{path}")
        return code == 0

    def check_private(self, path: str | None, flag: str) -> None:
        """The runner's key and TLS key must be out of the tests' reach."""
        if path and self.can_read(path):
            raise ConfigError(f"--test-user {self.name} can read {flag} {path}: the "
                                      "tests could too (chmod 600 it, owned by the runner's "
                                      "user)")

    def check_clone(self, repo: str, state_dir: str) -> None:
        owner = os.stat(repo).st_uid
        if owner == os.getuid() and private_git.PrivateRepository(
                repo, state_dir, self.uid, self.gid).exists():
            return  # a run stopped during a checkout: setup gives it back
        if owner != self.uid:
            raise ConfigError(f"--test-user {self.name}: the clone {repo} must belong "
                                      f"to that user (chown -R {self.name} {repo})")


def git_run_args(private: private_git.PrivateRepository | None) -> dict:
    """``slot.run``'s env and as_runner for the runner's git work: with a
    private repository, as the runner's user, in that repository."""
    if private is None:
        return {"env": child_env()}
    return {"env": private.git_env(child_env()), "as_runner": True}


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


META_FIELDS = ("commit", "author", "committed", "subject")


def parse_checkout_meta(log_bytes: bytes) -> dict:
    """The ``ci-meta`` line test_runner_script.sh prints after checkout:
    the commit's author, time and subject for the result header (one
    printable line each, capped: a subject is whatever its author typed)."""
    for line in reversed(log_bytes.splitlines()):
        if line.startswith(b"ci-meta\t"):
            parts = line.decode("utf-8", "replace").split("\t", 4)[1:]
            if len(parts) == 4:
                return {k: one_line(v, 200) for k, v in zip(META_FIELDS, parts)
                        if k != "commit"}
    return {}


def execute(repo: str, commit: str, test_command: list[str] | None, timeout: float,
            checkout_timeout: float, slot: ProcessSlot, max_output: int,
            junit_pattern: str | None = None,
            preparer: environments.Preparer | None = None,
            shard: sharding.ShardSpec | None = None,
            private: private_git.PrivateRepository | None = None,
            scope: environments.Scope | None = None) -> Outcome:
    """Check out ``commit`` and run its tests; return their outcome.

    ``private`` (with --test-user): the runner's own repository, in which
    the checkout runs as the runner's user; the tree is then the test
    user's.

    ``preparer`` (the runner's recipe and environments) decides the test
    command, its environment and time limit; without one, ``test_command``
    and ``timeout`` are used as given.  ``scope``: which environments the
    commit may reuse and build (default: the commit's own, never a
    trusted one).  Per-test records, when there are any, come as the
    outcome's ``junit_xml``, and the counts are theirs."""
    started = time.time()
    fields = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
              "tests": 0, "failures": 0, "errors": 0, "skipped": 0, "exit_code": -1}
    env = child_env(slot.user)
    if private is not None:
        private.take_tree()
    try:
        with tempfile.TemporaryFile() as out:
            code, timed_out = slot.run(["bash", script_path("test_runner_script.sh"),
                                        repo, commit], repo, checkout_timeout, out,
                                       **git_run_args(private))
            out.seek(0)
            checkout_log = out.read(64 * 1024)
    finally:
        if private is not None:
            private.give_tree()
    log.debug("checkout of %s took %.3fs", commit[:12], time.time() - started)
    fields.update(parse_checkout_meta(checkout_log))
    if code != 0:
        why = "timed out" if timed_out else f"exited {code}"
        reason = f"checkout of {commit} failed ({why})"
        fields.update(verdict="error", reason=reason,
                      duration=f"{time.time() - started:.3f}")
        return Outcome(fields, checkout_log + f"\n{reason}\n".encode())
    preparer = preparer or environments.Preparer(
        recipe.Limits(test=test_command, timeout=timeout), read_recipe=False)
    with tempfile.TemporaryFile() as out:
        prepared = preparer.prepare(repo, slot, env, out,
                                    scope or environments.job_scope(None, False, commit))
        # The setup's log comes first but must leave room for the tests'.
        setup_log = read_bounded(out, max_output if prepared.failed else max_output // 4)
    fields.update(prepared.fields)
    if prepared.failed:
        fields["duration"] = f"{time.time() - started:.3f}"
        return Outcome(fields, setup_log)
    test_command, timeout = prepared.command, prepared.timeout
    command = test_command or default_test_command(repo, prepared.python)
    if test_command is None and not os.path.isdir(os.path.join(repo, "tests")):
        fields.update(verdict="error", reason="no tests/ folder in this commit",
                      duration=f"{time.time() - started:.3f}")
        return Outcome(fields, setup_log + b"no tests/ folder in this commit\n")
    path_first, shard_unittest = None, False
    if shard is not None:
        if test_command is None and junit_pattern:
            # Only the recorder loads modules as discovery does.
            run = sharding.ShardRun(command if shard.index == 1 else None,
                                    "whole" if shard.index == 1 else "skipped")
        else:
            run = sharding.shard_run(repo, test_command, command, shard, test_command is None)
        fields["shards"] = f"{shard.index}/{shard.total}" + (f" {run.label}" if run.label
                                                             else "")
        if run.command is None:
            note = f"shard {shard.index}/{shard.total}: {run.label}, nothing to run\n"
            fields.update(verdict="passed", exit_code=0,
                          duration=f"{time.time() - started:.3f}")
            return Outcome(fields, setup_log + note.encode())
        command, path_first = run.command, run.path_first
        shard_unittest = test_command is None
    elif test_command and sharding.PLACEHOLDER in test_command:
        command = sharding.expand_placeholder(repo, command)
    with tempfile.TemporaryFile() as out, \
            junit_capture.Capture(repo, command, junit_pattern) as capture:
        run_command = capture.command
        if shard_unittest and run_command[1:2] == [junit_capture.RECORDER]:
            extra = ["--shard", *(["--path-first", path_first] if path_first else [])]
            run_command = [*run_command[:3], *extra, *run_command[3:]]
        if slot.user and capture.tmp:
            # The recorder runs as the test user and writes its file here.
            slot.user.own(capture.tmp)
        try:
            code, timed_out = slot.run(run_command, repo, timeout, out, prepared.env)
        except OSError as exc:
            fields.update(verdict="error", reason=f"cannot start test command: {exc}",
                          duration=f"{time.time() - started:.3f}")
            return Outcome(fields, setup_log +
                           f"cannot start test command {command!r}: {exc}\n".encode())
        log.debug("tests of %s ran %.3fs", commit[:12], time.time() - started)
        junit = capture.collect(timed_out, max_output // 4)
        output = read_bounded(out, max_output - len(setup_log) - len(junit.xml))
    verdict, counts, reason = classify(code, timed_out, output, junit.counts)
    fields.update(verdict=verdict, tests=counts.tests, failures=counts.failures,
                  errors=counts.errors, skipped=counts.skipped, exit_code=code,
                  duration=f"{time.time() - started:.3f}")
    if reason:
        fields["reason"] = reason
    fields.update(junit.fields())
    return Outcome(fields, setup_log + output, junit_xml=junit.xml)


# --------------------------------------------------------------------------
# The runner daemon.

@dataclasses.dataclass
class Assignment:
    commit: str
    job_id: str
    shard: sharding.ShardSpec | None = None
    branch: str | None = None   # as the dispatcher said; None: not said
    trusted: bool = False       # the branch is trusted (never without one)

    @property
    def scope(self) -> environments.Scope:
        return environments.job_scope(self.branch, self.trusted, self.commit)


def parse_runtest(message: Message) -> Assignment:
    """The job a ``runtest`` hands us; Reply with the reason if malformed."""
    parts = message.argument.split(" ")
    if len(parts) != 2 or not valid_commit(parts[0]) \
            or not TOKEN_RE.fullmatch(parts[1]):
        raise Reply("usage: runtest:<commit> <token>")
    try:
        spec = jobspec.parse(message.body)
    except ValueError as exc:
        raise Reply(str(exc)) from None
    return Assignment(parts[0], parts[1], spec.shard, spec.branch, spec.trusted)


# What RunnerState.take hands the worker when it should fetch, not test.
PREFETCH = "prefetch"


class RunnerState:
    """The one job this runner holds, guarded by one condition shared by the
    request handlers (``runtest``), the worker and the stop path."""

    def __init__(self):
        self.cond = threading.Condition()
        self.current: Assignment | None = None
        self.pending: Assignment | None = None
        self.fetch_wanted = False  # a push was announced: fetch while idle
        self.stopping = False

    def want_fetch(self) -> bool:
        """Ask the worker to fetch now, unless it holds a job (whose
        checkout fetches anyway).  Repeated asks before it starts are one."""
        with self.cond:
            if self.stopping or self.current is not None:
                return False
            self.fetch_wanted = True
            self.cond.notify_all()
            return True

    def offer(self, assignment: Assignment) -> bool:
        with self.cond:
            if self.stopping or self.current is not None:
                return False
            self.current = self.pending = assignment
            self.cond.notify_all()
            return True

    def take(self) -> Assignment | str | None:
        """Block the worker until a job arrives (None when stopping), or
        return ``PREFETCH`` when a fetch is wanted and no job is waiting.
        A job that arrives during a prefetch waits for it (the two must not
        run git in the clone at once) and then finds its commit there."""
        with self.cond:
            while self.pending is None and not self.fetch_wanted and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return None
            wanted, self.fetch_wanted = self.fetch_wanted, False
            if self.pending is None and wanted:
                return PREFETCH
            job, self.pending = self.pending, None
            return job

    def finish(self) -> None:
        with self.cond:
            self.current = None

    def busy_with(self) -> str | None:
        with self.cond:
            return self.current.commit if self.current else None

    def current_job(self) -> Assignment | None:
        with self.cond:
            return self.current

    def stop(self) -> Assignment | None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            return self.current


class Outbox:
    """Finished results waiting for delivery, one file each, written
    atomically so a crash never leaves half a result to send."""

    def __init__(self, folder: str):
        self.folder = ensure_dir(folder, "outbox folder")
        # Results and their tokens: for the runner's eyes only.
        os.chmod(self.folder, 0o700)
        self._seq = int(time.time() * 1000)
        self._lock = threading.Lock()
        # A write interrupted by a crash leaves its temporary file behind.
        for name in os.listdir(self.folder):
            if name.startswith(".tmp-"):
                try:
                    os.unlink(os.path.join(self.folder, name))
                except OSError:
                    pass

    def put(self, commit: str, job_id: str, body: bytes) -> str:
        with self._lock:
            self._seq += 1
            name = f"{self._seq:016d}-{commit}-{job_id}"
        atomic_write(os.path.join(self.folder, name), body)
        return name

    def items(self) -> list[tuple[str, str, str]]:
        found = []
        for name in sorted(os.listdir(self.folder)):
            parts = name.split("-")
            if len(parts) == 3 and valid_full_commit(parts[1]):
                found.append((name, parts[1], parts[2]))
        return found

    def read(self, name: str) -> bytes:
        with open(os.path.join(self.folder, name), "rb") as handle:
            return handle.read()

    def remove(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.folder, name))
        except FileNotFoundError:
            pass


class TestRunner:
    def __init__(self, args, security: Security, dispatcher: tuple[str, int],
                 state_dir: str, user: TestUser | None = None):
        self.args = args
        self.repo = os.path.abspath(args.repo)
        self.security = security
        self.dispatcher = dispatcher
        self.instance = secrets.token_hex(8)
        self.state = RunnerState()
        self.user = user   # --test-user, checked by main
        self.watchdog = procgroup.Watchdog()
        sandbox = user_sandbox.UserSandbox(self.user.name, self.user.uid, self.user.gid,
                                           state_dir, keep=(self.repo,)) if self.user else None
        self.slot = ProcessSlot(os.path.join(state_dir, "running.pid"), self.watchdog,
                                self.user, sandbox)
        # With a test user, the repository is the runner's (see private_git).
        self.private = private_git.PrivateRepository(self.repo, state_dir, self.user.uid,
                                                     self.user.gid) if self.user else None
        self.slot.reap_leftovers()
        self.outbox = Outbox(os.path.join(state_dir, "outbox"))
        self.test_command = shlex.split(args.test_command) if args.test_command else None
        self.preparer = make_preparer(args, self.test_command, state_dir)
        self.job_limit = job_limit(args, self.preparer)
        self.max_output = max(security.max_message - MESSAGE_OVERHEAD, 4096)
        self.wake_link = threading.Event()
        self.stop_event = threading.Event()
        self.address: tuple[str, int] | None = None  # what we listen on
        self.advertised: str | None = args.advertise
        self.last_contact = time.monotonic()
        self.gave_up = False
        self.refusals: dict[str, int] = {}  # outbox file -> error replies so far
        self.threads = [threading.Thread(target=self._work_loop, name="work", daemon=True),
                        threading.Thread(target=self._link_loop, name="link", daemon=True),
                        threading.Thread(target=self._progress_loop, name="progress",
                                         daemon=True)]
        self.commands = {"ping": self.do_ping, "runtest": self.do_runtest,
                         "fetch": self.do_fetch}

    # ---- handlers -------------------------------------------------------
    def do_ping(self, message: Message, peer: str) -> Message:
        job = self.state.current_job()
        return Message("ok", "pong", encode_fields(
            {"instance": self.instance, "busy": job.commit if job else "",
             "job": job.job_id if job else ""}))

    def do_runtest(self, message: Message, peer: str) -> Message:
        job = parse_runtest(message)
        if self.state.offer(job):
            shard = job.shard
            log.info("accepted %s%s, environment scope %s", job.commit[:12],
                     f" (shard {shard.index}/{shard.total})" if shard else "", job.scope.name)
            return Message("ok")
        return Message("busy", self.state.busy_with() or "stopping")

    def do_fetch(self, message: Message, peer: str) -> Message:
        """The dispatcher's hint that a push just happened (see
        ``dispatcher.py --prefetch-runners``)."""
        return Message("ok", "fetching" if self.state.want_fetch() else "busy")

    # ---- work -----------------------------------------------------------
    def _work_loop(self) -> None:
        while True:
            job = self.state.take()
            if job is None:
                return
            if job == PREFETCH:
                self._prefetch()
                continue
            try:
                outcome = execute(self.repo, job.commit, self.test_command,
                                  self.args.timeout, self.args.checkout_timeout,
                                  self.slot, self.max_output, self.args.junit_xml,
                                  self.preparer, job.shard, self.private, job.scope)
            except Exception as exc:
                log.exception("running %s failed", job.commit[:12])
                outcome = Outcome({"verdict": "error", "reason": f"runner failure: {exc}"},
                                  f"runner failure: {exc!r}\n".encode())
            finally:
                self.slot.end_run()
            if self.slot.cancelled:
                return  # stopping: the job is handed back, not reported
            outcome = outcome.with_header(runner=self.advertised or "?")
            commit = job.commit
            if not valid_full_commit(commit):
                log.error("cannot report %s: not a full commit id", commit)
                self.state.finish()
                continue
            log.info("finished %s: %s", commit[:12], outcome.verdict)
            body = outcome.to_body()
            backoff = Backoff(0.1, self.args.retry_max)
            while True:
                try:
                    self.outbox.put(commit, job.job_id, body)
                    break
                except OSError as exc:
                    # Keep the result and stay busy: letting this thread die
                    # would leave the runner answering ``busy`` for ever.
                    delay = backoff.next()
                    log.error("cannot store the result for %s (%s); retrying in %.1fs",
                              commit[:12], exc, delay)
                    if self.stop_event.wait(delay):
                        return  # stopping: stop() hands the job back
            self.state.finish()
            self.wake_link.set()

    def _prefetch(self) -> None:
        """Fetch the upstream as update_repo.sh does for the observer, in
        the slot (so a stop kills it; with --test-user, in the runner's own
        repository as for a checkout); a failure only means the checkout
        fetches instead."""
        started = time.monotonic()
        with tempfile.TemporaryFile() as out:
            code, timed_out = self.slot.run(
                ["bash", script_path("update_repo.sh"), self.repo], self.repo,
                self.args.checkout_timeout, out, live=False,
                **git_run_args(self.private))
            if code and not self.slot.cancelled:
                out.seek(0)
                log.info("prefetch failed (%s): %s",
                         "timed out" if timed_out else f"exit {code}",
                         out.read(2000).decode(errors="replace").strip())
            if code:
                return
        log.debug("prefetched in %.3fs", time.monotonic() - started)

    # ---- the link to the dispatcher ---------------------------------------
    def _link_loop(self) -> None:
        """Register, heartbeat and deliver results, backing off while the
        dispatcher is unreachable."""
        backoff = Backoff(0.1, self.args.retry_max)
        next_heartbeat = 0.0
        while not self.stop_event.is_set():
            try:
                # Results before registering: registering offers us for work,
                # and a restarted dispatcher would hand us again the very
                # commit whose result is still waiting in the outbox.
                self._deliver()
                if time.monotonic() >= next_heartbeat:
                    self._register()
                    next_heartbeat = time.monotonic() + self.args.heartbeat
                self.last_contact = time.monotonic()
                backoff.reset()
                delay = max(0.0, next_heartbeat - time.monotonic())
            except (OSError, ProtocolError) as exc:
                delay = backoff.next()
                # A refusal (wrong secret, clock skew, busy) is not an outage:
                # say which, so a configuration mistake is not mistaken for one.
                what = ("unreachable" if isinstance(exc, (OSError, ReadTimeout,
                                                          PeerClosed))
                        else "refused or garbled")
                log.warning("dispatcher %s %s (%s); retrying in %.1fs",
                            format_address(self.dispatcher), what, exc, delay)
                next_heartbeat = 0.0
                limit = self.args.dispatcher_timeout
                if limit is not None and time.monotonic() - self.last_contact > limit:
                    log.error("no dispatcher for %.0fs (--dispatcher-timeout); exiting", limit)
                    self.gave_up = True
                    self.stop_event.set()
                    return
            self.wake_link.wait(delay)
            self.wake_link.clear()

    def _register(self) -> None:
        if not self.advertised:
            self.advertised = self._local_address()
        job = self.state.current_job()
        # The token proves the job is ours: a restarted dispatcher lets us
        # keep it instead of running it again elsewhere.
        fields = {"instance": self.instance, "busy": job.commit if job else "",
                  "job": job.job_id if job else "", "limit": f"{self.job_limit:.0f}"}
        if self.args.name:
            fields["name"] = self.args.name
        reply = helpers.call(self.dispatcher, "register", self.advertised,
                             encode_fields(fields), security=self.security)
        self.last_contact = time.monotonic()  # any answer: the dispatcher is there
        if reply.command != "ok":
            raise ProtocolError(f"register refused: {reply.argument}")
        if reply.argument == "registered":
            log.info("registered with dispatcher %s as %s",
                     format_address(self.dispatcher), self.advertised)

    def _local_address(self) -> str:
        """The address the dispatcher can reach us at: ``--host``, or when
        bound to all interfaces, the local end of a connection to it."""
        host, port = self.address
        if host not in ("0.0.0.0", "::", ""):
            return format_address((host, port))
        with socket.create_connection(self.dispatcher, timeout=5) as sock:
            return format_address((sock.getsockname()[0], port))

    def _deliver(self) -> None:
        """Send every outbox result, oldest first.  ``busy`` (or no answer)
        means later; an ``error`` reply is retried a few rounds, then the
        file is set aside so it cannot block the results behind it."""
        refused = 0
        for name, commit, job_id in self.outbox.items():
            body = self.outbox.read(name)
            reply = helpers.call(self.dispatcher, "results", f"{commit} {job_id}", body,
                                 security=self.security, reply_timeout=60)
            self.last_contact = time.monotonic()
            if reply.command == "ok":
                log.info("delivered result for %s (%s)", commit[:12], reply.argument)
                self.outbox.remove(name)
                self.refusals.pop(name, None)
                continue
            if reply.command == "busy":
                raise ProtocolError(f"dispatcher busy: {reply.argument}")
            refused += 1
            self.refusals[name] = self.refusals.get(name, 0) + 1
            log.error("dispatcher refused result for %s (%d/%d): %s", commit[:12],
                      self.refusals[name], MAX_REFUSALS, reply.argument)
            if self.refusals[name] >= MAX_REFUSALS:
                os.replace(os.path.join(self.outbox.folder, name),
                           os.path.join(self.outbox.folder, "refused-" + name))
                self.refusals.pop(name)
        if refused:
            raise ProtocolError(f"{refused} result(s) refused; retrying later")

    # ---- live output ------------------------------------------------------
    def _progress_loop(self) -> None:
        """About once a second, send the running command's new output, so
        the dashboard can show it live.  Best effort: a lost message
        changes nothing but what a watcher sees."""
        sent: tuple[object, int] = (None, 0)   # (output file, bytes sent)
        interval = self.args.progress_interval
        while not self.stop_event.wait(interval):
            job = self.state.current_job()
            out = self.slot.output
            if job is None or out is None or not valid_full_commit(job.commit):
                continue
            if sent[0] is not out:
                sent = (out, 0)
            try:
                size = os.fstat(out.fileno()).st_size
                if size <= sent[1]:
                    continue
                start = max(sent[1], size - PROGRESS_CHUNK)
                data = os.pread(out.fileno(), size - start, start)
                helpers.call(self.dispatcher, "progress", f"{job.commit} {job.job_id}", data,
                             security=self.security, timeout=2, reply_timeout=2)
                sent = (out, start + len(data))
            except (OSError, ValueError, ProtocolError) as exc:
                log.debug("progress for %s not sent: %s", job.commit[:12], exc)

    # ---- lifecycle ------------------------------------------------------
    def start(self, address: tuple[str, int]) -> None:
        self.address = address
        self.watchdog.start()
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        """Hand back the current job unrun, kill its processes, flush the
        outbox once, and let the threads end."""
        current = self.state.stop()
        self.slot.cancel()
        self.stop_event.set()
        self.wake_link.set()
        if current and self.advertised:
            try:
                helpers.call(self.dispatcher, "release", f"{current.commit} {current.job_id}",
                             security=self.security, timeout=2)
                log.info("handed %s back to the dispatcher", current.commit[:12])
            except (OSError, ProtocolError) as exc:
                log.info("could not hand back %s: %s", current.commit[:12], exc)
        for thread in self.threads:
            thread.join(5)
        self.watchdog.stop()
        try:
            self._deliver()
        except (OSError, ProtocolError):
            log.info("undelivered results stay in %s", self.outbox.folder)


def make_preparer(args, test_command: list[str] | None,
                  state_dir: str) -> environments.Preparer:
    """The recipe defaults and caps from the flags, and the environments."""
    setup = tuple(shlex.split(args.setup_command)) if args.setup_command else None
    limits = recipe.Limits(setup=setup, test=tuple(test_command) if test_command else None,
                           timeout=args.timeout, setup_timeout=args.setup_timeout,
                           max_timeout=args.max_timeout)
    cache = None
    if setup or not args.ignore_repo_recipe:
        cache = environments.EnvironmentCache(args.env_dir or os.path.join(state_dir, "envs"),
                                              args.keep_envs)
    return environments.Preparer(limits, cache, read_recipe=not args.ignore_repo_recipe)


def bind_server(host: str, port: int | None, commands, security, max_connections):
    """Bind ``--port``, or the first free port from 8900 up."""
    ports = [port] if port is not None else range(FIRST_PORT, LAST_PORT + 1)
    error = None
    for candidate in ports:
        try:
            return helpers.MessageServer((host, candidate), commands, security,
                                         max_connections)
        except OSError as exc:
            error = exc
    where = port if port is not None else f"{FIRST_PORT}-{LAST_PORT}"
    raise ConfigError(f"cannot listen on {host}:{where}: {error.strerror}")


def job_limit(args, preparer: environments.Preparer) -> float:
    """The longest a job may take here by this runner's own limits: the
    checkout, a first build of an environment and the tests, each as far
    as a recipe may raise it.  The dispatcher's job deadline must not run
    out before it (a first build would be reassigned and built again)."""
    cap = None if args.ignore_repo_recipe else args.max_timeout
    test = max(args.timeout, cap or 0)
    setup = 0.0 if preparer.cache is None else max(args.setup_timeout, cap or 0)
    return args.checkout_timeout + setup + test


def runner_name(text: str) -> str:
    """``--name``: checked here, so a bad one is a usage error at start-up
    rather than a refusal of every ``register``."""
    try:
        return state_schema.check_runner_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="CI test runner: runs the tests of the commits the dispatcher sends.")
    parser.add_argument("repo", metavar="REPO",
                        help="this runner's own clone of the repository under test")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int,
                        help=f"port to listen on (default: first free from {FIRST_PORT})")
    parser.add_argument("--advertise", metavar="HOST:PORT",
                        help="address the dispatcher should use to reach this runner "
                             "(default: --host, or the local address of the link to the "
                             "dispatcher when bound to 0.0.0.0)")
    parser.add_argument("--dispatcher-server", default=DEFAULT_DISPATCHER,
                        metavar="HOST:PORT",
                        help="the dispatcher's address (default: %(default)s)")
    parser.add_argument("--name", type=runner_name,
                        help="what the dashboard and the dispatcher's state call this runner "
                             "(1 to 64 letters, digits, '.', '_' or '-'; default: none, "
                             "shown as its address)")
    parser.add_argument("--test-command", metavar="COMMAND",
                        help="command run in the clone's root (split like a shell would, "
                             "never run by one; default: python -m unittest discover -s tests"
                             " [-t .])")
    parser.add_argument("--junit-xml", metavar="PATTERN",
                        help="JUnit XML file(s) the test command writes, a glob relative to "
                             "the clone (e.g. 'reports/*.xml'), read for per-test results; "
                             "not needed for unittest and pytest commands, whose results "
                             "are recorded anyway")
    parser.add_argument("--timeout", type=positive(float), metavar="SECONDS",
                        help="kill the tests after this long; verdict 'timeout' "
                             f"(default: {DEFAULT_TIMEOUT:g}, or --max-timeout if lower)")
    parser.add_argument("--setup-command", metavar="COMMAND",
                        help="command that installs what the tests need, run in a cached "
                             "virtual environment in the clone's root (split like a shell "
                             "would, never run by one; e.g. \"python -m pip install -e "
                             ".[test]\"; default: none; a repository's .ci.ini may set it)")
    parser.add_argument("--setup-timeout", type=positive(float), metavar="SECONDS",
                        help="limit for building an environment; verdict 'error' "
                             f"(default: {environments.DEFAULT_SETUP_TIMEOUT:g}, or "
                             "--max-timeout if lower)")
    parser.add_argument("--max-timeout", type=positive(float), metavar="SECONDS",
                        help="the most a repository's .ci.ini may raise timeout and "
                             "setup_timeout to (default: it may only lower them)")
    parser.add_argument("--ignore-repo-recipe", action="store_true",
                        help="do not read .ci.ini from the commits: only these flags decide")
    parser.add_argument("--keep-envs", type=positive(int), default=environments.DEFAULT_KEEP,
                        metavar="N",
                        help="keep the N most recently used environments, delete older ones "
                             "(default: %(default)s)")
    parser.add_argument("--env-dir", metavar="DIR",
                        help="folder for this runner's environments, not shared with another "
                             "runner (default: STATE_DIR/envs)")
    parser.add_argument("--checkout-timeout", type=positive(float), default=DEFAULT_CHECKOUT_TIMEOUT,
                        metavar="SECONDS",
                        help="limit for fetch and checkout (default: %(default)s)")
    parser.add_argument("--state-dir",
                        help="folder for the outbox of undelivered results "
                             "(default: REPO/.git/ci-runner)")
    parser.add_argument("--heartbeat", type=positive(float), default=DEFAULT_HEARTBEAT,
                        metavar="SECONDS",
                        help="seconds between re-registrations with the dispatcher "
                             "(default: %(default)s)")
    parser.add_argument("--retry-max", type=positive(float), default=DEFAULT_RETRY_MAX,
                        metavar="SECONDS",
                        help="longest wait between retries while the dispatcher is away "
                             "(default: %(default)s)")
    parser.add_argument("--dispatcher-timeout", type=float, metavar="SECONDS",
                        help="exit when the dispatcher has been unreachable this long "
                             "(default: wait forever)")
    parser.add_argument("--progress-interval", type=positive(float),
                        default=DEFAULT_PROGRESS_INTERVAL,
                        metavar="SECONDS",
                        help="send the running test's new output to the dispatcher this "
                             "often, for live logs (default: %(default)s)")
    parser.add_argument("--test-user", metavar="USER",
                        help="run setup and tests as this unprivileged user (Linux; the "
                             "runner runs as root), so tests cannot read the runner's key, "
                             "environment, outbox or state, nor change its repository; the "
                             "clone must belong to USER, --state-dir must lie outside it, and "
                             "the repository moves to STATE-DIR/git; each run gets a private "
                             "HOME and TMPDIR, and after it every process of USER is killed "
                             "and its files in /tmp, /var/tmp, /dev/shm removed (give each "
                             "runner its own USER)")
    add_common_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        # A limit not given is its default, lowered to --max-timeout: only
        # a limit given above it is a contradiction.
        for name, default in (("timeout", DEFAULT_TIMEOUT),
                              ("setup_timeout", environments.DEFAULT_SETUP_TIMEOUT)):
            if getattr(args, name) is None:
                setattr(args, name, min(default, args.max_timeout or math.inf))
        if args.max_timeout is not None:
            for name in ("timeout", "setup_timeout"):
                if getattr(args, name) > args.max_timeout:
                    raise ConfigError(f"--{name.replace('_', '-')} is larger than "
                                              "--max-timeout")
        if args.port is not None and not 0 <= args.port < 65536:
            raise ConfigError("--port must be 0-65535")
        for flag in ("test_command", "setup_command"):
            if getattr(args, flag) is None:
                continue
            try:
                if not shlex.split(getattr(args, flag)):
                    raise ValueError("empty")
            except ValueError as exc:
                raise ConfigError(
                    f"invalid --{flag.replace('_', '-')}: {exc}") from None
        try:
            if args.junit_xml is not None:
                junit_capture.check_pattern(args.junit_xml)
            dispatcher = parse_address(args.dispatcher_server)
            if args.advertise:
                parse_address(args.advertise)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        repo = os.path.abspath(args.repo)
        if not os.path.exists(os.path.join(repo, ".git")):
            raise ConfigError(f"{args.repo} is not a git clone (no .git folder)")
        security = security_from_args(args)
        check_bind_allowed(args.host, security, args.insecure)
        if security.server_tls:
            # Only the dispatcher may send us work, and only it is trusted
            # with our results.
            security.tls_client_roles = frozenset({"dispatcher"})
            security.tls_server_role = "dispatcher"
        state_dir = os.path.abspath(args.state_dir or os.path.join(repo, ".git", "ci-runner"))
        test_user = TestUser(args.test_user) if args.test_user else None
        if test_user is not None:
            test_user.check_clone(repo, state_dir)
            test_user.check_private(args.secret_file, "--secret-file")
            test_user.check_private(args.tls_key, "--tls-key")
            if os.path.commonpath([state_dir, repo]) == repo:
                raise ConfigError("with --test-user, give a --state-dir outside the "
                                          "clone (the test user owns the clone)")
        ensure_dir(state_dir, "state folder")
        os.chmod(state_dir, 0o700)
        persist_nonces(security, state_dir, "runner")
        runner = TestRunner(args, security, dispatcher, state_dir, test_user)
        if runner.private is not None:
            runner.private.setup()
        if args.test_user:
            # The test user may pass through (not list) the state folder to
            # reach the environments in it; the outbox stays closed.
            os.chmod(state_dir, 0o711)
            if runner.preparer.cache is not None:
                os.chmod(runner.preparer.cache.folder, 0o711)
            # A test user that cannot run or read what it is handed would
            # turn every commit's verdict into "error": refuse to start.
            user_access.provide_recorder(state_dir)
            user_access.check_test_user(test_user, repo, runner.preparer, runner.test_command,
                                        child_env(test_user))
        server = bind_server(args.host, args.port, runner.commands, security,
                             args.max_connections)
    except ConfigError as exc:
        print(f"test_runner: error: {exc}", file=sys.stderr)
        return 2
    address = server.server_address[:2]
    log.info("runner listening on %s, clone %s; secret %s, TLS %s, test user %s",
             format_address(address), repo,
             f"on (key {security.key_id})" if security.key_id else
             "on (shared)" if security.secret else "off",
             "on" if security.server_tls else "off",
             f"{args.test_user} ({runner.slot.sandbox.describe()})" if runner.slot.sandbox
             else "off (tests run as this runner's user and can read what it can)")
    runner.start(address)
    helpers.serve_until_signalled(server, on_stop=runner.stop, stop=runner.stop_event)
    log.info("runner stopped")
    return 1 if runner.gave_up else 0


if __name__ == "__main__":
    sys.exit(main())
