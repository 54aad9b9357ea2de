"""The cluster spread over separate network stacks: the dispatcher (with
the observer) and each runner live in network namespaces of their own,
joined by veth links to a bridge, so a link can be cut like a cable.

Everything here is created by the test inside namespaces it owns and is
removed in a finaliser; nothing touches the host's own network.  The
upstream repository is a local path all namespaces share.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import subprocess

import pytest

from support.cluster import PY, ROOT, Daemon, wait_until
from support.faults import commit_fault
from ci.wire import decode_fields


SUBNET = "10.77.0"
DISPATCHER_IP = f"{SUBNET}.1"
RUNNER_PORT = 9100
_names = itertools.count(1)


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def must(*args: str) -> None:
    proc = ip(*args)
    assert proc.returncode == 0, f"ip {' '.join(args)}: {proc.stderr.strip()}"


class Network:
    """A dispatcher namespace with a bridge, and one namespace per runner
    linked to it by a veth pair (``eth0`` in the runner, ``p<i>`` on the
    bridge).  Names carry our PID so parallel runs never collide."""

    def __init__(self, runners: int):
        tag = f"ci{os.getpid()}n{next(_names)}"
        self.dispatcher = f"{tag}d"
        self.runners = [f"{tag}r{i}" for i in range(1, runners + 1)]
        self.created: list[str] = []

    def create(self) -> None:
        for ns in [self.dispatcher, *self.runners]:
            proc = ip("netns", "add", ns)
            if proc.returncode:
                if not self.created:
                    pytest.skip(f"cannot create network namespaces here: {proc.stderr.strip()}")
                raise AssertionError(f"ip netns add {ns}: {proc.stderr.strip()}")
            self.created.append(ns)
            must("-n", ns, "link", "set", "lo", "up")
        d = self.dispatcher
        must("-n", d, "link", "add", "br0", "type", "bridge")
        must("-n", d, "addr", "add", f"{DISPATCHER_IP}/24", "dev", "br0")
        must("-n", d, "link", "set", "br0", "up")
        for i, ns in enumerate(self.runners, 1):
            must("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}",
                 "netns", d)
            must("-n", d, "link", "set", f"p{i}", "master", "br0")
            must("-n", d, "link", "set", f"p{i}", "up")
            must("-n", ns, "addr", "add", f"{self.runner_ip(i)}/24", "dev", "eth0")
            must("-n", ns, "link", "set", "eth0", "up")

    @staticmethod
    def runner_ip(i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def set_link(self, i: int, state: str) -> None:
        """Pull (``down``) or plug back (``up``) runner ``i``'s cable."""
        must("-n", self.runners[i - 1], "link", "set", "eth0", state)

    def destroy(self) -> None:
        # Deleting a namespace removes the veth ends and the bridge in it.
        for ns in reversed(self.created):
            ip("netns", "del", ns)
        self.created.clear()


@pytest.fixture
def network(cluster):
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 ('ip') is not installed")
    net = Network(runners=2)
    try:
        net.create()
        yield net
    finally:
        # Processes first: a namespace lives on while anything runs in it.
        cluster.close()
        net.destroy()


def start_in(cluster, ns: str, name: str, script: str, args: list[str], env=None) -> Daemon:
    """Start a daemon inside namespace ``ns``.  ``ip netns exec`` execs the
    command in place, so the PID is the daemon's own and the cluster's
    finaliser ends it by PID like any other."""
    log_path = str(cluster.tmp / f"{len(cluster.daemons) + 1:02d}-{name}.log")
    daemon = Daemon(name, ["ip", "netns", "exec", ns, PY, os.path.join(ROOT, script), *args],
                    log_path, str(cluster.tmp), env or cluster.env)
    cluster.daemons.append(daemon)
    return daemon


def wait_for_log(daemon: Daemon, text: str, timeout: float = 15, count: int = 1) -> None:
    def seen():
        if not daemon.alive():
            raise AssertionError(f"{daemon.name} exited:\n{daemon.log()}")
        return daemon.log().count(text) >= count
    wait_until(seen, timeout, what=f"{text!r} in the {daemon.name} log")


def ns_status(ns: str, port: int, secret_file: str) -> dict:
    """The dispatcher's status, asked from inside namespace ``ns``."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import helpers; "
            "from ci.security import Security, load_credentials; "
            "from ci.wire import parse_address; "
            "sec = Security(secret=load_credentials(sys.argv[3])[0]); "
            "r = helpers.call(parse_address(sys.argv[2]), 'status', security=sec); "
            "sys.stdout.write(r.body.decode())")
    proc = subprocess.run(["ip", "netns", "exec", ns, PY, "-c", code, ROOT,
                           f"{DISPATCHER_IP}:{port}", secret_file],
                          capture_output=True, text=True, timeout=15)
    assert proc.returncode == 0, proc.stderr
    return {k: int(v) for k, v in decode_fields(proc.stdout.encode()).items()}


def runners_of(cluster, commits) -> list[str]:
    return sorted(cluster.result(c, 20)["runner"] for c in commits)


def test_commits_cross_links_and_a_cut_link_loses_nothing(cluster, upstream, network, notes):
    secret = cluster.tmp / "secret"
    secret.write_text(secrets.token_hex(16) + "\n")
    common = ["--secret-file", str(secret), "--log-level", "DEBUG"]
    port = cluster.dispatcher_port
    dispatcher = start_in(cluster, network.dispatcher, "dispatcher", "dispatcher.py", [
        "--host", DISPATCHER_IP, "--port", str(port), "--results-dir", cluster.results,
        "--state-dir", cluster.state, "--ping-interval", "0.5", "--ping-misses", "2",
        "--ping-timeout", "0.5", *common])
    wait_for_log(dispatcher, "dispatcher listening on")
    with open(f"/proc/{dispatcher.pid}/cmdline", "rb") as handle:
        assert b"dispatcher.py" in handle.read(), "ip netns exec did not exec in place"

    runners = {}
    for i, ns in enumerate(network.runners, 1):
        address = f"{network.runner_ip(i)}:{RUNNER_PORT}"
        env = dict(cluster.env, CI_FAULT_DIR=notes.folder, CI_RUNNER_NAME=address)
        runners[address] = start_in(cluster, ns, f"runner{i}", "test_runner.py", [
            "--host", network.runner_ip(i), "--port", str(RUNNER_PORT),
            "--dispatcher-server", f"{DISPATCHER_IP}:{port}", "--heartbeat", "0.5",
            "--retry-max", "0.5", *common, upstream.clone(cluster.tmp / f"runner{i}")], env)
    for address in runners:
        wait_for_log(dispatcher, f"runner {address} registered")
    observer_clone = upstream.clone(cluster.tmp / "observer")
    start_in(cluster, network.dispatcher, "observer", "repo_observer.py", [
        "--no-listen", "--poll", "0.3", "--dispatcher-server", f"{DISPATCHER_IP}:{port}",
        *common, observer_clone])
    first = subprocess.run(["git", "-C", upstream.path, "rev-parse", "HEAD"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert cluster.result(first, 20)["verdict"] == "passed"

    # Two slow commits at once: each runner tests one, across its own link.
    pair = [commit_fault(upstream, f"pair{i}", seconds=0.8) for i in range(2)]
    assert runners_of(cluster, pair) == sorted(runners)

    # Cut the cable of whichever runner takes the slow commit.
    slow = commit_fault(upstream, "cut", seconds=2.0, once=True)
    wait_until(lambda: notes.find("cut"), 15, what="the slow commit to start")
    cut = notes.find("cut")[0][1].split(" ")[0]
    cut_index = list(runners).index(cut) + 1
    other = next(a for a in runners if a != cut)
    network.set_link(cut_index, "down")
    fields = cluster.result(slow, 20)
    assert fields["runner"] == other and fields["verdict"] == "passed"
    assert f"runner {cut} missed" in dispatcher.log()
    before = os.stat(cluster.result_path(slow))

    # Its own run finishes behind the cut and cannot be delivered.
    wait_until(lambda: notes.find("cut", "finished"), 10)
    seen = len(runners[cut].log())
    wait_for_log(runners[cut], "unreachable", count=runners[cut].log().count("unreachable") + 1)
    assert "delivered" not in runners[cut].log()[seen:]
    network.set_link(cut_index, "up")
    wait_for_log(dispatcher, f"duplicate result for {slow[:12]} from {cut}")
    after = os.stat(cluster.result_path(slow))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert cluster.result(slow)["runner"] == other
    assert dispatcher.log().count(f"result for {slow[:12]}: ") == 1

    # Back on the network, it registers again and gets work again.
    wait_for_log(dispatcher, f"runner {cut} registered", count=2)
    wait_until(lambda: ns_status(network.dispatcher, port, str(secret))["idle_runners"] == 2,
               10, interval=0.2, what="both runners to be idle")
    later = [commit_fault(upstream, f"later{i}", seconds=0.8) for i in range(2)]
    assert runners_of(cluster, later) == sorted(runners)
    assert sorted(cluster.result_files()) == sorted([first, *pair, slow, *later])
    assert all(r.alive() for r in runners.values())
