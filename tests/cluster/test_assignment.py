"""The dispatcher's assignment loop against runner stand-ins: whatever
frees a runner (its own heartbeat clearing a suspicion, the result of the
commit it held) wakes the loop, so a queued commit never waits beside an
idle runner."""

from __future__ import annotations

import helpers
from ci import results
from ci.wire import Message
from support.cluster import dispatch, wait_until

X, Y = "1" * 40, "2" * 40


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
    # Logged before the runner is marked suspect; requeued under the same lock.
    wait_until(lambda: "answered error" in disp.log()
               and cluster.status().get("queued") == "1", 10, what="failed delivery")
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
