"""Prefetch on a hook's push notice: the observer tells the dispatcher,
which has the idle runners next in line fetch while the observer itself
fetches, so the commit is in a runner's clone before it is assigned.

A hint only: nothing is dispatched by it, a timer poll sends none, and
nobody but the observer's (or an operator's) key may ask for it."""

from __future__ import annotations

import os
import subprocess
import threading

from ci.dispatch import server
import helpers
import test_runner
from support.cluster import PASSING_TEST, PY, ROOT, ThreadedServer, wait_until
from ci.security import Security
from ci.wire import Message, decode_fields


def in_clone(clone: str, commit: str) -> bool:
    return subprocess.run(["git", "-C", clone, "cat-file", "-e", f"{commit}^{{commit}}"],
                          capture_output=True).returncode == 0


def ask(port: int, command: str) -> Message:
    return helpers.call(("127.0.0.1", port), command, timeout=5)


def status(port: int) -> dict:
    return decode_fields(ask(port, "status").body)


# --------------------------------------------------------------------------
# The runner's side, in-process: one job or one fetch at a time.

def test_the_runner_fetches_only_while_idle_and_a_job_goes_first():
    state = test_runner.RunnerState()
    job = test_runner.Assignment("a" * 40, "0" * 32)
    # Two hints before the worker looks are one fetch.
    assert state.want_fetch() and state.want_fetch()
    assert state.take() == test_runner.PREFETCH
    # A job that arrives while a fetch is wanted goes first (its checkout
    # fetches anyway) and the wish is dropped with it.
    assert state.want_fetch()
    assert state.offer(job)
    assert state.take() is job
    # Holding a job, the runner declines the hint.
    assert not state.want_fetch()
    state.finish()
    taken = []
    worker = threading.Thread(target=lambda: taken.append(state.take()))
    worker.start()
    worker.join(0.2)
    assert worker.is_alive(), "nothing wanted: the worker waits"
    state.stop()
    worker.join(5)
    assert taken == [None]
    assert not state.want_fetch()  # stopping


# --------------------------------------------------------------------------
# Real processes.

def test_a_prefetch_brings_a_new_commit_into_an_idle_runners_clone(cluster):
    cluster.start_dispatcher()
    runner = cluster.start_runner()
    wait_until(lambda: status(cluster.dispatcher_port)["idle_runners"] == "1", 15,
               what="the runner to register")
    commit = cluster.upstream.commit({"tests/test_sample.py": PASSING_TEST})
    assert not in_clone(runner.clone, commit)
    assert ask(cluster.dispatcher_port, "prefetch") == Message("ok", "fetching on 1")
    wait_until(lambda: in_clone(runner.clone, commit), 15,
               what="the runner's clone to have the new commit")
    wait_until(lambda: "prefetched in" in runner.log(), 5, what="the runner's log line")
    # A hint, not work: nothing queued, nothing run, no result.
    assert status(cluster.dispatcher_port)["queued"] == "0"
    assert cluster.result_files() == []
    assert "accepted" not in runner.log()
    # Then the commit, when it comes, runs from what is already there.
    helpers.call(("127.0.0.1", cluster.dispatcher_port), "dispatch", commit, timeout=5)
    assert cluster.result(commit)["verdict"] == "passed"


def test_prefetch_runners_zero_turns_it_off_and_bad_values_are_refused(cluster):
    cluster.start_dispatcher("--prefetch-runners", "0")
    runner = cluster.start_runner()
    wait_until(lambda: status(cluster.dispatcher_port)["idle_runners"] == "1", 15,
               what="the runner to register")
    assert ask(cluster.dispatcher_port, "prefetch") == Message("ok", "fetching on 0")
    assert "prefetched" not in runner.log()
    for bad in ("-1", "1001", "many"):
        proc = subprocess.run([PY, os.path.join(ROOT, "dispatcher.py"), "--port", "0",
                               "--prefetch-runners", bad], capture_output=True, text=True,
                              timeout=20, cwd=str(cluster.tmp))
        assert proc.returncode == 2 and "--prefetch-runners" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


class PrefetchRecorder(ThreadedServer):
    """A stand-in dispatcher that counts prefetch hints and takes dispatches."""

    def __init__(self):
        self.prefetches = 0
        self.dispatched: list[str] = []
        super().__init__({"prefetch": self.do_prefetch, "dispatch": self.do_dispatch})

    def do_prefetch(self, message, peer):
        with self.lock:
            self.prefetches += 1
        return Message("ok", "fetching on 0")

    def do_dispatch(self, message, peer):
        with self.lock:
            self.dispatched.extend(message.argument.split())
        return Message("ok", "queued")

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.prefetches, len(self.dispatched)


def test_a_hook_notice_sends_one_prefetch_and_timer_polls_none(cluster, threaded_servers):
    recorder = threaded_servers(PrefetchRecorder)
    cluster.dispatcher_port = recorder.port
    observer = cluster.start_observer("--poll", "0.2")
    observer_port = observer.port

    def polls() -> int:
        return int(decode_fields(ask(observer_port, "status").body)["polls"])
    first = cluster.upstream.commit()
    wait_until(lambda: recorder.counts()[1] >= 1, 15, what="the first dispatch")
    seen = polls()
    wait_until(lambda: polls() >= seen + 3, 15, what="three timer polls")
    assert recorder.counts()[0] == 0, "a timer poll sent a prefetch"
    commit = cluster.upstream.commit()
    hook = subprocess.run([PY, "-S", os.path.join(ROOT, "hook_client.py"), "--observer",
                           f"127.0.0.1:{observer_port}"], capture_output=True, text=True,
                          timeout=20)
    assert hook.returncode == 0, hook.stderr
    wait_until(lambda: recorder.counts()[0] == 1, 15, what="one prefetch after the notice")
    wait_until(lambda: commit in recorder.dispatched, 15, what="the commit's dispatch")
    assert first in recorder.dispatched


def test_every_dispatcher_command_has_its_roles():
    """A command missing from the permission table would be open to every
    key, a runner's included."""
    from ci import auth
    d = server.Dispatcher(None, Security(), server.Options(1, 1, 1, 1, 1))
    try:
        assert set(d.commands) == set(auth.DISPATCHER_PERMISSIONS)
    finally:
        d.pool.shutdown()
        d.ping_pool.shutdown()
