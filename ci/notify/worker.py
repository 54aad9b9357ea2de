"""Delivery workers: one thread per target sends that target's events in
order, each retried with exponential backoff until it is delivered or
older than ``--notify-retry-for``, so a slow or dead receiver only ever
delays its own messages, never another receiver's, dispatching or result
writing.  Every outcome is marked in the journal.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from ci.notify.events import describe, short_id
from ci.notify.store import EventStore
from ci.notify.targets import DeliveryError
from ci.backoff import Backoff

log = logging.getLogger(__name__)

# Receivers are retried this long after an event was made (a chat service's
# outage or a mail server's maintenance window usually ends well within it).
DEFAULT_RETRY_FOR = 4 * 3600.0
# The longest wait between two tries of one receiver.
DEFAULT_RETRY_MAX = 300.0


class TargetWorker:
    """One thread per target: its events in order, each retried with
    exponential backoff until delivered or older than ``retry_for``."""

    def __init__(self, target, store: EventStore, retry_for: float, retry_max: float,
                 stop_event: threading.Event):
        self.target = target
        self.store = store
        self.retry_for = retry_for
        self.backoff = Backoff(first=min(1.0, retry_max), cap=retry_max)
        self.stop_event = stop_event
        self.cond = threading.Condition()
        self.queue: collections.deque[dict] = collections.deque()  # guarded by cond
        self.thread = threading.Thread(target=self._run, name=f"notify-{target.key[:20]}",
                                       daemon=True)

    def submit(self, event: dict) -> None:
        """Queue an event behind the ones this target has not confirmed."""
        with self.cond:
            self.queue.append(event)
            self.cond.notify()

    def wake(self) -> None:
        """Let a stopping worker see the stop at once."""
        with self.cond:
            self.cond.notify_all()

    def _next(self) -> dict | None:
        with self.cond:
            while not self.queue and not self.stop_event.is_set():
                self.cond.wait(1.0)
            return None if self.stop_event.is_set() else self.queue[0]

    def _run(self) -> None:
        tries = 0
        while True:
            event = self._next()
            if event is None:
                return
            tries += 1
            try:
                self.target.deliver(event)
            except Exception as exc:
                if self._retry_later(event, tries, exc):
                    continue
                outcome = "gave_up"
            else:
                log.info("notification %s delivered to %s", describe(event),
                         self.target.label)
                outcome = "ok"
            self._done(event, outcome)
            # The next event starts from the first short delay, not from
            # where this one's retries left off.
            self.backoff.reset()
            tries = 0

    def _retry_later(self, event: dict, tries: int, exc: Exception) -> bool:
        """After a failed try: wait out the backoff and say True, or, once the
        event is older than ``retry_for``, log that it is given up and say
        False.  Every event is tried at least once in this process, so one
        that outlived a long outage still gets its chance."""
        if not isinstance(exc, DeliveryError):
            log.exception("notification %s to %s: unexpected failure", short_id(event),
                          self.target.label)
        age = time.time() - event["created"]
        if age > self.retry_for:
            log.error("notification %s to %s: giving up after %d tries over %.0fs: %s",
                      describe(event), self.target.label, tries, age, exc)
            return False
        delay = self.backoff.next()
        log.warning("notification %s to %s failed (try %d): %s; again in %.1fs",
                    short_id(event), self.target.label, tries, exc, delay)
        self.stop_event.wait(delay)
        return True

    def _done(self, event: dict, outcome: str) -> None:
        """Mark the event, then let the next one go."""
        try:
            self.store.mark(event["id"], self.target.key, outcome)
        except (OSError, ValueError):
            # Not marked: it is sent again after a restart, with the same id.
            log.exception("cannot journal the %s mark of %s", outcome, short_id(event))
        with self.cond:
            if self.queue and self.queue[0] is event:
                self.queue.popleft()
