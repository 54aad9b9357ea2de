"""What the least-privilege tests share: the master secret and issued keys,
the signed client call, runner stand-ins holding a key, and clusters in
folders the unprivileged user ``nobody`` can traverse (its clones, its
daemons).  Used by the tests of keys, tokens, TLS roles, the hostile
commit, the test user, the private repository, the sandbox and the clean
tree."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

import pytest

from ci import auth
import helpers
from support.users import new_test_user
from support.cluster import PASSING_TEST, SYSTEM_PYTHON, Cluster, Daemon, Upstream
from ci.security import Security
from ci.wire import Message, encode_fields

MASTER = b"master secret of the least-privilege tests"
LOOPBACK = "127.0.0.1"
C1, C2, C3 = "a" * 40, "b" * 40, "c" * 40


def write_secret(path, data: bytes) -> str:
    path = pathlib.Path(path)
    path.write_bytes(data)
    path.chmod(0o600)
    return str(path)


def key_security(role: str, name: str, master: bytes = MASTER) -> Security:
    """What a process started with an issued key file signs with."""
    key_id, key = auth.parse_key_file(auth.format_key_file(role, name, master).encode())
    return Security(secret=key, key_id=key_id)


def ask(port: int, command: str, argument: str = "", body: bytes = b"",
        security: Security | None = None) -> Message:
    return helpers.call((LOOPBACK, port), command, argument, body, security=security,
                        timeout=5)


def warnings(daemon) -> list[str]:
    return [line for line in daemon.log().splitlines() if " WARNING " in line]


class KeyedRunner:
    """A runner stand-in with its own issued key: it answers ``ping`` and
    ``runtest`` as a runner does, and records the token of each job.
    ``port``: where to listen (another's that was just closed, to play a
    runner started at an address a stale entry still names)."""

    def __init__(self, name: str, port: int = 0):
        self.name = name
        self.security = key_security("runner", name)
        self.lock = threading.Lock()
        self.tokens: dict[str, list[str]] = {}
        self.instance = name + "-instance"
        commands = {"ping": self.ping, "runtest": self.runtest}
        self.server = helpers.MessageServer((LOOPBACK, port), commands, self.security)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def ping(self, message, peer):
        return Message("ok", "pong", encode_fields({"instance": self.instance,
                                                            "busy": ""}))

    def runtest(self, message, peer):
        commit, token = message.argument.split()
        with self.lock:
            self.tokens.setdefault(commit, []).append(token)
        return Message("ok")

    def token(self, commit: str) -> str | None:
        """The newest token this runner was given for ``commit``."""
        with self.lock:
            got = self.tokens.get(commit)
            return got[-1] if got else None

    def count(self, commit: str) -> int:
        with self.lock:
            return len(self.tokens.get(commit, []))

    def register(self, port: int) -> None:
        reply = ask(port, "register", f"{LOOPBACK}:{self.port}", encode_fields(
            {"instance": self.instance, "busy": ""}), self.security)
        assert reply.command == "ok", reply

    def send(self, port: int, command: str, commit: str, token: str | None,
             body: bytes = b"") -> str:
        argument = f"{commit} {token}" if token else commit
        reply = ask(port, command, argument, body, self.security)
        return f"{reply.command}:{reply.argument}"

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(5)
        self.server.server_close()


TEST_COMMAND = f"{SYSTEM_PYTHON} -m unittest discover -s tests"


class UserDaemon(Daemon):
    """A daemon started as another (unprivileged) user."""

    def __init__(self, name, args, log_path, cwd, env, user):
        self.name, self.args, self.log_path = name, args, log_path
        self.log_handle = open(log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self.log_handle, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=cwd, env=env,
                                     start_new_session=True, user=user.pw_uid,
                                     group=user.pw_gid, extra_groups=[])
        self.pid = self.proc.pid


def chown_tree(path, user) -> None:
    for folder, dirs, files in os.walk(path):
        os.chown(folder, user.pw_uid, user.pw_gid)
        for name in files:
            os.lchown(os.path.join(folder, name), user.pw_uid, user.pw_gid)


def nobody_clone(upstream, path, nobody) -> str:
    """A clone of ``upstream`` at ``path`` that belongs to the test user."""
    clone = upstream.clone(path)
    chown_tree(clone, nobody)
    return clone


def nobody_folder(request, prefix: str):
    """A temporary folder an unprivileged user can traverse (pytest's are
    private to root), removed afterwards, with an upstream holding one
    passing test; returns (folder, upstream, the user).  The user is one of
    the test's own (``new_test_user``), never the machine's 'nobody': a
    runner with ``--test-user`` ends every process of its user and removes
    its files in /tmp.  Skips unless this runs as root."""
    if os.geteuid() != 0:
        pytest.skip("needs root (to run processes as an unprivileged user)")
    nobody = new_test_user(request)
    base = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    os.chmod(base, 0o755)
    upstream = Upstream(base / "upstream")
    return base, upstream, nobody


def user_folder_cluster(request):
    """A cluster in a folder of its own that the unprivileged user can
    traverse (pytest's are private to root), removed afterwards; returns
    (cluster, upstream, base folder, the user)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs {SYSTEM_PYTHON}")
    base, upstream, nobody = nobody_folder(request, "ci-hostile-")
    # The unprivileged user's git must accept repositories owned by others.
    gitconfig = base / "gitconfig"
    gitconfig.write_text("[safe]\n\tdirectory = *\n")
    gitconfig.chmod(0o644)
    upstream.commit({"tests/test_sample.py": PASSING_TEST}, "initial")
    cluster = Cluster(base, upstream)

    def close():
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            print(cluster.dump_logs())
        cluster.close()
    request.addfinalizer(close)
    cluster.env.update(GIT_CONFIG_GLOBAL=str(gitconfig), HOME=str(base))
    return cluster, upstream, base, nobody


def git_head(upstream) -> str:
    return subprocess.run(["git", "-C", upstream.path, "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
