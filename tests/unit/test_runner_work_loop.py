"""The runner daemon in process: a failure of the prefetch (a fork the
system refuses, which a test cannot make happen for real as root: so
``slot.run`` raises it here, once) leaves the work thread running, and the
next job is run and reported; a stopping runner does not wait a minute for
a dispatcher that never answers."""

from __future__ import annotations

import os
import socket
import threading
import time

import test_runner
from ci.runner import daemon, startup
from ci.runner.jobs import RunnerJob
from ci.security import Security
from support.cluster import wait_until


def test_a_prefetch_that_raises_leaves_the_work_thread_running(upstream, tmp_path, monkeypatch):
    clone = upstream.clone(tmp_path / "clone")
    commit = upstream.commit({}, "after the failed prefetch")
    state_dir = str(tmp_path / "state")
    os.makedirs(state_dir)
    args = test_runner.build_parser().parse_args([clone, "--state-dir", state_dir])
    repo, dispatcher = startup.check_args(args)      # the defaults main fills in
    runner = daemon.TestRunner(args, Security(), dispatcher, state_dir)
    real_run, failures = runner.slot.run, []

    def run(cmd, *rest, **kwargs):
        if not failures and "update_repo.sh" in " ".join(cmd):
            failures.append(cmd)
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_run(cmd, *rest, **kwargs)
    monkeypatch.setattr(runner.slot, "run", run)
    work = runner.threads[0]
    work.start()
    try:
        assert runner.state.want_fetch()
        wait_until(lambda: failures, 10, what="the prefetch")
        assert runner.state.offer(RunnerJob(commit, "a" * 32))
        wait_until(lambda: runner.outbox.items(), 60, what="the job's result in the outbox")
        assert work.is_alive()
        [(name, stored, token)] = runner.outbox.items()
        assert (stored, token) == (commit, "a" * 32)
        assert b"verdict: passed" in runner.outbox.read(name)
    finally:
        runner.state.stop()
        runner.slot.cancel()
        work.join(10)
        runner.watchdog.stop()   # a no-op unless something started it


def test_a_stopping_runner_waits_briefly_for_a_dispatcher_that_never_answers(upstream,
                                                                             tmp_path):
    """A result waits in the outbox and the dispatcher accepts connections
    but never answers: stop() flushed the outbox with the 60 s reply
    timeout, on top of its threads' 5 s.  The flush now waits a few
    seconds; the result stays in the outbox for the next start."""
    clone = upstream.clone(tmp_path / "clone")
    state_dir = str(tmp_path / "state")
    os.makedirs(state_dir)
    mute = socket.create_server(("127.0.0.1", 0))     # listens, never accepts
    try:
        port = mute.getsockname()[1]
        args = test_runner.build_parser().parse_args(
            [clone, "--state-dir", state_dir, "--dispatcher-server", f"127.0.0.1:{port}"])
        repo, dispatcher = startup.check_args(args)
        runner = daemon.TestRunner(args, Security(), dispatcher, state_dir)
        assert runner.outbox.store("1" * 40, "b" * 32, b"verdict: passed\n\n",
                                   threading.Event(), 1)
        started = time.monotonic()
        runner.stop_event.set()            # its threads never started: only the flush
        runner.threads = []
        runner.stop()
        assert time.monotonic() - started < daemon.STOP_FLUSH_TIMEOUT + 10
        assert [item[1] for item in runner.outbox.items()] == ["1" * 40]
    finally:
        mute.close()
