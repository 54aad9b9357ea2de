"""The runner's outbox against a dispatcher that says no: a refused result
must not block the ones behind it, and ``busy`` means "keep it"."""

import os

import pytest

from support.cluster import PY, ThreadedServer, dispatch, git, wait_until

from ci import results
from ci.wire import Message

A, B = "a" * 40, "b" * 40


class FakeDispatcher(ThreadedServer):
    """Answers ``results`` as the test sets."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []
        super().__init__({"register": lambda m, p: Message("ok", "registered"),
                          "results": self.results})

    def results(self, message, peer):
        commit = message.argument.split()[0]
        with self.lock:
            self.calls.append(commit)
            answer = self.answers[commit]
        return answer(len([c for c in self.calls if c == commit])) \
            if callable(answer) else answer

    def count(self, commit):
        with self.lock:
            return self.calls.count(commit)


@pytest.fixture
def fake_dispatcher(threaded_servers):
    return lambda answers: threaded_servers(FakeDispatcher, answers)


def outbox_with(cluster, clone, *commits):
    outbox = os.path.join(clone, ".git", "ci-runner", "outbox")
    os.makedirs(outbox)
    body = results.format_result({"verdict": "passed", "runner": "x"}, b"ok\n")
    for i, commit in enumerate(commits):
        with open(os.path.join(outbox, f"{i:016d}-{commit}-1"), "wb") as handle:
            handle.write(body)
    return outbox


def start_runner_at(cluster, fake, clone):
    cluster.dispatcher_port = fake.port
    return cluster.start_runner("--retry-max", "0.05", clone=clone)


def test_refused_result_is_set_aside_without_blocking_the_next(cluster, upstream,
                                                                fake_dispatcher):
    fake = fake_dispatcher({A: Message("error", "nope"), B: Message("ok", "stored")})
    clone = upstream.clone(cluster.tmp / "clone")
    outbox = outbox_with(cluster, clone, A, B)
    start_runner_at(cluster, fake, clone)
    wait_until(lambda: fake.count(B) == 1 and fake.count(A) >= 10, 20,
               what="B delivered and A refused ten times")
    wait_until(lambda: os.listdir(outbox) == [f"refused-{0:016d}-{A}-1"], 10,
               what="A set aside")
    assert fake.count(A) == 10 and fake.count(B) == 1


def test_busy_dispatcher_keeps_the_result_until_it_can_store_it(cluster, upstream,
                                                                 fake_dispatcher):
    fake = fake_dispatcher({A: lambda n: Message("busy", "disk full") if n < 5
                            else Message("ok", "stored")})
    clone = upstream.clone(cluster.tmp / "clone")
    outbox = outbox_with(cluster, clone, A)
    start_runner_at(cluster, fake, clone)
    wait_until(lambda: fake.count(A) == 5 and not os.listdir(outbox), 20,
               what="A stored on the fifth try")
    assert fake.count(A) == 5


def test_runner_survives_a_failed_outbox_write(cluster, upstream, tmp_path):
    """A result that cannot be stored (disk full, state folder gone) must be
    kept and stored later; before, the worker thread died and the runner
    answered ``busy`` for ever."""
    commit = git(upstream.path, "rev-parse", "HEAD")
    go = tmp_path / "go"
    script = tmp_path / "wait_for_go.py"
    script.write_text("import os, time\n"
                      f"for _ in range(1000):\n"
                      f"    if os.path.exists({str(go)!r}):\n"
                      "        break\n"
                      "    time.sleep(0.02)\n")
    state = tmp_path / "runner-state"
    cluster.start_dispatcher()
    runner = cluster.start_runner("--state-dir", str(state), "--timeout", "30",
                                  "--test-command", f"{PY} {script}")
    wait_until(lambda: "registered with dispatcher" in runner.log(), 10, what="register")
    dispatch(cluster, commit)
    wait_until(lambda: "accepted" in runner.log(), 10, what="runtest accepted")
    outbox, away = state / "outbox", state / "outbox.away"
    os.rename(outbox, away)
    go.write_text("")
    try:
        wait_until(lambda: "cannot store the result" in runner.log(), 10,
                   what="failed outbox write reported")
    finally:
        os.rename(away, outbox)
    assert cluster.result(commit, timeout=20)["verdict"] == "passed"
    assert runner.alive()
