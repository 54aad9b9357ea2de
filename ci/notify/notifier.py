"""The notifier: what the dispatcher holds to tell people when a branch
breaks and when it is fixed, exactly once each, in the branch's commit
order, without losing any when a process dies.

It ties the other modules together: the dispatcher's non-blocking
``result_written`` feeds a decision thread, which runs the ``Decider``
(``decider.py``), journals each decision in the ``EventStore``
(``store.py``) before anyone is told, and hands the events to one
``TargetWorker`` per target (``worker.py``, ``targets.py``).  At start it
replays the journal: undelivered events are sent again, and results
written while nothing decided them (a crash in between) are decided then,
from the result files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from typing import Callable

from ci import results as result_files  # (the module; "results" names lists here)
from ci.notify.decider import (DEFAULT_NOTIFY_ON, NOTIFY_ON, PENDING, UNKNOWN, Decider,
                               Decision, Result, result_from_fields)
from ci.notify.events import EarlyFailure, build_event, early_event, short_id
from ci.notify.queue_events import QueueEvent, build_queue_event
from ci.notify.store import JOURNAL_NAME, EventStore
from ci.notify.worker import DEFAULT_RETRY_FOR, DEFAULT_RETRY_MAX, TargetWorker
from ci.outcome import Outcome
from ci.retention import tombstones
from ci.retention.tombstones import TombstoneFile
from ci.wire import valid_full_commit

log = logging.getLogger(__name__)


class NotReady(Exception):
    """The notifier cannot take a land queue event yet (starting up)."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What the flags choose beside the targets: the kinds announced, the
    link given with each event, and how long and how far apart a receiver
    is retried."""
    kinds: frozenset = NOTIFY_ON[DEFAULT_NOTIFY_ON]
    dashboard_url: str | None = None
    retry_for: float = DEFAULT_RETRY_FOR
    retry_max: float = DEFAULT_RETRY_MAX


def read_result(results_dir: str, commit: str) -> Result | None:
    """The result file's header as a Result, or None if it is missing or
    unreadable."""
    if not valid_full_commit(commit):
        return None
    fields = result_files.read_header(os.path.join(results_dir, commit))
    return None if fields is None else result_from_fields(commit, fields)


class Notifier:
    """Owns the decider, the store and the delivery workers.

    The dispatcher calls ``result_written`` (it only queues) after each
    result file is on disk; everything else runs on the notifier's own
    threads."""

    def __init__(self, state_dir: str, results_dir: str, targets: list,
                 options: Options = Options()):
        self.results_dir = results_dir
        self.dashboard_url = options.dashboard_url
        self.store = EventStore(os.path.join(state_dir, JOURNAL_NAME))
        # The dispatcher's, in the same state folder (read only here).
        self.tombstones = TombstoneFile(os.path.join(state_dir, tombstones.FILE_NAME))
        self.decider = Decider(options.kinds)
        self.decider.judged = self.store.judged
        self.targets = targets
        self.stop_event = threading.Event()
        self.workers = {t.key: TargetWorker(t, self.store, options.retry_for,
                                            options.retry_max, self.stop_event)
                        for t in targets}
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.is_pending: Callable[[str], bool] = lambda commit: False
        # Result files present when a first journal is made (see _recover).
        self.baseline: set[str] | None = None
        self.thread = threading.Thread(target=self._run, name="notify-decide", daemon=True)
        # Set once the journal is replayed: only then is a land queue event
        # told twice recognisable.
        self.ready = threading.Event()
        self._queue_lock = threading.Lock()

    # ---- called by the dispatcher ---------------------------------------
    def start(self, is_pending: Callable[[str], bool] | None = None) -> None:
        """``is_pending(commit)``: is that commit queued or running (so its
        result will come)?  Without it, a missing result counts as unknown."""
        if is_pending is not None:
            self.is_pending = is_pending
        if not os.path.exists(self.store.path):
            # Listed now, before the dispatcher can write a result, so that a
            # result written while the list is read is never taken for an old one.
            self.baseline = set(self._result_names())
        for worker in self.workers.values():
            worker.thread.start()
        self.thread.start()

    def result_written(self, commit: str, outcome: Outcome) -> None:
        """Never blocks: the decision is made on the notifier's thread.

        Only the result file's header, in its order (the outcome's per-test
        records are not header values): an event made now must equal the
        one a restart makes from the file."""
        self.inbox.put((commit, dict(outcome.header)))

    def failing_now(self, commit: str, branch: str | None, test: str, after: float) -> None:
        """A running commit's first test failed (the dispatcher tells this
        once per run): with ``--notify-on early``, an early event.  Never
        blocks.  Not a decision: the decider, and so the one broke/fixed
        event of the result, is not touched; not journalled either (a run
        cut off by a restart runs again and tells again, same event id)."""
        if "first-failure" in self.decider.kinds:
            self.inbox.put(("first-failure", commit, branch, test, after))

    def queue_event(self, event: QueueEvent, wait: float = 5.0) -> str:
        """A land queue event from the observer: journalled (fsynced) and
        handed to the workers, once per (entry id, event) however often it
        is told.  Returns ``taken``, ``duplicate`` or ``not announced``
        (its kind is not in --notify-on: remembered, not sent); raises
        NotReady while the journal is still being replayed and OSError
        when it cannot be written (the observer tries again later)."""
        if not self.ready.wait(wait):
            raise NotReady("the notifier is still reading its journal")
        with self._queue_lock:
            if self.store.seen(event.key):
                log.info("queue event %s of %s told again: already taken", event.key,
                         event.branch)
                return "duplicate"
            record = None
            if event.event in self.decider.kinds:
                record = build_queue_event(event, self.dashboard_url, list(self.workers))
            self.store.append([{"q": event.key, "e": record}], sync=True)
        log.info("queue event: %s %s into %s (entry %d)%s", event.branch, event.event,
                 event.target, event.id, f", event {short_id(record)}" if record
                 else " (not announced)")
        if record is None:
            return "not announced"
        for worker in self.workers.values():
            worker.submit(record)
        return "taken"

    def stop(self, timeout: float = 3.0) -> None:
        """Stop every thread within about ``timeout`` and close the journal."""
        self.stop_event.set()
        self.inbox.put(None)
        for worker in self.workers.values():
            worker.wake()
        # A delivery in progress may finish (and be marked) within the
        # timeout; one that does not is ended and sent again next start.
        deadline = time.monotonic() + timeout
        self.thread.join(max(0.1, deadline - time.monotonic()))
        for worker in self.workers.values():
            worker.thread.join(max(0.1, deadline - time.monotonic()))
            if worker.thread.is_alive():
                worker.target.abort()
                worker.thread.join(0.5)
        self.store.close()

    # ---- the decision thread ---------------------------------------------
    def _run(self) -> None:
        try:
            self._recover()
        except Exception:
            log.exception("start-up replay failed; deciding new results only")
            try:
                self.store.open()
            except OSError:
                log.exception("cannot open the journal")
        self.ready.set()
        while not self.stop_event.is_set():
            batch = self._take_batch()
            if self.stop_event.is_set():
                return
            for early in (EarlyFailure(*item[1:]) for item in batch if len(item) == 5):
                self._tell_early(early)
            results = [r for r in (result_from_fields(c, f) for c, f in
                                   (item for item in batch if len(item) == 2)) if r]
            try:
                self._process(results)
            except Exception:
                log.exception("deciding %d result(s) failed", len(results))

    def _take_batch(self) -> list[tuple[str, dict]]:
        """Wait for the inbox, then take all it holds, up to a stop's None:
        a burst of results is decided (and journalled) as one."""
        batch = []
        item = self.inbox.get()
        while item is not None:
            batch.append(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
        return batch

    def _recover(self) -> None:
        """Rebuild the decision state: the journal says which verdict of
        which commit was decided (and which events are undelivered); the
        result files say what exists.  A result file whose verdict the
        journal does not hold was written but never decided (a crash in
        between, or a retest): it is decided now.  A commit whose result
        waited for its predecessor was never journalled, so it is found the
        same way and waits again."""
        if self.store.load():
            self.store.open()
        else:
            self._adopt_baseline()
        pending = self.store.pending()
        for event in pending:
            self._resubmit(event)
        unseen = self._undecided()
        log.info("%d undelivered event(s) to retry, %d result(s) to decide",
                 len(pending), len(unseen))
        self._process(unseen)

    def _adopt_baseline(self) -> None:
        """First start with notifications: results from before it count as
        announced, or every old result would be sent at once."""
        for name in self.baseline or ():
            result = read_result(self.results_dir, name)
            if result:
                self.store.judged[name] = (result.verdict, 0)
        self.store.compact()
        log.info("new notification journal; %d existing result(s) taken as announced",
                 len(self.store.judged))

    def _resubmit(self, event: dict) -> None:
        """An undelivered event from the journal, to each target it still
        has to reach."""
        for key in event["targets"]:
            if key in self.workers:
                self.workers[key].submit(event)
            else:
                # That receiver was removed from the flags: nobody to send to.
                log.warning("notification %s: target %s is no longer configured; "
                            "dropped", short_id(event), key)
                self.store.mark(event["id"], key, "gave_up")

    def _undecided(self) -> list[Result]:
        """Results with a branch whose verdict the journal does not hold,
        oldest first, so results of one branch enter in roughly their order
        (the decider orders them exactly anyway)."""
        unseen = []
        for name in self._result_names():
            known = self.store.judged.get(name)
            result = read_result(self.results_dir, name)
            if result and result.branch and (known is None or known[0] != result.verdict):
                unseen.append(result)
        unseen.sort(key=lambda r: self._mtime(r.commit))
        return unseen

    def _result_names(self) -> list[str]:
        try:
            return [n for n in os.listdir(self.results_dir) if valid_full_commit(n)]
        except OSError:
            log.exception("cannot list %s", self.results_dir)
            return []

    def _result_path(self, commit: str) -> str:
        return os.path.join(self.results_dir, commit)

    def _mtime(self, commit: str) -> float:
        try:
            return os.stat(self._result_path(commit)).st_mtime
        except OSError:
            return 0.0

    def _lookup(self, commit: str):
        # Pending first: a commit finishing right now is written before it
        # stops being pending, so "not pending" means its file is final.
        if self.is_pending(commit):
            return PENDING
        found = read_result(self.results_dir, commit)
        if found is not None:
            return found
        # Pruned (--keep-results): its tombstone keeps the verdict.  Without
        # it, once the journal's compaction let the commit go, the commit
        # after it was judged alone, and its "broken" was never sent.  No
        # branch: the verdict is used, the commit never decided again.
        stone = self.tombstones.find(commit)
        return Result(commit, None, None, stone.verdict) if stone is not None else UNKNOWN

    def _process(self, results: list[Result]) -> None:
        """Decide, journal (durably, before any receiver is tried), then
        hand the events to the workers."""
        if not results:
            return
        records = [self._record(d) for d in self.decider.add(results, self._lookup)]
        events = [r["e"] for r in records if r["e"]]
        if self.decider.waiting():
            log.debug("waiting for earlier commits: %s",
                      {c[:12]: p[:12] for c, p in self.decider.waiting().items()})
        try:
            self.store.append(records, sync=bool(events))
        except (OSError, ValueError):
            # Sent anyway; after a crash the same decisions are made again
            # from the result files, with the same ids.
            log.exception("cannot journal %d decision(s)", len(records))
        for event in events:
            for worker in self.workers.values():
                worker.submit(event)
        if self.store.should_compact():
            try:
                self.store.compact(lambda c: os.path.exists(self._result_path(c)))
            except OSError:
                log.exception("cannot compact the journal")

    def _tell_early(self, failure: EarlyFailure) -> None:
        """Hand a first-failure event to every worker."""
        event = early_event(failure, self.dashboard_url, list(self.workers))
        log.info("%s on %s: first failing test while running, event %s", failure.commit[:12],
                 failure.branch, short_id(event))
        for worker in self.workers.values():
            worker.submit(event)

    def _record(self, decision: Decision) -> dict:
        """The journal record of one decision, with its event if announced."""
        event = None
        if decision.announce:
            event = build_event(decision, self.results_dir, self.dashboard_url,
                                list(self.workers))
        log.info("%s on %s is %s%s%s", decision.result.commit[:12],
                 decision.result.branch, decision.kind, " (retest)" if decision.retest
                 else "", f", event {short_id(event)}" if event else " (not announced)")
        return {"j": decision.result.commit, "v": decision.result.verdict,
                "n": decision.n, "k": decision.kind, "e": event}
