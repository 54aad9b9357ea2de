"""The git hook's ``notify`` stays light with a secret too: found by
``benchmarks/bench.py``, where notify with ``CI_SECRET`` set took about
0.15 s because reading the secret imported ``helpers`` (ssl, logging, the
server code).  Import lists come from ``python -X importtime``."""

from __future__ import annotations

import os
import subprocess
import threading

import pytest

from support.cluster import PY, ROOT, free_port
from ci import auth
import helpers
from ci.security import Security
from ci.wire import Message

SECRET = "hook-client-test-secret-0123456789"
HEAVY = ("helpers", "ci.client_cli", "ssl", "logging", "socketserver", "ipaddress",
         # a str host given to getaddrinfo imports the idna codec and these
         "encodings.idna", "stringprep", "unicodedata")


def run_notify(args, env_extra=None):
    env = dict(os.environ)
    env.pop("CI_SECRET", None)
    env.update(env_extra or {})
    proc = subprocess.run([PY, "-S", "-X", "importtime", os.path.join(ROOT, "repo_observer.py"),
                           "notify", *args], env=env, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    return proc, imported


class NotifyServer:
    """A real MessageServer with a secret, counting notifies."""

    def __init__(self, security):
        self.count = 0
        self.server = helpers.MessageServer(("127.0.0.1", 0), {"notify": self.notify},
                                            security)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def notify(self, message, peer):
        self.count += 1
        return Message("ok")

    def close(self):
        self.server.shutdown()
        self.thread.join(5)
        self.server.server_close()


@pytest.fixture
def server():
    made = NotifyServer(Security(secret=SECRET.encode()))
    yield made
    made.close()


@pytest.mark.parametrize("how", ["env", "file", "issued-key"])
def test_notify_with_a_secret_imports_nothing_heavy(tmp_path, server, how):
    env, args = {}, ["--observer", f"127.0.0.1:{server.port}"]
    if how == "env":
        env["CI_SECRET"] = SECRET
    elif how == "file":
        path = tmp_path / "secret"
        path.write_text(SECRET + "\n")
        args += ["--secret-file", str(path)]
    else:
        # An issued key is refused by this shared-secret server, but it is
        # read (and the message signed with it) without the heavy modules.
        path = tmp_path / "key"
        path.write_text(auth.format_key_file("observer", "hook", SECRET.encode()))
        args += ["--secret-file", str(path)]
    proc, imported = run_notify(args, env)
    assert "ci.wire" in imported and "hook_client" in imported, proc.stderr[-2000:]
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    if how == "issued-key":
        # Refused before it is read (a key the server does not know): the
        # refusal is unsigned, and quoted.
        assert proc.returncode == 1 and "unknown or revoked key" in proc.stderr
        assert server.count == 0
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert server.count == 1


def test_notify_wrong_secret_is_refused(server):
    proc, _ = run_notify(["--observer", f"127.0.0.1:{server.port}"],
                         {"CI_SECRET": "another-secret-entirely"})
    assert proc.returncode == 1 and "bad signature" in proc.stderr
    assert server.count == 0


@pytest.mark.parametrize("content, reason", [("", "is empty"),
                                              ("ci-key-v1 observer:x nothex", "malformed"),
                                              (None, "cannot read")])
def test_notify_bad_secret_file_is_a_clear_error(tmp_path, content, reason):
    path = tmp_path / "secret"
    if content is not None:
        path.write_text(content)
    proc, _ = run_notify(["--observer", f"127.0.0.1:{free_port()}", "--secret-file",
                          str(path)])
    assert proc.returncode == 2
    assert reason in proc.stderr and "Traceback" not in proc.stderr


def test_a_flag_the_hook_does_not_read_hands_over_to_the_full_client(server):
    """``--help`` (or a TLS flag, a typo) goes to the one-shot client in
    ci/client_cli.py, which explains every flag; ``helpers`` keeps only the
    server base and the client call (issue 18), no command line."""
    proc, imported = run_notify(["--observer", f"127.0.0.1:{server.port}", "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: repo_observer.py notify" in proc.stdout and "--secret-file" in proc.stdout
    assert "ci.client_cli" in imported
    assert not hasattr(helpers, "client_main") and not hasattr(helpers, "ClientCommand")
    assert server.count == 0
