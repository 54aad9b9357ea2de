"""Security of the live daemons: hostile input, forged and replayed
messages, resource exhaustion, unsafe defaults, confusing test output, and
mutual TLS -- each checked against real processes, and each checking that
nothing changed that should not have (no state, no file, no job)."""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

import helpers
from ci import results
from support.cluster import PY, ROOT, free_port, git, send_raw, send_slowly, wait_until
from support.tls import client_context, make_ca, make_role_certs
from ci.security import Security, make_tls_contexts
from ci.wire import (Limits, Message, ProtocolError, decode_fields, decode_header, decode_message,
    encode_frame, encode_message, read_frame, request, valid_commit, valid_full_commit,
    verify_frame)

SECRET = b"s3cret shared by the test cluster"
LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------------
# Small tools.

def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, half-close, return everything sent back until EOF."""
    chunks = []
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
    return b"".join(chunks)


def ask(port: int, payload: bytes, secret: bytes | None = None, *,
        frame: bytes | None = None) -> Message:
    """Send one raw request (``frame``, else ``payload`` unsigned) and return
    the reply, checking that the reply itself is authentic for ``secret``."""
    frame = frame or encode_frame(payload)
    nonce = frame.split(b"\n", 1)[0].split(b" ")[3].decode()
    raw = exchange(port, frame)
    assert raw, "no reply at all"
    line, _, body = raw.partition(b"\n")
    header = decode_header(line)
    assert header.length == len(body)
    verify_frame(header, body, secret, reply_to=nonce)
    return decode_message(body)


def answer(address, command: str) -> Message | None:
    """The reply, or None when the server closed first: a server over its
    connection cap answers ``busy`` and closes without reading the request,
    and the reset that this causes may reach the client before the reply."""
    try:
        return helpers.call(address, command, timeout=5)
    except (OSError, ProtocolError):
        return None


def status(cluster, security: Security | None = None) -> dict:
    reply = helpers.call((LOOPBACK, cluster.dispatcher_port), "status", security=security)
    assert reply.command == "ok", reply
    return {key: int(value) for key, value in decode_fields(reply.body).items()}


def runner_busy(runner, security: Security | None = None) -> str:
    reply = helpers.call((LOOPBACK, runner.port), "ping", security=security)
    assert (reply.command, reply.argument) == ("ok", "pong"), reply
    return decode_fields(reply.body)["busy"]


def files_under(root) -> set[str]:
    return {os.path.relpath(os.path.join(folder, name), root)
            for folder, _dirs, names in os.walk(root) for name in names}


def markers_under(root) -> list[str]:
    return [path for path in files_under(root) if "MARKER" in os.path.basename(path)]


def markers_outside(tmp_path) -> set[str]:
    """Where a path-like id such as ``/tmp/MARKER`` or ``../../../tmp/MARKER``
    could land outside the test's folder, if it were used as a path."""
    places = ["/tmp", ROOT, os.getcwd(), tmp_path.parent, tmp_path.parent.parent,
              os.path.join(tmp_path.parent, "tmp"), os.path.join(tmp_path.parent.parent, "tmp")]
    return {str(place) for place in places if os.path.exists(os.path.join(place, "MARKER"))}


def secret_file(tmp_path, secret: bytes = SECRET) -> str:
    path = tmp_path / "secret"
    path.write_bytes(secret + b"\n")
    path.chmod(0o600)
    return str(path)


# --------------------------------------------------------------------------
# Slow and idle peers, and too many of them.

def _time_to_close(port: int, chunks: list[bytes], gap: float, out: dict, key: str) -> None:
    out[key] = send_slowly(port, chunks, gap)


def test_idle_and_dribbling_connections_are_closed_after_read_timeout(cluster):
    disp = cluster.start_dispatcher("--read-timeout", "1")
    runner = cluster.start_runner("--read-timeout", "1")
    header = b"CI1 60 %.3f abcdef12 -\n" % time.time()
    cases = {
        "idle": [],
        "dribbled header": [bytes([b]) for b in header],
        "dribbled body": [header] + [b"x"] * 60,
    }
    out: dict = {}
    threads = [threading.Thread(target=_time_to_close, args=(port, chunks, 0.15, out,
                                                             f"{name} {port}"))
               for port in (cluster.dispatcher_port, runner.port)
               for name, chunks in cases.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert len(out) == 6, out
    for key, (answered, closed, raw) in out.items():
        # Refused at the deadline, not after the last dribbled byte (5-9 s),
        # and closed soon after (the server may drain briefly so the reply
        # is not lost to a reset); slack for a busy machine.
        assert answered is not None and 0.8 < answered < 4.0, (key, answered)
        assert closed < 5.0, (key, closed)
        line, _, payload = raw.partition(b"\n")
        assert decode_message(payload) == Message("error", "timed out reading message")
    assert disp.alive() and runner.alive()
    assert status(cluster)["runners"] == 1


def hold_every_slot(address, count: int, busy: Message) -> list[socket.socket]:
    """``count`` idle connections that each hold one of the server's slots.
    The start-up port probe may still hold a slot when the first arrive:
    one refused then (told busy at once) is replaced, until none of ours
    was refused."""
    held: list[socket.socket] = []
    try:
        for _ in range(10):
            held += [socket.create_connection(address, timeout=5)
                     for _ in range(count - len(held))]
            # Or one of ours was refused while the probe's slot was still
            # being freed: then the status call finds a slot of its own.
            wait_until(lambda: answer(address, "status") == busy
                       or select.select(held, [], [], 0)[0], 10,
                       what=f"{count} idle connections to fill every slot")
            # Accepted in order: each of ours was given a slot or refused
            # (a reply already waiting) before that status call.
            refused = [s for s in held if select.select([s], [], [], 0)[0]]
            if not refused:
                return held
            for sock in refused:
                held.remove(sock)
                sock.close()
        raise AssertionError("some slot stayed taken by something else")
    except BaseException:
        for sock in held:
            sock.close()
        raise


def test_connection_flood_beyond_the_limit_is_refused_then_served(cluster):
    cluster.start_dispatcher("--max-connections", "4", "--max-per-client", "4",
                             "--read-timeout", "30")
    address = (LOOPBACK, cluster.dispatcher_port)
    busy = Message("busy", "server busy, try later")
    holders = hold_every_slot(address, 4, busy)
    extra = []
    try:
        # A flood of further idle connections: each is told why and closed.
        extra = [socket.create_connection(address, timeout=5) for _ in range(40)]
        for sock in extra:
            raw = b""
            while chunk := sock.recv(4096):
                raw += chunk
            line, _, payload = raw.partition(b"\n")
            assert decode_header(line).length == len(payload)
            assert decode_message(payload) == busy
        assert answer(address, "status") in (busy, None)
    finally:
        for sock in holders + extra:
            sock.close()
    # The counts come from the reply that said "ok": a second call at once
    # could still meet a slot whose handler has replied but not yet let go.
    served = wait_until(lambda: (reply := answer(address, "status")) is not None
                        and reply.command == "ok" and reply, 10,
                        what="the dispatcher to serve again once the idle peers left")
    assert decode_fields(served.body)["queued"] == "0"


def answer_from(address, source: str, command: str) -> Message | None:
    """Like ``answer``, from the loopback address ``source`` (all of
    127/8 is loopback on Linux)."""
    try:
        with socket.create_connection(address, timeout=5,
                                      source_address=(source, 0)) as sock:
            return request(sock, command, limits=Limits(timeout=5))
    except (OSError, ProtocolError):
        return None


def test_one_address_cannot_take_every_slot(cluster):
    """Issue 17: the cap was global, so one address holding idle
    connections shut everyone out; by default it gets half the slots."""
    cluster.start_dispatcher("--max-connections", "6", "--read-timeout", "30")
    address = (LOOPBACK, cluster.dispatcher_port)
    busy = Message("busy", "server busy, try later")
    held: list[socket.socket] = []
    try:
        # Exactly the per-client limit (half of 6) of idle connections the
        # dispatcher really holds: one it refused (a probe's or a finished
        # request's slot was not yet given back) is answered busy and
        # closed, so it is replaced until all three are held.
        def three_held_and_busy() -> bool:
            for sock in [s for s in held if select.select([s], [], [], 0)[0]]:
                held.remove(sock)           # refused: a busy reply, then EOF
                sock.close()
            while len(held) < 3:
                held.append(socket.create_connection(address, timeout=5,
                                                     source_address=("127.0.0.1", 0)))
            return answer_from(address, "127.0.0.1", "status") == busy and \
                not select.select(held, [], [], 0.2)[0]
        wait_until(three_held_and_busy, 15, what="three connections held, 127.0.0.1 busy")
        assert answer_from(address, "127.0.0.1", "status") == busy
        reply = answer_from(address, "127.0.0.2", "status")
        assert reply is not None and reply.command == "ok", reply
    finally:
        for sock in held:
            sock.close()
    assert "per-client limit (3) reached for 127.0.0.1" in cluster.daemons[0].log()


# --------------------------------------------------------------------------
# Injection: ids from the network are never paths or shell words.

INJECTIONS = [b"$(touch MARKER)", b";touch MARKER", b"`touch MARKER`", b"| touch MARKER",
              b"&& touch MARKER", b"../../../tmp/MARKER", b"/tmp/MARKER", b"../", b"/",
              b"a" * 40 + b";touch MARKER", b"a" * 40 + b" $(touch MARKER)",
              b"a" * 40 + b"/../MARKER", b"a" * 20 + b"\x00" + b"a" * 19,
              b"a" * 40 + b"\x00", b"a" * 20 + b"\n" + b"a" * 20, b"a" * 39, b"a" * 41,
              b"a" * 65, b"a" * 5000, b"a" * 100_000, b"A" * 40, b"-" + b"a" * 39,
              b"--upload-pack=touch MARKER", b"\xc3\xa9" * 20, b"a" * 40 + b"\r", b" ", b""]


def _well_formed(command: bytes, argument: bytes) -> bool:
    """Some combinations of INJECTIONS make a valid request (a newline
    starts the body, ``aaa...`` is a fine job id); those are skipped."""
    line = argument.split(b"\n", 1)[0].decode("latin-1")
    if not (line.isascii() and line.isprintable()):
        return False
    parts = line.split(" ")
    if command == b"dispatch":
        return bool(line.split()) and all(valid_full_commit(c) for c in line.split())
    check = valid_full_commit if command == b"results" else valid_commit
    return len(parts) == 2 and check(parts[0]) and re.fullmatch("[0-9a-f]{16,64}", parts[1])


def _injection_cluster(cluster):
    cluster.start_dispatcher()
    runner = cluster.start_runner()
    wait_until(lambda: status(cluster)["runners"] == 1, 10, what="runner registered")
    return runner


def _assert_nothing_happened(cluster, tmp_path, before: set[str], outside: set[str],
                             runner=None):
    assert markers_under(tmp_path) == [] and markers_outside(tmp_path) <= outside
    logs = {path for path in files_under(tmp_path) if path.endswith(".log")}
    assert files_under(tmp_path) - logs == before - logs
    assert cluster.result_files() == []
    state = status(cluster)
    assert (state["queued"], state["running"], state["done"]) == (0, 0, 0)
    with open(os.path.join(cluster.state, "journal"), "rb") as handle:
        assert handle.read() == b""
    if runner is not None:
        assert runner_busy(runner) == ""
        assert " accepted " not in runner.log()


def test_dispatch_and_results_with_hostile_ids_are_refused(cluster, upstream, tmp_path):
    runner = _injection_cluster(cluster)
    real = upstream.commit().encode()
    before, outside = files_under(tmp_path), markers_outside(tmp_path)
    body = b"\nverdict: passed\nrunner: x\n\nout\n"
    for bad in INJECTIONS + [real + b" " + b"a" * 39, real + b" $(touch MARKER)"]:
        assert not _well_formed(b"dispatch", bad)
        reply = ask(cluster.dispatcher_port, b"dispatch:" + bad)
        assert reply.command == "error", (bad, reply)
        for argument in (bad + b" 1", real + b" " + bad, bad):
            if _well_formed(b"results", argument):
                continue
            reply = ask(cluster.dispatcher_port, b"results:" + argument + body)
            assert reply.command == "error", (argument, reply)
    # A refusal that quotes non-ASCII input still reaches the client.
    reply = ask(cluster.dispatcher_port,
                b"results:" + real + b" " + b"a" * 32 + b"\nv\xc3\xa9rdict: passed\n\nx")
    assert reply.command == "error" and "v\\xe9rdict" in reply.argument, reply
    _assert_nothing_happened(cluster, tmp_path, before, outside, runner)


def test_runtest_with_hostile_ids_is_refused_and_runs_nothing(cluster, upstream, tmp_path):
    runner = _injection_cluster(cluster)
    real = upstream.commit().encode()
    head = git(runner.clone, "rev-parse", "HEAD")
    before, outside = files_under(tmp_path), markers_outside(tmp_path)
    for bad in INJECTIONS:
        for argument in (bad + b" 1", real + b" " + bad, b"abcd " + bad, bad):
            if _well_formed(b"runtest", argument):
                continue
            reply = ask(runner.port, b"runtest:" + argument)
            assert reply.command == "error", (argument, reply)
    _assert_nothing_happened(cluster, tmp_path, before, outside, runner)
    assert git(runner.clone, "rev-parse", "HEAD") == head


@pytest.mark.parametrize("script, argument", [
    ("test_runner_script.sh", "$(touch MARKER)"), ("test_runner_script.sh", "abcd;touch MARKER"),
    ("test_runner_script.sh", "--upload-pack=touch MARKER"), ("test_runner_script.sh", "../.."),
    ("update_repo.sh", "$(touch MARKER)"), ("update_repo.sh", "main;touch MARKER"),
    ("update_repo.sh", "--upload-pack=touch MARKER"), ("update_repo.sh", "../main"),
])
def test_scripts_refuse_hostile_arguments_themselves(upstream, tmp_path, script, argument):
    """The scripts check their input too, in case a future caller forgets."""
    clone = upstream.clone(tmp_path / "clone")
    head = git(clone, "rev-parse", "HEAD")
    before = files_under(tmp_path)
    proc = subprocess.run(["bash", os.path.join(ROOT, script), clone, argument], cwd=tmp_path,
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "invalid" in proc.stderr and proc.stdout == ""
    assert files_under(tmp_path) == before and markers_under(tmp_path) == []
    assert git(clone, "rev-parse", "HEAD") == head


# --------------------------------------------------------------------------
# Authentication: a shared secret signs every message.

def _forgeries(payload: bytes) -> dict[str, bytes]:
    now = time.time()
    return {
        "unsigned": encode_frame(payload),
        "wrong key": encode_frame(payload, b"not the secret"),
        "signed for another payload": encode_frame(payload[:-1] + b"?", SECRET)
        .split(b"\n", 1)[0] + b"\n" + payload,
        "stale": encode_frame(payload, SECRET, now=now - 600),
        "from the future": encode_frame(payload, SECRET, now=now + 600),
    }


REFUSAL = {"unsigned": "unsigned message refused", "wrong key": "bad signature",
           "signed for another payload": "bad signature",
           "stale": "stale message (timestamp outside the window)",
           "from the future": "stale message (timestamp outside the window)"}


def signed_cluster(cluster, tmp_path):
    """A dispatcher and a registered runner sharing SECRET; (flags, security, runner)."""
    secret = ["--secret-file", secret_file(tmp_path)]
    security = Security(secret=SECRET)
    cluster.start_dispatcher(*secret)
    runner = cluster.start_runner(*secret)
    wait_until(lambda: status(cluster, security)["runners"] == 1, 10, what="runner registered")
    return secret, security, runner


def test_unauthentic_messages_are_refused_and_change_nothing(cluster, upstream, tmp_path):
    secret, security, runner = signed_cluster(cluster, tmp_path)
    commit = upstream.commit().encode()
    head = git(runner.clone, "rev-parse", "HEAD")
    fake_runner = f"{LOOPBACK}:{free_port()}".encode()
    requests = [
        (cluster.dispatcher_port, b"dispatch:" + commit),
        (cluster.dispatcher_port, b"results:" + commit + b" 1\nverdict: passed\n\nforged\n"),
        (cluster.dispatcher_port, b"register:" + fake_runner + b"\ninstance: forged\nbusy: \n"),
        (runner.port, b"runtest:" + commit + b" 1"),
        (runner.port, b"ping"),
        (cluster.dispatcher_port, b"status"),
    ]
    for port, payload in requests:
        for kind, frame in _forgeries(payload).items():
            reply = ask(port, payload, SECRET, frame=frame)
            assert reply == Message("error", REFUSAL[kind]), (payload[:20], kind, reply)

    state = status(cluster, security)
    assert (state["queued"], state["running"], state["runners"], state["done"]) == (0, 0, 1, 0)
    assert cluster.result_files() == []
    assert runner_busy(runner, security) == ""
    assert " accepted " not in runner.log()
    assert git(runner.clone, "rev-parse", "HEAD") == head
    # Without the secret even a well-formed client gets only refusals.
    assert helpers.call((LOOPBACK, cluster.dispatcher_port), "status") == \
        Message("error", "unsigned message refused")

    # The same cluster, signing correctly, tests a commit end to end.
    cluster.start_observer(*secret)
    assert cluster.result(commit.decode())["verdict"] == "passed"


def test_replayed_messages_are_refused(cluster, upstream, tmp_path):
    secret, security, runner = signed_cluster(cluster, tmp_path)
    dispatcher = next(d for d in cluster.daemons if d.name == "dispatcher")
    dispatched, posted, run = (upstream.commit() for _ in range(3))

    def twice(port, payload, first):
        frame = encode_frame(payload, SECRET)
        assert ask(port, payload, SECRET, frame=frame) == first
        assert ask(port, payload, SECRET, frame=frame) == Message("error", "replayed message")

    frame = encode_frame(b"ping", SECRET)
    assert ask(runner.port, b"ping", SECRET, frame=frame).argument == "pong"
    assert ask(runner.port, b"ping", SECRET, frame=frame) == \
        Message("error", "replayed message")

    twice(cluster.dispatcher_port,
          f"register:{LOOPBACK}:{free_port()}\ninstance: replay\nbusy: \n".encode(),
          Message("ok", "registered"))
    # Registered once (its log line), not again by the replay.  Not read from
    # ``status``: nothing listens at that address, so the next health sweep
    # may drop it at once.
    log = dispatcher.log()
    assert "registered (2 runners)" in log and "(3 runners)" not in log

    # A result nobody was assigned is refused; sent again, it is a replay.
    results = f"results:{posted} {'9' * 32}\nverdict: failed\nrunner: replay\n\nfirst\n"
    twice(cluster.dispatcher_port, results.encode(),
          Message("error", f"result for {posted[:12]} refused: no such assignment"))
    assert not os.path.exists(cluster.result_path(posted))

    twice(runner.port, f"runtest:{run} {'7' * 32}".encode(), Message("ok"))
    twice(cluster.dispatcher_port, f"dispatch:{dispatched}".encode(), Message("ok", "queued 1"))

    assert cluster.result(dispatched)["verdict"] == "passed"
    # ``run`` was never assigned by the dispatcher: its runner runs it, but
    # the result carries no token the dispatcher handed out.
    wait_until(lambda: f"dispatcher refused result for {run[:12]}" in runner.log(), 20,
               what="the unassigned run's result to be refused")
    assert not os.path.exists(cluster.result_path(run))
    wait_until(lambda: status(cluster, security)["runners"] == 1, 10,
               what="the replayed fake runner to be dropped for missed pings")
    state = status(cluster, security)
    assert (state["queued"], state["running"], state["done"]) == (0, 0, 1)
    assert runner.log().count(" accepted ") == 2  # ``run`` once, ``dispatched`` once


def read_bytes(path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def test_frames_captured_before_a_restart_are_refused_after_it(cluster, upstream, tmp_path):
    """Issue 17: the nonces lived in memory only, so a signed ``retest``
    captured before the dispatcher restarted was accepted again after it
    (within the auth window) and rewrote the result; a runner likewise
    ran a captured ``runtest`` again.  Both survive even a SIGKILL now."""
    secret, security, runner = signed_cluster(cluster, tmp_path)
    commit, run = upstream.commit(), upstream.commit()
    assert helpers.call((LOOPBACK, cluster.dispatcher_port), "dispatch", commit,
                        security=security).argument == "queued 1"
    assert cluster.result(commit)["verdict"] == "passed"
    first = read_bytes(cluster.result_path(commit))
    # Captured: a retest frame built as a client builds it, sent once.
    retest = encode_message("retest", commit)
    captured = encode_frame(retest, SECRET)
    assert ask(cluster.dispatcher_port, retest, SECRET, frame=captured) == \
        Message("ok", "queued 1")
    wait_until(lambda: read_bytes(cluster.result_path(commit)) != first, 30,
               what="the retest's result")
    wait_until(lambda: status(cluster, security)["running"] == 0, 10, what="runner idle")
    cluster.daemons[0].kill()
    cluster.start_dispatcher(*secret)
    wait_until(lambda: status(cluster, security)["runners"] == 1, 10,
               what="runner registered again")
    rewritten = read_bytes(cluster.result_path(commit))
    assert ask(cluster.dispatcher_port, retest, SECRET, frame=captured) == \
        Message("error", "replayed message")
    state = status(cluster, security)
    assert (state["queued"], state["running"]) == (0, 0)
    assert read_bytes(cluster.result_path(commit)) == rewritten
    # An honest client whose clock lags (within --auth-window) is served.
    lagging = encode_frame(b"status", SECRET, now=time.time() - 20)
    assert ask(cluster.dispatcher_port, b"status", SECRET, frame=lagging).command == "ok"

    # The runner: a captured runtest, sent once, then the runner restarted.
    runtest = f"runtest:{run} {'7' * 32}".encode()
    captured = encode_frame(runtest, SECRET)
    assert ask(runner.port, runtest, SECRET, frame=captured) == Message("ok")
    wait_until(lambda: f"dispatcher refused result for {run[:12]}" in runner.log(), 20,
               what="the unassigned run's result to be refused")
    runner.kill()
    again = cluster.start_runner(*secret, port=runner.port, clone=runner.clone)
    assert ask(again.port, runtest, SECRET, frame=captured) == \
        Message("error", "replayed message")
    assert runner_busy(again, security) == "" and " accepted " not in again.log()

    # The observer's notify too (it only wakes a poll, but is signed alike).
    observer = cluster.start_observer(*secret)
    captured = encode_frame(b"notify", SECRET)
    assert ask(observer.port, b"notify", SECRET, frame=captured).command == "ok"
    observer.kill()
    observer = cluster.start_observer(*secret, port=observer.port, clone=observer.clone)
    # Served by the new process (its start-up line is written once it listens).
    wait_until(lambda: "observing " in observer.log(), 15, what="the new observer's start")
    assert ask(observer.port, b"notify", SECRET, frame=captured) == \
        Message("error", "replayed message")


def test_ci_secret_environment_variable_secures_the_cluster(cluster, upstream):
    env = dict(cluster.env, CI_SECRET=SECRET.decode())
    cluster.start_dispatcher(env=env)
    cluster.start_runner(env=env)
    cluster.start_observer(env=env)
    assert ask(cluster.dispatcher_port, b"status", SECRET) == \
        Message("error", "unsigned message refused")
    commit = upstream.commit({"tests/test_env.py":
                              "import os, sys, unittest\n\n"
                              "class TestEnv(unittest.TestCase):\n"
                              "    def test_secret_hidden(self):\n"
                              "        sys.stderr.write('CI_SECRET=%r\\n' % "
                              "os.environ.get('CI_SECRET'))\n"})
    fields = cluster.result(commit)
    assert fields["verdict"] == "passed"
    # The code under test never sees the cluster's secret.
    assert b"CI_SECRET=None" in fields["output"] and SECRET not in fields["output"]


# --------------------------------------------------------------------------
# Safe defaults.

def test_no_secret_on_a_public_address_refuses_to_start(cluster, upstream, tmp_path):
    env = dict(cluster.env)
    clone = upstream.clone(tmp_path / "clone")
    common = ["--host", "0.0.0.0", "--port", str(free_port())]
    commands = {
        "dispatcher": [PY, os.path.join(ROOT, "dispatcher.py"), *common,
                       "--results-dir", str(tmp_path / "r")],
        "runner": [PY, os.path.join(ROOT, "test_runner.py"), *common, clone],
        "observer": [PY, os.path.join(ROOT, "repo_observer.py"), *common, clone],
    }
    for name, command in commands.items():
        proc = subprocess.run(command, capture_output=True, text=True, timeout=15, env=env,
                              cwd=tmp_path, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2, (name, proc.stderr)
        assert "refusing to listen on 0.0.0.0 without a secret" in proc.stderr, proc.stderr
        assert "--insecure" in proc.stderr
    assert not os.path.exists(tmp_path / "r")

    cluster.start_dispatcher("--host", "0.0.0.0", "--insecure")
    assert status(cluster)["queued"] == 0


# --------------------------------------------------------------------------
# Test output is data, never protocol or header.

NOISY_FAILING_TEST = r'''import sys
import unittest

OTHER = b"%s"


class TestNoisy(unittest.TestCase):
    def test_noisy_and_wrong(self):
        out = sys.stderr.buffer
        out.write(b"verdict: passed\n\nverdict: passed\nfailures: 0\ntests: 99\n\n")
        out.write(b"CI1 64 1700000000.000 abcdef12 -\nresults:" + OTHER + b" 1\n")
        out.write(b"dispatch:" + OTHER + b"\nregister:127.0.0.1:1\nok:stored\nerror:x\n")
        out.write(b"invalid utf-8: \xff\xfe\x80\xc3\x28 end\n")
        out.write(b"Ran 7 tests in 0.001s\n\nOK\n")
        out.write(b"L" * 1000000 + b"\n")
        out.flush()
        self.assertEqual(1, 2)
'''


def test_test_output_cannot_confuse_dispatcher_or_result_header(cluster, upstream):
    cluster.start_dispatcher()
    cluster.start_runner()
    cluster.start_observer()
    other = "f" * 40
    commit = upstream.commit({"tests/test_noisy.py": NOISY_FAILING_TEST % other.encode()})
    fields = cluster.result(commit)
    assert fields["commit"] == commit
    assert fields["verdict"] == "failed"
    assert (fields["tests"], fields["failures"], fields["errors"]) == ("2", "1", "0")
    assert set(fields) <= set(results.RESULT_FIELDS) | {"output"}
    output = fields["output"]
    assert b"\n" + b"L" * 1000000 + b"\n" in output
    assert b"\xff\xfe\x80\xc3\x28" in output
    assert b"verdict: passed\n\nverdict: passed" in output
    assert b"FAILED (failures=1)" in output
    # The command-like lines were never taken for requests.
    assert other not in cluster.result_files()
    state = status(cluster)
    assert (state["queued"], state["running"]) == (0, 0)


BIG_OUTPUT_TEST = r'''import sys
import unittest


class TestBig(unittest.TestCase):
    def test_big(self):
        out = sys.stderr
        out.write("HEAD-OF-OUTPUT\n")
        for number in range(40000):
            out.write("filler line %06d ........................................\n" % number)
        out.write("TAIL-OF-OUTPUT\n")
        out.flush()
'''


def test_output_over_max_message_size_is_truncated_with_a_marker(cluster, upstream):
    limit = 200_000
    cluster.start_dispatcher("--max-message-size", str(limit))
    runner = cluster.start_runner("--max-message-size", str(limit))
    cluster.start_observer()
    commit = upstream.commit({"tests/test_big.py": BIG_OUTPUT_TEST})
    fields = cluster.result(commit)
    output = fields["output"]
    assert fields["verdict"] == "passed" and fields["tests"] == "2"
    assert len(output) < limit
    assert output.startswith(b"HEAD-OF-OUTPUT\n") or b"\nHEAD-OF-OUTPUT\n" in output[:1000]
    assert b"output truncated by the runner" in output
    assert b"TAIL-OF-OUTPUT\n" in output and b"Ran 2 tests" in output[-2000:]
    assert b"filler line 000000" in output and b"filler line 039999" in output
    assert b"filler line 020000" not in output
    assert "refused result" not in runner.log()


# --------------------------------------------------------------------------
# Mutual TLS.

@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mutual_tls_cluster_works_and_refuses_strangers(cluster, upstream, tmp_path):
    certs = make_role_certs(tmp_path / "tls", ["dispatcher", "runner-r1", "observer"], "ours")
    ours = {"cert": certs["dispatcher"][1], "key": certs["dispatcher"][3],
            "ca": certs["dispatcher"][5]}
    theirs = make_ca(tmp_path / "tls", "theirs")
    disp = cluster.start_dispatcher(*certs["dispatcher"], "--read-timeout", "1")
    cluster.start_runner(*certs["runner-r1"])
    cluster.start_observer(*certs["observer"])
    commit = upstream.commit({"README": "over TLS\n"})
    assert cluster.result(commit)["verdict"] == "passed"

    address = (LOOPBACK, cluster.dispatcher_port)
    stranger_commit = "ab" * 20
    strangers = {
        "plain TCP": Security(),
        "certificate from another CA": Security(client_tls=client_context(
            theirs["cert"], theirs["key"], ours["ca"])),
        "no client certificate": Security(client_tls=client_context(ca=ours["ca"])),
        "another CA altogether": Security(client_tls=client_context(
            theirs["cert"], theirs["key"], theirs["ca"])),
    }
    for name, security in strangers.items():
        try:
            reply = helpers.call(address, "dispatch", stranger_commit, security=security,
                                 timeout=3)
        except (OSError, ProtocolError):
            continue
        # Only the plain client can read an answer at all: the reason.
        assert name == "plain TCP" and reply.command == "error", (name, reply)
    # A plain client is told, in plain text, what is wrong.
    said = exchange(cluster.dispatcher_port, encode_frame(b"status"), timeout=5)
    assert b"this port speaks TLS" in said
    assert "plain-text request on the TLS port" in disp.log()

    # A handshake dribbled a byte at a time is cut off at the read timeout.
    bio_in, bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello = client_context(ca=ours["ca"]).wrap_bio(bio_in, bio_out)
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    out: dict = {}
    _time_to_close(cluster.dispatcher_port, [bytes([b]) for b in bio_out.read()], 0.1, out,
                   "hello")
    assert 0.8 < out["hello"][1] < 5.0, out

    member = Security(client_tls=make_tls_contexts(
        certs["observer"][1], certs["observer"][3], ours["ca"])[1])
    state = status(cluster, member)
    assert (state["queued"], state["running"], state["runners"]) == (0, 0, 1)
    assert stranger_commit not in cluster.result_files()
    assert disp.alive()


# --------------------------------------------------------------------------
# The client side: replies are authenticated too.

def _one_shot_server(reply_for):
    """A listener that answers one request with ``reply_for(nonce)``."""
    listener = socket.create_server((LOOPBACK, 0))
    listener.settimeout(10)

    def serve():
        with listener:
            conn, _ = listener.accept()
            with conn:
                header, _payload = read_frame(conn, timeout=5)
                conn.sendall(reply_for(header.nonce))
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname(), thread


@pytest.mark.parametrize("reply_for, error", [
    (lambda nonce: encode_frame(b"ok"), "unsigned message refused"),
    (lambda nonce: encode_frame(b"ok", b"other key", reply_to=nonce), "bad signature"),
    # A genuine reply, but to some other request: replaying it is useless.
    (lambda nonce: encode_frame(b"ok", SECRET, reply_to="0" * 24), "bad signature"),
    (lambda nonce: encode_frame(b"ok", SECRET, reply_to=nonce, now=time.time() - 600),
     "stale message"),
])
def test_client_refuses_unauthentic_replies(reply_for, error):
    address, thread = _one_shot_server(reply_for)
    with pytest.raises(ProtocolError, match=error):
        helpers.call(address, "status", security=Security(secret=SECRET), timeout=5)
    thread.join(5)


def test_client_accepts_a_genuine_reply():
    address, thread = _one_shot_server(
        lambda nonce: encode_frame(b"ok:fine", SECRET, reply_to=nonce))
    reply = helpers.call(address, "status", security=Security(secret=SECRET), timeout=5)
    assert reply == Message("ok", "fine")
    thread.join(5)


def test_headers_that_claim_big_bodies_hold_nothing_and_busy_is_signed(cluster, tmp_path):
    """The budget was taken for the length a header claims: four unsigned
    headers claiming the largest message, then silence, had every signed
    request refused ``busy`` (unsigned: a client could not tell it from a
    stranger's word, and the dispatcher counted a runner's as a missed ping)
    until they timed out.  Now only the bytes that came are held, and a
    ``busy`` is signed with the key and nonce the request names."""
    cluster.start_dispatcher("--secret-file", secret_file(tmp_path), "--max-message-size",
                             "600000", "--max-buffered", "1200000", "--read-timeout", "5")
    port = cluster.dispatcher_port
    signed = Security(secret=SECRET)
    claims = []
    try:
        for _ in range(4):
            sock = socket.create_connection((LOOPBACK, port), timeout=5)
            sock.sendall(b"CI1 600000 %.3f abcdef12 -\n" % time.time())
            claims.append(sock)
        reply = helpers.call((LOOPBACK, port), "status", body=b"x" * 500000, security=signed,
                             timeout=5)
        assert reply.command == "ok", reply
        # What came is held: 590 kB sent of a claimed 600 kB, and one
        # address holds half the budget at most (a whole message always),
        # so another 500 kB from here is refused, with a signed ``busy``.
        def open_holder():
            holder = socket.create_connection((LOOPBACK, port), timeout=5)
            claims.append(holder)
            holder.sendall(b"CI1 600000 %.3f abcdef12 -\nresults:" % time.time()
                           + b"x" * 590000)
            return holder
        holders = [open_holder()]

        def signed_busy() -> bool:
            # A probe whose bytes were counted first had the holder refused
            # (it has a reply waiting): it is replaced, and the probe tries again.
            if select.select([holders[0]], [], [], 0)[0]:
                holders[0] = open_holder()
                return False
            return helpers.call((LOOPBACK, port), "status", body=b"x" * 500000,
                                security=signed, timeout=5).command == "busy"
        wait_until(signed_busy, 10, what="a signed busy while 590 kB are held")
    finally:
        for sock in claims:
            sock.close()


def test_bytes_in_flight_are_capped_across_connections(cluster):
    """Many large messages at once cannot exhaust memory: beyond
    --max-buffered a sender is told ``busy`` and nothing changes."""
    cluster.start_dispatcher("--max-message-size", "600000", "--max-buffered", "1000000",
                             "--read-timeout", "5")
    port = cluster.dispatcher_port
    def open_holder():
        # Claims 600 kB and sends all but the last 10 kB: the budget holds
        # what came (a claim alone holds nothing, see the next test).
        sock = socket.create_connection((LOOPBACK, port), timeout=5)
        sock.sendall(b"CI1 600000 %.3f abcdef12 -\nresults:" % time.time() + b"x" * 590000)
        return sock

    def reply_to(payload):
        raw = send_raw(port, encode_frame(payload))
        return decode_message(raw.partition(b"\n")[2]) if raw else None

    big_status = b"status\n" + b"x" * 500000
    holders = [open_holder()]

    def probe_refused() -> bool:
        # A harmless large request probes for the moment the holder's bytes
        # are counted (its handler thread may start late on a busy machine).
        # If a probe's thread ran first, the holder was the one refused (it
        # has a reply waiting): it is replaced, and the probe tries again.
        if select.select([holders[0]], [], [], 0)[0]:
            holders[0].close()
            holders[0] = open_holder()
            return False
        return (reply_to(big_status) or Message("none")).command == "busy"

    try:
        wait_until(probe_refused, 10, what="a second large message to be refused as busy")
        answer = reply_to(b"dispatch:" + b"a" * 40 + b"\n" + b"x" * 500000)
        assert answer is None or answer.command == "busy"
        # Nothing was queued; small messages still fit.
        assert status(cluster)["queued"] == 0
    finally:
        holders[0].close()
    # Once the holder is gone the room is back.
    wait_until(lambda: (reply_to(big_status) or Message("none")).command == "ok", 10,
               what="the budget to be given back")
