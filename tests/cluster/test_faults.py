"""Fault injection: real daemons are killed, stopped, starved and restarted
while they work, and every commit must still end with exactly one result
file holding the right verdict.

The commits under test carry ``tests/test_fault.py`` (see
tests/support/faults.py), whose behaviour (sleep, fail, kill its runner,
start a grandchild) is fixed per commit; the notes it leaves (the ``notes``
fixture) tell a test when a run really is in progress, on which runner, and
which processes it made, instead of guessing with sleeps.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time

from support.cluster import dispatch, free_port, git, wait_until
from support.faults import Notes, commit_fault
from support.procs import group_members, process_alive, watchdog_of

import helpers
from ci.wire import ProtocolError, decode_fields, parse_address

FAKE_GIT = """#!/usr/bin/env bash
# A git whose fetch hangs (the network is gone); everything else is real git.
for arg in "$@"; do
    if [ "$arg" = fetch ]; then
        echo "$$" > "$CI_FAULT_DIR/git.hung.$$"
        exec sleep 20
    fi
done
exec {real_git} "$@"
"""


def start_runner(cluster, notes: Notes, *extra, port=None, clone=None, path_prefix=None):
    """A runner whose tests know where to leave notes and whom they run on."""
    port = port or free_port()
    env = dict(cluster.env, CI_FAULT_DIR=notes.folder, CI_RUNNER_NAME=f"127.0.0.1:{port}")
    if path_prefix:
        env["PATH"] = path_prefix + os.pathsep + env.get("PATH", os.defpath)
    runner = cluster.start_runner(*extra, port=port, clone=clone, env=env)
    runner.address = f"127.0.0.1:{port}"
    return runner


def status(cluster) -> dict:
    """The dispatcher's counters; {} while it does not answer."""
    try:
        reply = helpers.call(parse_address(cluster.dispatcher_address), "status",
                             timeout=0.5)
    except (OSError, ProtocolError):
        return {}
    return {k: int(v) for k, v in decode_fields(reply.body).items()}


def dispatcher_log(cluster) -> str:
    return "".join(d.log() for d in cluster.daemons if d.name == "dispatcher")


def results_written(cluster, commit: str) -> int:
    """How many times any dispatcher instance wrote ``commit``'s result."""
    return dispatcher_log(cluster).count(f"result for {commit[:12]}: ")


def head(upstream) -> str:
    return git(upstream.path, "rev-parse", "HEAD")


def assert_one_result_each(cluster, expected: dict[str, str]) -> None:
    """Exactly these result files, each written once, with these verdicts."""
    for commit, verdict in expected.items():
        assert cluster.result(commit, 30)["verdict"] == verdict, commit
    assert cluster.result_files() == sorted(expected)
    for commit in expected:
        # The file is written before the line that logs it.
        wait_until(lambda: results_written(cluster, commit), 5, what="the result's log line")
        assert results_written(cluster, commit) == 1, commit




# --------------------------------------------------------------------------

def test_runner_sigkilled_mid_test_in_three_rounds(cluster, upstream, notes):
    # Enough attempts that three lost runs never make a commit poison.
    cluster.start_dispatcher("--max-attempts", "10")
    verdicts = {}
    for name, fail in (("k1", False), ("k2", True), ("k3", False)):
        verdicts[commit_fault(upstream, name, seconds=1.0, fail=fail)] = \
            "failed" if fail else "passed"
    dispatch(cluster, *verdicts)
    for _ in range(3):
        runner = start_runner(cluster, notes)
        wait_until(lambda: notes.started_on(runner.address), 15,
                   what=f"a test to start on {runner.address}")
        runner.kill()
    for _ in range(2):
        start_runner(cluster, notes)
    assert_one_result_each(cluster, verdicts)
    finished = {pid for pid, _ in notes.find(kind="finished")}
    assert len({pid for pid, _ in notes.find()} - finished) == 3, "three runs were cut short"


def test_dispatcher_sigkilled_with_work_queued_and_running(cluster, upstream, notes):
    dispatcher = cluster.start_dispatcher()
    runners = [start_runner(cluster, notes) for _ in range(2)]
    wait_until(lambda: status(cluster).get("runners") == 2, 10)
    verdicts = {}
    for i in range(6):
        verdicts[commit_fault(upstream, f"d{i}", seconds=0.8, fail=i == 3)] = \
            "failed" if i == 3 else "passed"
    dispatch(cluster, *verdicts)
    wait_until(lambda: len(notes.find()) == 2, 10, what="both runners to be testing")
    dispatcher.kill()

    started = time.monotonic()
    restarted = cluster.start_dispatcher(wait=False)
    wait_until(lambda: status(cluster), 5, interval=0.02, what="the restarted dispatcher")
    # Within a second on a quiet machine (the port is rebound at once, with
    # no TIME_WAIT wait; docs/performance.md); slack for a busy one.
    elapsed = time.monotonic() - started
    assert elapsed < 5.0, f"the restarted dispatcher took {elapsed:.2f}s to answer"
    recovered = re.search(r"recovered (\d+) commit\(s\) to test \((\d+) were running",
                          restarted.log())
    assert recovered and recovered.groups() == ("6", "2"), restarted.log()

    assert_one_result_each(cluster, verdicts)
    assert status(cluster)["runners"] == 2
    for runner in runners:
        assert f"runner {runner.address} registered" in restarted.log()
        assert runner.alive()
    # The two runs in progress were adopted when their runners came back,
    # not started a second time elsewhere: six commits, six runs.
    assert len(notes.find()) == 6


def test_dispatcher_down_for_seconds_while_commits_land(cluster, upstream, notes):
    dispatcher = cluster.start_dispatcher()
    runner = start_runner(cluster, notes)
    observer = cluster.start_observer()
    first = head(upstream)
    assert cluster.result(first, 20)["verdict"] == "passed"
    # Killed after it logged the result (the file comes first): killed
    # between the two, its restart rightly takes the runner's resend as a
    # duplicate, and no instance would ever log it.
    wait_until(lambda: results_written(cluster, first), 5, what="the result's log line")
    dispatcher.kill()
    down_at = time.monotonic()
    observer_seen, runner_seen = len(observer.log()), len(runner.log())
    backlog = {commit_fault(upstream, f"b{i}", fail=i == 1): "failed" if i == 1 else "passed"
               for i in range(3)}

    def outage_felt():
        return (time.monotonic() - down_at > 3
                and observer.log()[observer_seen:].count("unavailable") >= 2
                and runner.log()[runner_seen:].count("unreachable") >= 2)
    wait_until(outage_felt, 15, what="both daemons to retry through a 3 s outage")
    assert observer.alive() and runner.alive()
    assert not any(os.path.exists(cluster.result_path(c)) for c in backlog)

    cluster.start_dispatcher()
    assert_one_result_each(cluster, dict(backlog, **{first: "passed"}))


def test_observer_sigkilled_then_restarted_dispatches_once(cluster, upstream, notes):
    cluster.start_dispatcher()
    start_runner(cluster, notes)
    observer = cluster.start_observer()
    first = head(upstream)
    assert cluster.result(first, 20)["verdict"] == "passed"
    state_file = os.path.join(observer.clone, ".git", "ci-observer", "state.json")
    wait_until(lambda: os.path.exists(state_file) and first in open(state_file).read(), 10)
    observer.kill()
    landed = [commit_fault(upstream, f"o{i}") for i in range(3)]
    cluster.start_observer(clone=observer.clone)

    assert_one_result_each(cluster, {c: "passed" for c in [first, *landed]})
    log = dispatcher_log(cluster)
    for commit in [first, *landed]:
        assert log.count(f"commit {commit[:12]} -> runner") == 1, commit
    queued = sum(int(n) for n in re.findall(r"dispatch from \S+: \d+ commit\(s\), (\d+) new",
                                            log))
    assert queued == 4
    assert len(notes.find()) == 3


def test_commit_that_kills_its_runner_gives_up_after_max_attempts(cluster, upstream, notes):
    cluster.start_dispatcher("--max-attempts", "3")
    poison = commit_fault(upstream, "poison", kill_runner=True)
    port = free_port()
    runner = start_runner(cluster, notes, port=port)
    dispatch(cluster, poison)
    path = cluster.result_path(poison)
    # Replace each dead runner (same port and clone) until the verdict comes.
    deaths = 0
    while deaths < 6:
        wait_until(lambda: not runner.alive() or os.path.exists(path), 15,
                   what="the runner to die or the commit to be given up")
        # The give-up can be written before this loop sees the third death
        # (a refused ping drops the runner at once): count it either way.
        if not runner.alive():
            deaths += 1
        if os.path.exists(path):
            break
        runner = start_runner(cluster, notes, port=port, clone=runner.clone)
    fields = cluster.result(poison, 10)
    assert fields["verdict"] == "error"
    assert "gave up" in fields["reason"] and "3 times" in fields["reason"], fields["reason"]
    assert deaths == 3
    # The test command is the runner's own child: getppid() was the runner.
    killed = [int(text.split(" ")[1]) for _, text in notes.find("poison")]
    dead = [d.pid for d in cluster.daemons if d.name.startswith("runner") and not d.alive()]
    assert sorted(killed) == sorted(dead) and len(dead) == 3
    # The commit is given up: a runner in the dead one's place is not sent it.
    if not runner.alive():
        runner = start_runner(cluster, notes, port=port, clone=runner.clone)
    wait_until(lambda: status(cluster).get("runners") == 1, 10, what="the runner registered")
    assert status(cluster)["running"] == 0 and status(cluster)["queued"] == 0
    assert runner.alive()


def test_hanging_checkout_is_reassigned_after_job_timeout(cluster, upstream, notes, tmp_path):
    cluster.start_dispatcher("--job-timeout", "2")
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    (fakebin / "git").write_text(FAKE_GIT.format(real_git=shutil.which("git")))
    (fakebin / "git").chmod(0o755)
    hung = start_runner(cluster, notes, path_prefix=str(fakebin))
    wait_until(lambda: status(cluster).get("runners") == 1, 10)
    # Committed after the runner cloned, so its checkout has to fetch.
    commit = commit_fault(upstream, "hang")
    dispatch(cluster, commit)
    wait_until(lambda: notes.find("git", "hung"), 10, what="the fetch to hang")
    normal = start_runner(cluster, notes)

    fields = cluster.result(commit, 20)
    assert fields["verdict"] == "passed"
    assert fields["runner"] == normal.address
    assert "exceeded the job deadline" in dispatcher_log(cluster)
    # The hung runner still answers pings, so it was not dropped.
    assert status(cluster)["runners"] == 2 and hung.alive()
    assert_one_result_each(cluster, {commit: "passed"})

    # Stopping it ends the hung checkout too.
    git_pid = notes.find("git", "hung")[0][0]
    assert hung.stop(timeout=5) == 0
    wait_until(lambda: not process_alive(git_pid), 5, what="the hung git to be killed")


def test_sigterm_stops_each_daemon_cleanly(cluster, upstream, notes):
    dispatcher = cluster.start_dispatcher()
    observer = cluster.start_observer()
    first = start_runner(cluster, notes)
    assert cluster.result(head(upstream), 20)["verdict"] == "passed"
    # The result was written into a file made ahead of time (spares.py):
    # no temporary file of its own is left, and the pool is there.
    spare = os.path.join(cluster.results, ".spare")
    assert os.listdir(spare) and not [n for n in os.listdir(cluster.results)
                                      if n.startswith(".tmp")]
    long = commit_fault(upstream, "long", seconds=30, once=True, grandchild=True)
    wait_until(lambda: notes.find("long", "grandchild") and notes.find("long"), 15,
               what="the long test and its grandchild to start")
    test_pid = notes.find("long")[0][0]
    grandchild = int(notes.find("long", "grandchild")[0][1])
    # Started only now, so the long commit cannot have gone to it first.
    second = start_runner(cluster, notes)
    wait_until(lambda: status(cluster).get("runners") == 2, 10)

    def stop(daemon) -> float:
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(5) == 0, daemon.log()
        assert group_members(daemon.pid, session=True) == []
        return time.monotonic() - started

    assert stop(first) < 5
    assert not process_alive(test_pid) and not process_alive(grandchild)
    assert group_members(test_pid, session=True) == []
    assert f"handed {long[:12]} back" in first.log()
    fields = cluster.result(long, 20)
    assert fields["runner"] == second.address and fields["verdict"] == "passed"
    assert len(notes.find("long")) == 2

    assert stop(observer) < 5
    assert stop(second) < 5
    assert stop(dispatcher) < 5
    assert not os.path.exists(spare)          # its spares removed on the way out


def test_runner_outbox_delivers_after_dispatcher_returns(cluster, upstream, notes):
    dispatcher = cluster.start_dispatcher()
    runner = start_runner(cluster, notes)
    wait_until(lambda: status(cluster).get("runners") == 1, 10)
    commit = commit_fault(upstream, "outbox", seconds=1.0)
    dispatch(cluster, commit)
    wait_until(lambda: notes.find("outbox"), 10, what="the test to start")
    dispatcher.kill()
    # The run goes on and its result waits on disk for the dispatcher.
    outbox = os.path.join(runner.clone, ".git", "ci-runner", "outbox")
    wait_until(lambda: os.listdir(outbox), 10, what="the result to reach the outbox")
    seen = len(runner.log())
    wait_until(lambda: "unreachable" in runner.log()[seen:], 10)
    assert not os.path.exists(cluster.result_path(commit))

    cluster.start_dispatcher()
    assert_one_result_each(cluster, {commit: "passed"})
    wait_until(lambda: not os.listdir(outbox), 10, what="the outbox to empty")
    # Delivered, not tested again.
    assert len(notes.find("outbox")) == 1


def test_runner_dropped_for_missed_pings_rejoins(cluster, upstream, notes):
    # A frozen runner (SIGSTOP) still accepts connections but never answers.
    cluster.start_dispatcher()
    frozen = start_runner(cluster, notes)
    wait_until(lambda: status(cluster).get("runners") == 1, 10)
    commit = commit_fault(upstream, "frozen", seconds=1.5, once=True)
    dispatch(cluster, commit)
    wait_until(lambda: notes.started_on(frozen.address), 10, what="the test to start")
    frozen.send_signal(signal.SIGSTOP)
    other = start_runner(cluster, notes)

    fields = cluster.result(commit, 15)
    assert fields["runner"] == other.address
    assert f"runner {frozen.address} missed" in dispatcher_log(cluster)
    before = os.stat(cluster.result_path(commit))
    # The frozen runner's own run goes on and finishes while it is stopped.
    wait_until(lambda: notes.find("frozen", "finished"), 10)
    frozen.send_signal(signal.SIGCONT)
    wait_until(lambda: f"duplicate result for {commit[:12]} from {frozen.address}"
               in dispatcher_log(cluster), 10, what="the stale result to arrive")
    after = os.stat(cluster.result_path(commit))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert cluster.result(commit)["runner"] == other.address
    assert results_written(cluster, commit) == 1

    wait_until(lambda: status(cluster).get("runners") == 2, 10,
               what="the frozen runner to register again")
    assert other.stop() == 0
    wait_until(lambda: status(cluster).get("runners") == 1, 10)
    # With the other runner gone, the later commit can only go to it.
    later = commit_fault(upstream, "later")
    dispatch(cluster, later)
    assert cluster.result(later, 15)["runner"] == frozen.address


def runner_with_a_grandchild(cluster, upstream, notes, tag: str):
    """A runner whose 30 s test has started a child of its own: (the
    runner, the grandchild's PID)."""
    cluster.start_dispatcher("--max-attempts", "10")
    commit = commit_fault(upstream, tag, seconds=30, grandchild=True)
    runner = start_runner(cluster, notes)
    dispatch(cluster, commit)
    wait_until(lambda: notes.find(tag, "grandchild"), 15, what="the grandchild")
    return runner, int(notes.find(tag, "grandchild")[0][1])


def test_restarted_runner_ends_what_its_killed_predecessor_left_running(cluster, upstream,
                                                                       notes):
    runner, grandchild = runner_with_a_grandchild(cluster, upstream, notes, "orphan")
    # The watchdog would end the group at once (see the next test): kill it
    # first, as if it had died too, to prove the restart's own cleanup.
    os.kill(watchdog_of(runner.pid), signal.SIGKILL)
    os.kill(runner.pid, signal.SIGKILL)  # the runner alone, not its test's group
    runner.proc.wait(10)
    assert process_alive(grandchild)
    # Its run's report and order folders stay in its scratch folder (they
    # were left in the system's temp folder, two for each killed run).
    scratch = os.path.join(runner.clone, ".git", "ci-runner", "scratch")
    left = os.listdir(scratch)
    assert sorted(name.split("-")[1] for name in left) == ["junit", "order"], left
    restarted = start_runner(cluster, notes, port=runner.port, clone=runner.clone)
    wait_until(lambda: not process_alive(grandchild), 10, what="the orphan to be killed")
    assert "left running by a previous runner" in restarted.log()
    assert not set(left) & set(os.listdir(scratch))      # emptied at the start


def test_sigkilled_runner_leaves_no_test_process_running(cluster, upstream, notes):
    """A runner SIGKILLed on its own (nobody restarts it): its watchdog kills
    the test's whole group, grandchildren included, within a second."""
    runner, grandchild = runner_with_a_grandchild(cluster, upstream, notes, "alone")
    os.kill(runner.pid, signal.SIGKILL)
    wait_until(lambda: not process_alive(grandchild), 1.0, interval=0.02,
               what="the orphaned test to be killed by the watchdog")


def test_observer_stopped_mid_fetch_leaves_no_git_behind(cluster, upstream, notes, tmp_path):
    cluster.start_dispatcher()
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    (fakebin / "git").write_text(FAKE_GIT.format(real_git=shutil.which("git")))
    (fakebin / "git").chmod(0o755)
    clone = upstream.clone(tmp_path / "observer-clone")
    env = dict(cluster.env, CI_FAULT_DIR=notes.folder,
               PATH=str(fakebin) + os.pathsep + cluster.env.get("PATH", os.defpath))
    observer = cluster.start_observer(clone=clone, env=env)
    wait_until(lambda: notes.find("git", "hung"), 10, what="the observer's fetch to hang")
    git_pid = notes.find("git", "hung")[0][0]
    started = time.monotonic()
    assert observer.stop(timeout=8) == 0
    assert time.monotonic() - started < 5
    wait_until(lambda: not process_alive(git_pid), 5, what="the hung fetch to be killed")


def test_failed_poison_verdict_write_requeues_the_commit(cluster, upstream, fake_runner):
    """At the poison limit the dispatcher writes an ``error`` verdict; if that
    write fails the commit must stay queued, not vanish from memory."""
    commit = head(upstream)
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
