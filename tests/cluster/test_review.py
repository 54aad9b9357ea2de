"""Regression tests for bugs found in a correctness review of the core
daemons: lost wake-ups of the assignment loop, commits stranded when a
write fails, a runner left busy for ever, a journal that stops accepting
records, and a wrong verdict."""

from __future__ import annotations

import os

import pytest

from support.cluster import PY, FakeRunner, wait_until

import helpers
from ci import results
from ci.runner.verdict import judge
from ci.dispatch.journal import Journal
from ci.wire import Message

X, Y = "1" * 40, "2" * 40


@pytest.fixture
def fake_runner(threaded_servers):
    return lambda answers=None: threaded_servers(FakeRunner, answers)


def dispatch(cluster, *commits):
    reply = helpers.call(("127.0.0.1", cluster.dispatcher_port), "dispatch", " ".join(commits))
    assert reply.command == "ok", reply


def test_heartbeat_that_clears_a_suspect_runner_wakes_the_assignment(cluster, fake_runner):
    """A runner marked suspect (its ``runtest`` failed) and cleared by its
    own heartbeat ``register`` must be offered the queued commit again;
    before, nothing woke the assignment loop and the commit sat queued
    beside an idle runner.  Pings are slow here so only the heartbeat can
    clear it, as happens whenever the heartbeat comes first."""
    disp = cluster.start_dispatcher("--ping-interval", "60")
    runner = fake_runner([Message("error", "lost on the way")])
    assert runner.register(cluster.dispatcher_port) == "registered"
    dispatch(cluster, X)
    wait_until(lambda: "answered error" in disp.log(), 10, what="failed delivery")
    assert runner.register(cluster.dispatcher_port) == "known"
    wait_until(lambda: runner.received() == [X, X], 5, what="second runtest after heartbeat")


def test_runner_freed_by_another_runners_result_is_offered_work(cluster, fake_runner):
    """When the result of the commit a runner holds arrives (here posted on
    its behalf, with its token), that runner is free at once and must get
    the next queued commit."""
    cluster.start_dispatcher("--ping-interval", "60")
    runner = fake_runner()
    runner.register(cluster.dispatcher_port)
    dispatch(cluster, X)
    wait_until(lambda: runner.received() == [X], 10, what="runtest X")
    dispatch(cluster, Y)
    body = results.format_result({"verdict": "passed", "runner": "127.0.0.1:9"}, b"ok\n")
    reply = helpers.call(("127.0.0.1", cluster.dispatcher_port), "results",
                         f"{X} {runner.tokens[X]}", body)
    assert reply == Message("ok", "stored")
    wait_until(lambda: runner.received() == [X, Y], 5, what="runtest Y after X finished")


def test_failed_poison_verdict_write_requeues_the_commit(cluster, upstream, fake_runner):
    """At the poison limit the dispatcher writes an ``error`` verdict; if that
    write fails the commit must stay queued, not vanish from memory."""
    commit = git_head(upstream)
    disp = cluster.start_dispatcher("--max-attempts", "1")
    runner = fake_runner()
    runner.register(cluster.dispatcher_port)
    dispatch(cluster, commit)
    wait_until(lambda: runner.received() == [commit], 10, what="runtest")
    away = cluster.results + ".away"
    os.rename(cluster.results, away)  # every result write now fails
    try:
        runner.close()  # misses its pings: the poison limit is reached
        wait_until(lambda: "health sweep failed" in disp.log()
                   or "cannot write the verdict" in disp.log(), 10, what="failed write")
    finally:
        os.rename(away, cluster.results)
    cluster.start_runner()
    assert cluster.result(commit, timeout=20)["verdict"] == "passed"
    assert cluster.result_files() == [commit]


def test_runner_survives_a_failed_outbox_write(cluster, upstream, tmp_path):
    """A result that cannot be stored (disk full, state folder gone) must be
    kept and stored later; before, the worker thread died and the runner
    answered ``busy`` for ever."""
    commit = git_head(upstream)
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


def test_journal_keeps_working_after_a_failed_compaction(tmp_path):
    """A compaction that cannot write its new file must leave the old
    journal in use; before, its handle was closed first, so every later
    record failed (and the assignment thread died on the first one)."""
    folder = tmp_path / "state"
    folder.mkdir()
    journal = Journal(str(folder / "journal"))
    journal.rewrite([f"Q {X}"])
    away = tmp_path / "state.away"
    os.rename(folder, away)
    with pytest.raises(OSError):
        journal.rewrite([f"Q {X}", f"Q {Y}"])
    os.rename(away, folder)
    journal.append([f"Q {Y}"], sync=True)
    journal.close()
    assert Journal(str(folder / "journal")).replay().order == [X, Y]


UNEXPECTED_SUCCESS = (b"u\n" + b"=" * 70 + b"\nUNEXPECTED SUCCESS: test_a (t.T.test_a)\n"
                      + b"-" * 70 + b"\nRan 2 tests in 0.001s\n\n"
                      b"FAILED (skipped=1, unexpected successes=1)\n")


def test_unexpected_success_is_a_failed_test_not_an_error():
    """unittest fails a run with an unexpected success (exit 1): the tests
    ran and one of them failed, so the verdict is ``failed``."""
    verdict, counts, reason = judge(1, False, UNEXPECTED_SUCCESS)
    assert (verdict, counts.tests, counts.failures, counts.skipped) == ("failed", 2, 1, 1)
    assert reason == ""


def git_head(upstream) -> str:
    from support.cluster import git
    return git(upstream.path, "rev-parse", "HEAD")


def test_pytest_summary_with_plugin_outcomes_still_counts():
    from ci.runner.verdict import judge
    output = (b"F.R\n=========== short test summary info ===========\n"
              b"FAILED tests/test_x.py::test_a - assert 1 == 2\n"
              b"==== 1 failed, 1 passed, 1 rerun, 2 warnings in 0.31s ====\n")
    verdict, counts, _ = judge(1, False, output)
    assert verdict == "failed"
    assert (counts.tests, counts.failures) == (2, 1)
