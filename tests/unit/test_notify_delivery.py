"""Delivery in this process with a real command (ci/notify/notifier.py,
worker.py, targets.py): the first start and a result missed in a crash,
giving up after --notify-retry-for, a hanging command killed at its
timeout, an event for a removed target, the backoff reset."""

from __future__ import annotations

import os
import threading
import time

import pytest

from support.cluster import PY, wait_until
from support.notify import chain, recorded, recorder, decision_records

from ci.notify.decider import NOTIFY_ON, Decider, Result
from ci.notify.events import build_event
from ci.notify.notifier import Notifier, Options
from ci.notify.store import JOURNAL_NAME, EventStore
from ci.notify.targets import CommandTarget, DeliveryError
from ci.notify.worker import TargetWorker
from ci.backoff import Backoff
from ci.files import atomic_write
from ci.outcome import Outcome


def write_result(folder, result: Result):
    fields = {"commit": result.commit, "verdict": result.verdict, "tests": 2,
              "branch": result.branch}
    if result.previous:
        fields["previous"] = result.previous
    outcome = Outcome(fields, b"out\n")
    atomic_write(os.path.join(folder, result.commit), outcome.result_file(), fsync=False)
    return outcome


def test_notifier_first_start_and_a_result_missed_in_a_crash(tmp_path):
    results, state = str(tmp_path / "results"), str(tmp_path / "state")
    os.makedirs(results)
    os.makedirs(state)
    history = chain(["passed", "failed", "failed", "passed", "failed"])
    for old in history[:2]:
        write_result(results, old)
    command, out = recorder(tmp_path)
    target = CommandTarget(command.split(), 10)

    def start():
        notifier = Notifier(state, results, [target],
                            Options(NOTIFY_ON["all"], retry_max=0.2))
        notifier.start(lambda commit: False)
        return notifier

    notifier = start()
    # Old results are not announced; a new one is, against the old verdict.
    notifier.result_written(history[2].commit, write_result(results, history[2]))
    wait_until(lambda: recorded(out) and not notifier.store.pending(), 10,
               what="the first notification")
    notifier.stop()
    # Written, then the dispatcher died before telling the notifier.
    write_result(results, history[3])
    notifier = start()
    wait_until(lambda: len(recorded(out)) >= 2, 10, what="the missed result's notification")
    notifier.result_written(history[4].commit, write_result(results, history[4]))
    wait_until(lambda: len(recorded(out)) >= 3, 10, what="the last notification")
    notifier.stop()
    assert [(r["CI_EVENT"], r["CI_COMMIT"]) for r in recorded(out)] == \
        [("still-failing", history[2].commit), ("fixed", history[3].commit),
         ("broken", history[4].commit)]


def test_gives_up_after_retry_for_and_goes_on(tmp_path):
    results, state = str(tmp_path / "results"), str(tmp_path / "state")
    os.makedirs(results)
    os.makedirs(state)
    failing = CommandTarget([PY, "-c", "import sys; sys.exit(3)"], 10)
    notifier = Notifier(state, results, [failing],
                        Options(NOTIFY_ON["all"], retry_for=0.3, retry_max=0.05))
    notifier.start(lambda commit: False)
    for result in chain(["failed", "passed"]):
        notifier.result_written(result.commit, write_result(results, result))
    wait_until(lambda: notifier.store.judged and not notifier.store.pending(), 20,
               what="both events given up")
    notifier.stop()
    with open(os.path.join(state, JOURNAL_NAME)) as handle:
        assert handle.read().count('"gave_up"') == 2


def test_a_hanging_command_is_killed_at_its_timeout():
    target = CommandTarget([PY, "-c", "import time; time.sleep(60)"], 0.5)
    (decision,) = Decider(NOTIFY_ON["all"]).add(chain(["failed"]))
    event = build_event(decision, "/r", None, ["command"])
    started = time.monotonic()
    with pytest.raises(DeliveryError, match="timed out"):
        target.deliver(event)
    assert time.monotonic() - started < 5


def test_an_event_for_a_removed_target_is_dropped_at_start(tmp_path):
    results, state = str(tmp_path / "results"), str(tmp_path / "state")
    os.makedirs(results)
    os.makedirs(state)
    store = EventStore(os.path.join(state, JOURNAL_NAME))
    store.load()
    store.open()
    records = decision_records(chain(["failed"]))
    records[0]["e"]["targets"] = ["webhook:removed"]
    store.append(records, sync=True)
    store.close()
    command, out = recorder(tmp_path)
    notifier = Notifier(state, results, [CommandTarget(command.split(), 10)])
    notifier.start()
    wait_until(lambda: notifier.store.judged and not notifier.store.pending(), 10,
               what="the stale event dropped")
    notifier.stop()
    assert recorded(out) == []


def test_giving_up_resets_the_backoff():
    """The next event's first retry starts short again, not at the delay
    the given-up event's retries had grown to."""
    class Refusing:
        key = label = "refusing"

        def deliver(self, event):
            raise DeliveryError("down")

    class Marks:
        def __init__(self):
            self.outcomes = []

        def mark(self, event_id, target, outcome):
            self.outcomes.append(outcome)

    store, stop = Marks(), threading.Event()
    worker = TargetWorker(Refusing(), store, retry_for=0.5, retry_max=10.0,
                          stop_event=stop)
    worker.backoff = Backoff(first=0.01, cap=10.0)
    (decision,) = Decider(NOTIFY_ON["all"]).add(chain(["failed"]))
    event = build_event(decision, "/r", None, ["refusing"])
    event["created"] = time.time() - 0.3   # a few quick retries, then given up
    worker.thread.start()
    try:
        worker.submit(event)
        wait_until(lambda: store.outcomes == ["gave_up"] and worker.backoff.current == 0.01,
                   10, what="the event given up and the backoff reset")
    finally:
        stop.set()
        worker.wake()
        worker.thread.join(5)


def test_a_pruned_predecessor_still_judges_the_next_result_after_compaction(tmp_path):
    """--keep-results pruned A while B (after A) was still running, and
    the notification journal's compaction let A go (its file was gone):
    B's failure was judged alone, its "broken" never sent, and C after it
    was told "fixed" for a break nobody heard of."""
    from ci.retention.tombstones import FILE_NAME, Tombstone, TombstoneFile
    results, state = str(tmp_path / "results"), str(tmp_path / "state")
    os.makedirs(results)
    os.makedirs(state)
    p, a, b, c = chain(["passed", "passed", "failed", "passed"])
    command, out = recorder(tmp_path)
    pending = {b.commit}
    notifier = Notifier(state, results, [CommandTarget(command.split(), 10)],
                        Options(NOTIFY_ON["change"], retry_max=0.2))
    notifier.start(lambda commit: commit in pending)
    try:
        for result in (p, a, c):            # c finished first: it waits for b
            notifier.result_written(result.commit, write_result(results, result))
        wait_until(lambda: notifier.decider.waiting() == {c.commit: b.commit}, 10,
                   what="c waiting for b")
        # The pruner: a's tombstone, then its file; then a compaction.
        TombstoneFile(os.path.join(state, FILE_NAME)).append(
            [Tombstone(a.commit, "passed", 0.0, 0.0, p.commit, "main")])
        os.unlink(os.path.join(results, a.commit))
        notifier.store.compact(lambda commit: os.path.exists(os.path.join(results, commit)))
        assert a.commit not in notifier.store.judged
        pending.discard(b.commit)
        notifier.result_written(b.commit, write_result(results, b))
        wait_until(lambda: len(recorded(out)) >= 2, 10, what="broken and fixed")
    finally:
        notifier.stop()
    assert [(r["CI_EVENT"], r["CI_COMMIT"]) for r in recorded(out)] == \
        [("broken", b.commit), ("fixed", c.commit)]
