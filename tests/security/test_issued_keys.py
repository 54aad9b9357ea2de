"""Issued keys and their roles (issue 8): derivation, key files, revocation
within a second, keyrings and the key id in every frame (in-process); each
role against each command of a real dispatcher; one address per runner key."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import threading

import pytest

import helpers
from ci import auth
from support.cluster import PY, ROOT, free_port, wait_until
from ci.config import ConfigError
from ci.outcome import Outcome
from ci.security import Security, load_credentials
from ci.wire import (Message, ProtocolError, Unauthentic, decode_header, decode_message,
                     encode_fields, encode_frame, verify_frame)
from support.privilege import C1, C3, LOOPBACK, MASTER, ask, key_security, warnings, write_secret


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


def test_a_revocation_after_a_line_without_its_newline_counts(tmp_path):
    """It was glued to the line before (``r1r2``), and r2 stayed valid
    though ``revoke-key`` had succeeded.  The line before counts too."""
    path = tmp_path / "revoked-keys"
    path.write_text("r0\nr1")     # torn, or edited by hand
    auth.add_revocation(str(path), "r2")
    revocations = auth.Revocations(str(path))
    assert revocations.revoked("runner:r2") and revocations.revoked("runner:r1")


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


ALL_COMMANDS = ("register", "results", "release", "progress", "dispatch", "retest",
                "status", "state", "log", "prefetch", "queue", "queue-state", "queue-event")


ALLOWED = {
    "runner": {"register", "results", "release", "progress"},
    "observer": {"dispatch", "retest", "status", "state", "log", "prefetch", "queue",
                 "queue-state", "queue-event"},
    "operator": {"dispatch", "retest", "status", "state", "log", "prefetch", "queue"},
    "viewer": {"status", "state", "log", "queue"},
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
        "queue": ("", b""),
        "queue-state": ("", b"{}"),
        "queue-event": ("", b""),
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
    r1 = key_security("runner", "r1")
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
    other, = keyed_runners("r2")    # another key still registers (where it answers)
    other.register(cluster.dispatcher_port)
    other.close()                   # and is gone again, dropped like any closed port
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


def dispatcher_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, os.path.join(ROOT, "dispatcher.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=20)


def test_revoke_key_refuses_a_folder_that_holds_no_dispatcher_state(cluster, tmp_path):
    """Run from another folder without flags, revoke-key wrote
    ./dispatcher_state/revoked-keys, which no dispatcher reads, and said
    "revoked": the key stayed good.  It now refuses, and writes nothing."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = dispatcher_cli("revoke-key", "r1", cwd=str(elsewhere))
    assert proc.returncode == 2 and "no dispatcher state in" in proc.stderr, proc
    assert os.listdir(elsewhere) == []
    cluster.start_dispatcher()
    proc = dispatcher_cli("revoke-key", "r1", "--state-dir", cluster.state, cwd=str(elsewhere))
    path = os.path.join(cluster.state, "revoked-keys")
    assert proc.returncode == 0 and f"(in {path})" in proc.stdout, proc
    assert open(path).read().splitlines()[-1] == "r1"


def test_issue_key_output_is_mode_600_whatever_was_there(tmp_path):
    """A file already at --output kept its mode (0644 after a shell
    redirect: the key readable by every user), and a symlink there was
    followed.  The key file is now a new file, mode 600, in its place."""
    master = write_secret(tmp_path / "master", MASTER)
    loose = tmp_path / "r1.key"
    loose.write_text("")
    os.chmod(loose, 0o644)
    target = tmp_path / "elsewhere.txt"
    target.write_text("not a key\n")
    linked = tmp_path / "r2.key"
    os.symlink(target, linked)
    for name, out in (("r1", loose), ("r2", linked)):
        proc = dispatcher_cli("issue-key", name, "--secret-file", master, "--output", str(out))
        assert proc.returncode == 0, proc.stderr
        st = os.lstat(out)
        assert oct(st.st_mode & 0o777) == oct(0o600) and not os.path.islink(out)
        assert load_credentials(str(out))[1] == f"runner:{name}"
    assert target.read_text() == "not a key\n"


def test_a_refusal_before_the_key_is_known_is_unsigned(cluster, tmp_path):
    """A stranger's frame naming a key nobody issued is refused before it
    is read: that reply is bound to no request, and it was signed with the
    master key and an empty reply_to, which is the very shape of a request
    the master signed, handed to anyone who asks.  Now it goes unsigned
    (the client only ever quotes such a refusal), and a known key's reply
    is still signed and bound to its request."""
    cluster.start_dispatcher("--secret-file", write_secret(tmp_path / "master", MASTER))
    frame = encode_frame(b"status:", os.urandom(32), key_id="admin:x")
    with socket.create_connection((LOOPBACK, cluster.dispatcher_port), timeout=10) as conn:
        conn.sendall(frame)
        reply = b""
        while not reply.endswith(b"'") and len(reply) < 4096:
            data = conn.recv(4096)
            if not data:
                break
            reply += data
    line, _, payload = reply.partition(b"\n")
    header = decode_header(line)
    assert header.tag == "-" and header.key_id is None, line
    assert decode_message(payload) == Message("error", "unknown or revoked key 'admin:x'")
    viewer = key_security("viewer", "v")
    assert ask(cluster.dispatcher_port, "status", security=viewer).command == "ok"


class Squatter:
    """A hostile commit holding runner ``name``'s stolen key: it registers
    as that runner at ``address`` every 0.2 s with one instance, as a
    heartbeat does, and keeps every reply."""

    def __init__(self, dispatcher_port: int, name: str, address: str, instance: str):
        self.stop = threading.Event()
        self.replies: list[str] = []
        security = key_security("runner", name)
        body = encode_fields({"instance": instance, "busy": ""})

        def loop():
            while not self.stop.is_set():
                try:
                    reply = ask(dispatcher_port, "register", address, body, security)
                    self.replies.append(f"{reply.command}:{reply.argument}")
                except (OSError, ProtocolError) as exc:
                    self.replies.append(f"failed:{exc}")
                self.stop.wait(0.2)
        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        wait_until(lambda: self.replies, 5, what="the squatter's first register")

    def close(self) -> list[str]:
        self.stop.set()
        self.thread.join(10)
        return self.replies


def registers(runner, port: int) -> bool:
    try:
        runner.register(port)
    except AssertionError:
        return False
    return True


def runners_of(port: int) -> list[tuple[str, str]]:
    state = json.loads(ask(port, "state", security=key_security("viewer", "v")).body)
    return [(r["address"], r["name"]) for r in state["runners"]]


def test_a_stolen_runner_key_cannot_hold_another_runners_address(cluster, tmp_path,
                                                                 keyed_runners):
    """A key registers an address only where a ping signed with that key is
    answered: re-registering r2's stolen key at r1's address every 0.2 s
    used to hold it (each register reset the missed pings r1's refusals
    counted), so r1 was refused for as long as the thief kept going."""
    disp = cluster.start_dispatcher("--secret-file", write_secret(tmp_path / "master", MASTER))
    port = cluster.dispatcher_port
    r1, = keyed_runners("r1")
    address = f"{LOOPBACK}:{r1.port}"
    thief = Squatter(port, "r2", address, "thief")
    try:
        wait_until(lambda: registers(r1, port), 3, interval=0.2, what="r1 registered")
        assert runners_of(port) == [(address, "r1")]
        assert ask(port, "dispatch", C1,
                   security=key_security("observer", "o")).argument == "queued 1"
        wait_until(lambda: r1.token(C1), 5, what="r1 given the commit")
    finally:
        replies = thief.close()
    # Refused with the reason, then (at once again) told to wait a ping interval.
    assert replies[0].startswith(f"error:{address} answered a ping for runner r2 with "
                                 "another key"), replies
    assert all(r.startswith((f"error:{address} answered a ping for runner r2 with another "
                             "key", "busy:a ping for runner r2 is under way or failed"))
               for r in replies), replies
    assert runners_of(port) == [(address, "r1")]
    # r1 refused the pings signed with r2's key, and was never given them as work.
    assert r1.token(C1) and r1.count(C1) == 1
    assert any("answered a ping for runner r2 with another key" in w for w in warnings(disp))


def squatted(cluster, tmp_path, keyed_runners, *flags):
    """A dispatcher (with ``flags``) where r2 proved an address of its own
    and left it to r1 (not registered yet), while a thief holding r2's key
    heartbeats there as r2: (dispatcher, its port, the address, r1, thief)."""
    disp = cluster.start_dispatcher("--secret-file", write_secret(tmp_path / "master", MASTER),
                                    *flags)
    port = cluster.dispatcher_port
    stolen, = keyed_runners("r2")
    stolen.register(port)
    address = f"{LOOPBACK}:{stolen.port}"
    stolen.close()
    r1, = keyed_runners("r1", port=stolen.port)
    return disp, port, address, r1, Squatter(port, "r2", address, stolen.instance)


def test_an_address_whose_pings_fail_authentication_is_dropped_at_once(cluster, tmp_path,
                                                                      keyed_runners):
    """The thief proved an address of its own, then left it to r1 and
    heartbeats on: the first ping answered with another key drops the entry
    (not ``--ping-misses`` timeouts, which its heartbeats used to reset),
    and the address is not its again."""
    disp, port, address, r1, thief = squatted(cluster, tmp_path, keyed_runners,
                                              "--ping-interval", "0.2", "--ping-misses", "1000")
    try:
        wait_until(lambda: runners_of(port) == [], 3, interval=0.1,
                   what="the entry whose pings fail authentication dropped")
        assert any(f"runner {address} answered a ping with another key; dropped" in w
                   for w in warnings(disp))
        wait_until(lambda: len(thief.replies) >= 3 and not thief.replies[-1].startswith("ok:"),
                   3, what="the thief's next registers")
        assert runners_of(port) == []
        r1.register(port)
        assert runners_of(port) == [(address, "r1")]
    finally:
        thief.close()


def test_a_runner_takes_over_its_address_from_an_entry_of_another_key(cluster, tmp_path,
                                                                     keyed_runners):
    """A runner started where an entry of another key still stands (its
    pings, not yet sent, would fail authentication) registers at once: the
    ping signed with its own key proves the address is now its."""
    disp, port, address, r1, thief = squatted(cluster, tmp_path, keyed_runners,
                                              "--ping-interval", "60")
    try:
        r1.register(port)
        assert runners_of(port) == [(address, "r1")]
        assert any(f"runner r1 answers at {address}" in line for line in disp.log().splitlines())
        wait_until(lambda: not thief.replies[-1].startswith("ok:"), 3,
                   what="the thief's next register")
        assert runners_of(port) == [(address, "r1")]
    finally:
        thief.close()


def test_only_a_reply_of_another_key_is_unauthentic():
    """What drops a runner at once: its port answered with another key, or
    refused the key unsigned.  A connection-limit ``busy`` is unsigned too
    (sent before the request was read), but says only that the runner is
    flooded, by strangers maybe: a miss, as before, or a flood would drop
    it.  Whoever sends it, it can make a runner look slow, never gone."""
    own = key_security("runner", "r1")
    server = helpers.MessageServer((LOOPBACK, 0), {"ping": lambda m, p: Message("ok", "pong")},
                                   own, max_connections=1)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    address = (LOOPBACK, server.server_address[1])

    def ping(security):
        """The reply, or the error, once the last call's slot is free again."""
        def settled():
            try:
                return helpers.call(address, "ping", security=security, timeout=5)
            except ProtocolError as exc:
                return None if "server busy" in str(exc) else exc
        return wait_until(settled, 5, what="the one slot free")
    try:
        assert ping(own).argument == "pong"
        refused = ping(key_security("runner", "r2"))
        assert isinstance(refused, Unauthentic) and "unsigned message refused" in str(refused) \
            and "unknown or revoked key 'runner:r2'" in str(refused), refused
        # Its key id, another master's key: signed, but not with r1's key.
        forged = ping(key_security("runner", "r1", b"another master"))
        assert isinstance(forged, Unauthentic) and "bad signature" in str(forged), forged
        held: list[socket.socket] = []   # an idle connection that takes the one slot

        def refused_as_busy():
            for sock in [s for s in held if select.select([s], [], [], 0)[0]]:
                held.remove(sock)   # itself refused (a slot not yet given back)
                sock.close()
            if not held:
                held.append(socket.create_connection(address, timeout=5))
            try:
                helpers.call(address, "ping", security=own, timeout=5)
            except ProtocolError as exc:
                return exc
            return None
        try:
            exc = wait_until(refused_as_busy, 5, what="the connection-limit refusal")
        finally:
            for sock in held:
                sock.close()
        assert "server busy" in str(exc) and not isinstance(exc, Unauthentic), exc
    finally:
        server.shutdown()
        thread.join(5)
        server.server_close()
