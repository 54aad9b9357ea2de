"""The land queue in a real observer process: asked with
``repo_observer.py land`` (and refused with the reason), merges built and
published to a real bare upstream, the target moved by a lease push,
the snapshot and events sent; the observer killed with SIGKILL while
entries are in flight loses nothing and lands nothing twice.

The dispatcher is an in-test stand-in serving ``dispatch``, ``verdicts``,
``queue-state`` and ``queue-event`` as docs/protocol.md describes them,
so each of the observer's decisions can be steered; the whole real system
is tested in test_merge_queue_system.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading

import pytest

import helpers
from ci.git import run_git
from ci import auth
from ci.security import Security
from ci.wire import Message, decode_fields
from support.cluster import PY, ROOT, ThreadedServer, git, wait_until


class QueueDispatcher(ThreadedServer):
    """Answers as the dispatcher would; judges a dispatched merge commit
    by its files (in the bare upstream, where the observer published it)
    once ``release`` says so."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.dispatched: list[str] = []
        self.states: list[dict] = []
        self.events: list[dict] = []
        self.released = threading.Event()
        self.released.set()
        super().__init__({"dispatch": self.dispatch, "verdicts": self.verdicts,
                          "queue-state": self.queue_state, "queue-event": self.queue_event,
                          "prefetch": lambda m, p: Message("ok")})

    def dispatch(self, message, peer):
        with self.lock:
            self.dispatched.extend(message.body.decode().splitlines())
        return Message("ok", "queued")

    def merges(self) -> list[list[str]]:
        with self.lock:
            return [line.split() for line in self.dispatched if " merge=" in line]

    def verdicts(self, message, peer):
        known = {line[0] for line in self.merges()}
        lines = []
        for commit in message.argument.split():
            if commit not in known:
                lines.append(f"{commit} unknown -")
            elif not self.released.is_set():
                lines.append(f"{commit} running -")
            else:
                files = run_git(self.upstream, "ls-tree", "-r", "--name-only", commit).split()
                bad = "a.txt" in files and "b.txt" in files
                lines.append(f"{commit} failed 1 failure: t.T.test_ab" if bad else
                             f"{commit} passed -")
        return Message("ok", "", ("\n".join(lines) + "\n").encode())

    def queue_state(self, message, peer):
        with self.lock:
            self.states.append(json.loads(message.body))
        return Message("ok")

    def queue_event(self, message, peer):
        with self.lock:
            self.events.append(decode_fields(message.body))
        return Message("ok")


@pytest.fixture
def bare(tmp_path, upstream):
    path = str(tmp_path / "upstream.git")
    subprocess.run(["git", "clone", "-q", "--bare", upstream.path, path], check=True)
    return path


@pytest.fixture
def stand_in(bare, cluster):
    server = QueueDispatcher(bare)
    cluster.closers.append(server)
    return server


def make_branch(tmp_path, bare, name, files) -> str:
    work = str(tmp_path / "work")
    if not os.path.isdir(work):
        subprocess.run(["git", "clone", "-q", bare, work], check=True)
    git(work, "fetch", "-q", "origin")
    git(work, "checkout", "-q", "-B", name, "origin/main")
    for path, text in files.items():
        with open(os.path.join(work, path), "w") as handle:
            handle.write(text)
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", f"work on {name}")
    git(work, "push", "-q", "-f", "origin", f"{name}:{name}")
    return git(work, "rev-parse", "HEAD")


def start_observer(cluster, tmp_path, bare, stand_in, *extra, clone=None):
    if clone is None:
        clone = str(tmp_path / "observer")
        subprocess.run(["git", "clone", "-q", bare, clone], check=True)
    return cluster.start_observer(
        "--dispatcher-server", f"127.0.0.1:{stand_in.port}", "--merge-into", "feature/*=main",
        "--queue-depth", "3", "--queue-poll", "0.2", "--state-dir", str(tmp_path / "ostate"),
        *extra, clone=clone)


def cli(observer, *args):
    proc = subprocess.run([PY, os.path.join(ROOT, "repo_observer.py"), *args, "--observer",
                           f"127.0.0.1:{observer.port}"], capture_output=True, text=True,
                          cwd=ROOT, timeout=30)
    return proc.returncode, proc.stdout + proc.stderr


def queue(observer) -> dict:
    reply = helpers.call(("127.0.0.1", observer.port), "queue")
    assert reply.command == "ok", reply
    return json.loads(reply.body)


def dispatched_entries(observer, stand_in) -> int:
    """How many queue entries have a tested commit the stand-in was sent
    (the branches' own merged results are dispatched beside them)."""
    tested = {e["tested"] for e in queue(observer)["entries"] if e.get("tested")}
    dispatched = {line[0] for line in stand_in.merges()}
    return len(tested) if tested <= dispatched else 0


def states(observer) -> dict:
    snap = queue(observer)
    return {e["branch"]: e["state"] for e in snap["recent"] + snap["entries"]}


def test_land_through_the_cli_a_bad_branch_rejected_the_others_landed(cluster, tmp_path, bare,
                                                                       stand_in):
    observer = start_observer(cluster, tmp_path, bare, stand_in)
    start = git(bare, "rev-parse", "main")
    for n in "abc":
        make_branch(tmp_path, bare, f"feature/{n}", {f"{n}.txt": n})
    make_branch(tmp_path, bare, "other/x", {"x.txt": "x"})
    # Refusals: a clear reason, exit 1, nothing queued.
    code, out = cli(observer, "land", "feature/nope")
    assert code == 1 and "unknown branch feature/nope" in out
    code, out = cli(observer, "land", "other/x")
    assert code == 1 and "matches no --merge-into rule" in out
    stand_in.released.clear()
    for n in "abc":
        code, out = cli(observer, "land", f"feature/{n}")
        assert code == 0, out
    code, out = cli(observer, "land", "feature/a")
    assert code == 1 and "already queued" in out
    # An entry is "testing" once the engine has planned again after its
    # dispatch was answered: not yet when the stand-in has the line.
    wait_until(lambda: dispatched_entries(observer, stand_in) == 3
               and set(states(observer).values()) == {"testing"}, 20,
               what="three merges dispatched and testing")
    stand_in.released.set()
    wait_until(lambda: states(observer) == {"feature/a": "landed", "feature/b": "rejected",
                                            "feature/c": "landed"}, 30,
               what="a and c landed, b rejected")
    files = git(bare, "ls-tree", "--name-only", "main").split()
    assert "a.txt" in files and "c.txt" in files and "b.txt" not in files
    first_parents = git(bare, "rev-list", "--first-parent", "main").split()
    assert len(first_parents) == 3 and first_parents[-1] == start
    # Everything on main's first-parent line was judged passed on exactly its parent.
    merges = {line[0]: line[3] for line in stand_in.merges()}
    for commit, parent in zip(first_parents, first_parents[1:]):
        assert merges[commit].split(":")[1] == parent
    wait_until(lambda: sorted(e["event"] for e in stand_in.events) ==
               ["landed", "landed", "rejected"], 10, what="three events")
    rejected = [e for e in stand_in.events if e["event"] == "rejected"][0]
    assert rejected["branch"] == "feature/b" and "t.T.test_ab" in rejected["reason"]
    assert rejected["author"] == "ci@example.invalid"
    wait_until(lambda: stand_in.states and not stand_in.states[-1]["entries"], 10,
               what="the last snapshot to show an empty queue")
    code, out = cli(observer, "queue")
    assert code == 0 and json.loads(out)["targets"]["main"]["head"] == first_parents[0]


def test_a_pushed_land_ref_queues_and_is_deleted(cluster, tmp_path, bare, stand_in):
    observer = start_observer(cluster, tmp_path, bare, stand_in)
    head = make_branch(tmp_path, bare, "feature/a", {"a.txt": "a"})
    git(str(tmp_path / "work"), "push", "-q", "origin", f"{head}:refs/heads/land/feature/a")
    wait_until(lambda: states(observer).get("feature/a") == "landed", 30,
               what="feature/a landed")
    assert git(bare, "for-each-ref", "refs/heads/land") == ""
    # The land/ ref was never dispatched as a branch of its own.
    assert not any(line.split()[2].startswith("land/") for line in stand_in.dispatched)


def test_the_observer_killed_mid_queue_resumes_and_lands_each_once(cluster, tmp_path, bare,
                                                                   stand_in):
    observer = start_observer(cluster, tmp_path, bare, stand_in)
    for n in "acd":
        make_branch(tmp_path, bare, f"feature/{n}", {f"{n}.txt": n})
    stand_in.released.clear()
    for n in "acd":
        assert cli(observer, "land", f"feature/{n}")[0] == 0
    wait_until(lambda: dispatched_entries(observer, stand_in) == 3, 20,
               what="three merges dispatched")
    observer.send_signal(signal.SIGKILL)
    observer.proc.wait(10)
    stand_in.released.set()
    again = start_observer(cluster, tmp_path, bare, stand_in, clone=observer.clone)
    wait_until(lambda: set(states(again).values()) == {"landed"} and
               len(states(again)) == 3, 30, what="all three landed after the restart")
    first_parents = git(bare, "rev-list", "--first-parent", "main").split()
    assert len(first_parents) == 4
    wait_until(lambda: len(stand_in.events) >= 3, 10, what="events")
    assert sorted((e["id"], e["event"]) for e in stand_in.events) == \
        [("1", "landed"), ("2", "landed"), ("3", "landed")]


def test_landing_needs_an_operator(cluster, tmp_path, bare, stand_in):
    """With the observer's issued key, a peer signing with it is the
    observer role: it may read the queue but not land (operators may,
    with a TLS operator certificate, or the shared secret: admin)."""
    key_file = tmp_path / "observer.key"
    key_file.write_text(auth.format_key_file("observer", "obs", b"master-secret"))
    # The stand-in dispatcher is unsigned: the queue's calls to it fail and
    # are retried, which this test does not need.
    observer = start_observer(cluster, tmp_path, bare, stand_in, "--secret-file", str(key_file))
    make_branch(tmp_path, bare, "feature/a", {"a.txt": "a"})
    secret = key_file.read_text().split()[2].encode()
    signed = Security(secret=secret, key_id="observer:obs")
    reply = helpers.call(("127.0.0.1", observer.port), "land", "feature/a", security=signed)
    assert reply.command == "error" and "not allowed for role observer" in reply.argument
    reply = helpers.call(("127.0.0.1", observer.port), "queue", security=signed)
    assert reply.command == "ok" and json.loads(reply.body)["entries"] == []
