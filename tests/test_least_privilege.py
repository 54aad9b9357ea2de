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
import sys
import tempfile
import threading

import pytest

import auth
import helpers
import results
from conftest import (PASSING_TEST, PY, ROOT, Cluster, Daemon, Upstream, free_port,
                      wait_until)
from helpers import Message

MASTER = b"master secret of the least-privilege tests"
LOOPBACK = "127.0.0.1"
C1, C2, C3 = "a" * 40, "b" * 40, "c" * 40


def write_secret(path, data: bytes) -> str:
    path = pathlib.Path(path)
    path.write_bytes(data)
    path.chmod(0o600)
    return str(path)


def key_security(role: str, name: str, master: bytes = MASTER) -> helpers.Security:
    """What a process started with an issued key file signs with."""
    key_id, key = auth.parse_key_file(auth.format_key_file(role, name, master).encode())
    return helpers.Security(secret=key, key_id=key_id)


def ask(port: int, command: str, argument: str = "", body: bytes = b"",
        security: helpers.Security | None = None) -> Message:
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
        with pytest.raises(helpers.ConfigError, match="malformed key file"):
            helpers.load_credentials(path)
    path = write_secret(tmp_path / "good.key", text.encode())
    assert helpers.load_credentials(path) == (auth.derive_key(MASTER, "observer", "obs-1"),
                                              "observer:obs-1")
    shared = write_secret(tmp_path / "shared", b"  plain secret \n")
    assert helpers.load_credentials(shared) == (b"plain secret", None)


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
    own = auth.OwnKeyring(key, "runner:r1")
    assert own.lookup("runner:r1") == (key, "runner", "r1")
    assert own.lookup(None) == (key, "runner", "r1")
    assert own.lookup("runner:r2") is None and own.lookup("observer:x") is None
    shared = auth.OwnKeyring(MASTER, None)
    assert shared.lookup(None) == (MASTER, auth.ADMIN, None)
    assert shared.lookup("runner:r1") is None
    # Security without a keyring behaves as OwnKeyring does.
    sec = helpers.Security(secret=key, key_id="runner:r1")
    assert sec.lookup("runner:r1") == (key, "runner", "r1") and sec.lookup("runner:r2") is None


def test_frames_carry_the_key_id_and_it_is_signed():
    key = auth.derive_key(MASTER, "runner", "r1")
    frame = helpers.encode_frame(b"results:x", key, key_id="runner:r1", nonce="ab" * 6)
    line, _, payload = frame.partition(b"\n")
    header = helpers.decode_header(line)
    assert header.key_id == "runner:r1" and payload == b"results:x"
    helpers.verify_frame(header, payload, key)
    # The key id is part of what is signed: swapping it breaks the tag,
    # so a runner cannot pass its frame off as another key's.
    swapped = helpers.decode_header(line.replace(b"runner:r1", b"runner:r2"))
    with pytest.raises(helpers.ProtocolError, match="bad signature"):
        helpers.verify_frame(swapped, payload, key)
    dropped = helpers.decode_header(line.rsplit(b" ", 1)[0])
    assert dropped.key_id is None
    with pytest.raises(helpers.ProtocolError, match="bad signature"):
        helpers.verify_frame(dropped, payload, key)
    # Without a secret no key id is sent; a malformed one is not a frame.
    assert helpers.decode_header(helpers.encode_frame(b"x", key_id="runner:r1")
                                 .split(b"\n")[0]).key_id is None
    with pytest.raises(helpers.ProtocolError, match="key id"):
        helpers.decode_header(line.rsplit(b" ", 1)[0] + b" r1")


# --------------------------------------------------------------------------
# Roles against a real dispatcher.

ALL_COMMANDS = ("register", "results", "release", "progress", "dispatch", "retest",
                "status", "state", "log")
ALLOWED = {
    "runner": {"register", "results", "release", "progress"},
    "observer": {"dispatch", "retest", "status", "state", "log"},
    "operator": {"dispatch", "retest", "status", "state", "log"},
    "viewer": {"status", "state", "log"},
}


def _request(command: str, runner_port: int) -> tuple[str, bytes]:
    return {
        "register": (f"{LOOPBACK}:{runner_port}",
                     helpers.encode_fields({"instance": "i1", "busy": ""})),
        "results": (f"{C3} {'0' * 32}", results.encode_results_body(
            {"verdict": "passed"}, b"")),
        "release": (f"{C3} {'0' * 32}", b""),
        "progress": (f"{C3} {'0' * 32}", b"out"),
        "dispatch": (C3, b""),
        "retest": (C3, b""),
        "status": ("", b""),
        "state": ("", b""),
        "log": (C3, b""),
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
    admin = helpers.Security(secret=MASTER)
    assert ask(port, "dispatch", C1, security=admin).argument == "queued 1"
    assert ask(port, "status", security=admin).command == "ok"
    # A key id the master did not derive (another master) is refused.
    with pytest.raises(helpers.ProtocolError, match="bad signature"):
        ask(port, "status", security=key_security("viewer", "v", b"another master"))
    refusals = [w for w in warnings(disp) if "is not allowed for role" in w]
    assert len(refusals) == sum(len(ALL_COMMANDS) - len(a) for a in ALLOWED.values())
    assert all("refused request from 127.0.0.1:" in w for w in refusals)


def test_a_revoked_runner_key_is_refused_within_a_second_without_restart(cluster, tmp_path):
    disp = cluster.start_dispatcher("--secret-file", write_secret(tmp_path / "master", MASTER))
    r1, r2 = key_security("runner", "r1"), key_security("runner", "r2")
    body = helpers.encode_fields({"instance": "i1", "busy": ""})
    assert ask(cluster.dispatcher_port, "register", f"{LOOPBACK}:{free_port()}", body,
               r1).command == "ok"
    proc = subprocess.run([PY, os.path.join(ROOT, "dispatcher.py"), "revoke-key", "r1",
                           "--state-dir", cluster.state], capture_output=True, text=True,
                          timeout=20)
    assert proc.returncode == 0 and "revoked r1" in proc.stdout, proc.stderr

    def refused():
        try:
            ask(cluster.dispatcher_port, "register", f"{LOOPBACK}:{free_port()}", body, r1)
        except helpers.ProtocolError as exc:
            return "unknown or revoked key" in str(exc)
        return False
    wait_until(refused, 2.5, interval=0.1, what="the revoked key refused")
    assert ask(cluster.dispatcher_port, "register", f"{LOOPBACK}:{free_port()}", body,
               r2).command == "ok"
    assert any("unknown or revoked key 'runner:r1'" in w for w in warnings(disp))
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
        return Message("ok", "pong", helpers.encode_fields({"instance": self.instance,
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
        reply = ask(port, "register", f"{LOOPBACK}:{self.port}", helpers.encode_fields(
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
    return results.encode_results_body({"verdict": verdict}, note.encode())


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
    assert again.send(port, "results", C1, t1_new, verdict_body("passed", "round 2")) == \
        "ok:stored"
    wait_until(lambda: cluster.result(C1)["verdict"] == "passed", 5, what="retest verdict")
    assert b.send(port, "release", C1, t1_new).startswith("error:")


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
