"""What many tests share: free ports, temporary git repositories, bounded
waits, and the real daemons started as processes and ended by PID
(the fixtures that end them are in tests/conftest.py)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import helpers  # noqa: E402
from ci import results  # noqa: E402
from ci.security import Security
from ci.wire import Message, ProtocolError, decode_fields, encode_fields, valid_full_commit

PY = sys.executable
# A runner with --test-user runs under a Python that user can execute too
# (its environments and default test command use the runner's Python; it
# refuses to start otherwise), and this machine's own may lie in root's
# home, which the test user cannot enter.
SYSTEM_PYTHON = "/usr/bin/python3"
# The files a runner needs to run: a copy of them is what a runner started
# as an unprivileged user runs, since this clone may be private to root.
PROJECT_FILES = ("*.py", "*.sh", "ci/**/*.py", "ci_support/*.py")
GIT_ENV = {"GIT_AUTHOR_NAME": "CI Test", "GIT_AUTHOR_EMAIL": "ci@example.invalid",
           "GIT_COMMITTER_NAME": "CI Test", "GIT_COMMITTER_EMAIL": "ci@example.invalid"}


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = ""):
    """Poll ``predicate`` until it returns a truthy value or the deadline.

    A connection error inside the predicate (a daemon still starting, or
    over its connection cap and closing at once) counts as "not yet"; at
    the deadline the last one is shown with the timeout."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = predicate()
        except (OSError, ProtocolError) as exc:
            value, last_error = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}"
                                 + (f" (last error: {last_error!r})" if last_error else ""))
        time.sleep(interval)


free_port = helpers.free_port


def dispatch(cluster, *commits: str) -> None:
    """Ask the cluster's dispatcher to test ``commits`` (as the observer does)."""
    reply = helpers.call(("127.0.0.1", cluster.dispatcher_port), "dispatch", " ".join(commits))
    assert reply.command == "ok", reply


def git(repo, *args) -> str:
    env = dict(os.environ, **GIT_ENV)
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, env=env).stdout.strip()


PASSING_TEST = """import unittest

class TestSample(unittest.TestCase):
    def test_ok(self):
        self.assertEqual(1 + 1, 2)
"""

FAILING_TEST = """import unittest

class TestBroken(unittest.TestCase):
    def test_wrong(self):
        self.assertEqual(1 + 1, 3)
"""


def write_files(root: str, files: dict) -> None:
    """Write each file (text or bytes) under ``root``, making its folders;
    None deletes it."""
    for name, text in files.items():
        path = os.path.join(root, name)
        if text is None:
            os.unlink(path)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(text.encode() if isinstance(text, str) else text)


class Upstream:
    """A temporary upstream repository with helpers to commit to it."""

    def __init__(self, path):
        self.path = str(path)
        os.makedirs(self.path)
        git(self.path, "init", "-q", "-b", "main")
        self.counter = 0

    def commit(self, files: dict[str, str | None] | None = None, message: str = "") -> str:
        """Write (or delete, with None) files and commit; return the id."""
        self.counter += 1
        write_files(self.path, files or {f"change_{self.counter}.txt": f"{self.counter}\n"})
        git(self.path, "add", "-A")
        git(self.path, "commit", "-q", "--allow-empty", "-m", message or f"c{self.counter}")
        return git(self.path, "rev-parse", "HEAD")

    def clone(self, dest) -> str:
        subprocess.run(["git", "clone", "-q", self.path, str(dest)], check=True,
                       capture_output=True)
        return str(dest)


class Daemon:
    def __init__(self, name, args, log_path, cwd, env):
        self.name = name
        self.args = args
        self.log_path = log_path
        self.log_handle = open(log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self.log_handle, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=cwd, env=env,
                                     start_new_session=True)
        self.pid = self.proc.pid

    def log(self) -> str:
        with open(self.log_path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, sig) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, sig=signal.SIGTERM, timeout: float = 10) -> int:
        self.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the daemon and anything left in its process group."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        self.log_handle.close()


class Cluster:
    """Starts the real daemons against a temporary upstream; every process
    is ended by PID in the fixture's finaliser."""

    def __init__(self, tmp_path, upstream: Upstream):
        self.tmp = tmp_path
        self.upstream = upstream
        self.results = str(tmp_path / "test_results")
        self.state = str(tmp_path / "dispatcher_state")
        self.daemons: list[Daemon] = []
        self.dispatcher_port = free_port()
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env.pop("CI_SECRET", None)
        self._n = 0
        self.closers: list = []  # in-process stand-ins to close with the cluster

    @property
    def dispatcher_address(self) -> str:
        return f"127.0.0.1:{self.dispatcher_port}"

    def _start(self, name, script, args, env=None, python=PY) -> Daemon:
        self._n += 1
        log_path = str(self.tmp / f"{self._n:02d}-{name}.log")
        daemon = Daemon(name, [python, os.path.join(ROOT, script), *args], log_path,
                        str(self.tmp), env or self.env)
        self.daemons.append(daemon)
        return daemon

    def start_dispatcher(self, *extra, wait=True, env=None) -> Daemon:
        args = ["--host", "127.0.0.1", "--port", str(self.dispatcher_port),
                "--results-dir", self.results, "--state-dir", self.state,
                "--ping-interval", "0.5", "--ping-misses", "2", "--ping-timeout", "0.5",
                "--log-level", "DEBUG", *extra]
        daemon = self._start("dispatcher", "dispatcher.py", args, env)
        if wait:
            wait_for_port(self.dispatcher_port, daemon)
        return daemon

    def start_runner(self, *extra, port=None, clone=None, wait=True, env=None) -> Daemon:
        port = port or free_port()
        self._n += 0
        clone = clone or self.upstream.clone(self.tmp / f"runner-{port}")
        args = ["--host", "127.0.0.1", "--port", str(port),
                "--dispatcher-server", self.dispatcher_address, "--heartbeat", "0.5",
                "--retry-max", "0.5", "--log-level", "DEBUG", *extra, clone]
        python = SYSTEM_PYTHON if "--test-user" in extra else PY
        daemon = self._start(f"runner-{port}", "test_runner.py", args, env, python)
        daemon.port = port
        daemon.clone = clone
        if wait:
            wait_for_port(port, daemon)
        return daemon

    def start_observer(self, *extra, clone=None, port=None, wait=True, env=None) -> Daemon:
        port = port or free_port()
        clone = clone or self.upstream.clone(self.tmp / f"observer-{port}")
        args = ["--host", "127.0.0.1", "--port", str(port), "--poll", "0.5",
                "--dispatcher-server", self.dispatcher_address, "--log-level", "DEBUG",
                *extra, clone]
        daemon = self._start("observer", "repo_observer.py", args, env)
        daemon.port = port
        daemon.clone = clone
        if wait:
            wait_for_port(port, daemon)
        return daemon

    def status(self) -> dict[str, str]:
        """The dispatcher's ``status`` counters, as sent."""
        reply = helpers.call(("127.0.0.1", self.dispatcher_port), "status", timeout=5)
        assert reply.command == "ok", reply
        return decode_fields(reply.body)

    def result_path(self, commit: str) -> str:
        return os.path.join(self.results, commit)

    def result(self, commit: str, timeout: float = 60) -> dict:
        """Wait for a commit's result file; return its fields plus output."""
        path = self.result_path(commit)
        wait_until(lambda: os.path.exists(path), timeout, what=f"result for {commit[:12]}",
                   interval=0.05)
        with open(path, "rb") as handle:
            fields, output = results.parse_result(handle.read())
        fields["output"] = output
        return fields

    def result_files(self) -> list[str]:
        if not os.path.isdir(self.results):
            return []
        # Result files only: ``<commit>.xml`` beside them holds per-test records.
        return sorted(n for n in os.listdir(self.results) if valid_full_commit(n))

    def dump_logs(self) -> str:
        return "\n".join(f"===== {d.name} (pid {d.pid})\n{d.log()[-6000:]}"
                         for d in self.daemons)

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.close()
        for other in self.closers:
            other.close()


def project_copy(dest) -> str:
    """A copy of the runner's files at ``dest`` that any user can read
    (folders 755, files 644), for daemons started as an unprivileged user:
    this clone may lie in a folder only root can enter.  Made once: a
    later call leaves it alone, as daemons started from it may still
    import from it (a rewrite would hand them half a module)."""
    import glob
    import shutil
    if os.path.isdir(str(dest)):
        return str(dest)
    for pattern in PROJECT_FILES:
        for source in glob.glob(os.path.join(glob.escape(ROOT), pattern), recursive=True):
            target = os.path.join(str(dest), os.path.relpath(source, ROOT))
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            shutil.copyfile(source, target)
            os.chmod(target, 0o644)
    for folder, _dirs, _files in os.walk(str(dest)):
        os.chmod(folder, 0o755)
    return str(dest)


def wait_for_port(port: int, daemon: Daemon | None = None, timeout: float = 15) -> None:
    def listening():
        if daemon is not None and not daemon.alive():
            raise AssertionError(f"{daemon.name} exited early:\n{daemon.log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False
    wait_until(listening, timeout, what=f"port {port}")


def send_raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes and read whatever comes back until close.

    A server may answer (``busy``, ``error``) and close before it has read
    everything; the send then fails with a reset, which is an answer too, so
    the reply (if any got through) is still read rather than raising."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def send_slowly(port: int, chunks: list[bytes], gap: float, limit: float = 8.0):
    """Send ``chunks`` with ``gap`` seconds between them until the server
    closes or ``limit`` passes; return (seconds until the first reply byte
    or None, seconds until close, reply)."""
    started = time.monotonic()
    answered = None
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=gap) as sock:
        pending = list(chunks)
        while time.monotonic() - started < limit:
            if pending:
                try:
                    sock.sendall(pending.pop(0))
                except OSError:
                    break
            try:
                chunk = sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            if answered is None:
                answered = time.monotonic() - started
            reply += chunk
    return answered, time.monotonic() - started, reply


class ThreadedServer:
    """A real ``helpers.MessageServer`` on a free loopback port, served from
    a thread of the test process: a stand-in peer whose answers the test
    decides (what a real daemon cannot be made to do on cue)."""

    def __init__(self, commands: dict):
        self.lock = threading.Lock()
        self.server = helpers.MessageServer(("127.0.0.1", 0), commands, Security())
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(5)
        self.server.server_close()


class FakeRunner(ThreadedServer):
    """A real server on port 0 speaking the runner's protocol; what it
    answers to ``runtest`` the test decides, which a real runner cannot be
    made to do on cue (a lost or refused delivery).  It records the token
    of every assignment, so a test can report a result as the assignee."""

    def __init__(self, answers=None):
        self.answers = list(answers or [])
        self.instance = secrets.token_hex(4)
        self.calls: list[str] = []
        self.tokens: dict[str, str] = {}
        super().__init__({"ping": self.ping, "runtest": self.runtest})
        self.key = f"127.0.0.1:{self.port}"

    def ping(self, message, peer):
        return Message("ok", "pong", encode_fields(
            {"instance": self.instance, "busy": ""}))

    def runtest(self, message, peer):
        with self.lock:
            commit, token = message.argument.split()
            self.calls.append(commit)
            self.tokens[commit] = token
            return self.answers.pop(0) if self.answers else Message("ok")

    def received(self) -> list[str]:
        with self.lock:
            return list(self.calls)

    def register(self, dispatcher_port: int) -> str:
        reply = helpers.call(("127.0.0.1", dispatcher_port), "register", self.key,
                             encode_fields({"instance": self.instance, "busy": ""}))
        assert reply.command == "ok", reply
        return reply.argument


class Fleet:
    """Fake runners that take every dispatched commit at once and let the
    test post each result, in any order, with the assignment's token."""

    def __init__(self, size: int):
        self.runners = [FakeRunner() for _ in range(size)]
        self.used: set[str] = set()

    def register(self, dispatcher_port: int) -> None:
        for runner in self.runners:
            runner.register(dispatcher_port)

    def token(self, commit: str, timeout: float = 10) -> str:
        """The newest token handed out for ``commit`` and not yet used."""
        def fresh():
            for runner in self.runners:
                with runner.lock:
                    token = runner.tokens.get(commit)
                if token and token not in self.used:
                    return token
            return None
        token = wait_until(fresh, timeout, what=f"an assignment of {commit[:12]}")
        self.used.add(token)
        return token

    def close(self) -> None:
        for runner in self.runners:
            runner.close()


