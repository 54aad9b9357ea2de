"""The notification journal: every decision and every delivery, append-only,
in the dispatcher's state folder, so that no event is lost or sent twice
when a process dies.

An event to send is fsynced before anyone tries to send it; a delivery is
marked after a 2xx answer or exit status 0.  Replayed at start, it gives
the decider back what it had decided and the workers what they had not
delivered yet.  Compacted in place (an atomic rewrite) once it holds far
more lines than that state needs.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Callable

from ci.notify.events import EVENT_KEYS
from ci.appendlog import AppendLog
from ci.files import whole_lines

log = logging.getLogger(__name__)

# The journal is rewritten once it holds this many more records than needed.
COMPACT_SLACK = 1000
JOURNAL_NAME = "notifications.journal"


class EventStore:
    """The notification journal: JSON lines, append-only.

    ``{"j": commit, "v": verdict, "n": n, "k": kind, "e": event|null}``
    records a decision; ``{"ok": id, "t": target}`` a delivery and
    ``{"gave_up": id, "t": target}`` a target given up on; ``{"q":
    "<entry id>:<event>", "e": event|null}`` a land queue event taken
    (``queue_seen``: so the same one told again, even after a restart, is
    not sent again).  A torn last line is skipped, and cut off by ``open``
    (a record appended after it would be lost with it).  ``records`` counts
    lines so the owner knows when to compact.  ``judged`` is the decider's
    map (commit -> (verdict, n)).

    The lock guards the file handle and the pending maps: delivery threads
    mark events while the decision thread appends and compacts."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self.judged: dict[str, tuple[str, int]] = {}
        self.events: dict[str, dict] = {}       # id -> undelivered event, in order
        self.remaining: dict[str, set[str]] = {}  # id -> targets still to deliver to
        # Land queue events taken, oldest first ("<entry id>:<event>" -> None).
        self.queue_seen: dict[str, None] = {}
        self.records = 0   # read at load, then counted by the file
        self._log = AppendLog(path)

    def load(self) -> bool:
        """Replay the journal; False if there was none."""
        if not os.path.exists(self.path):
            return False
        for raw in whole_lines(self._log.read()):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                log.warning("skipped an unreadable journal line")
                continue
            if not isinstance(record, dict):
                continue
            self.records += 1
            self._apply(record)
        self._log.records = self.records
        return True

    def _apply(self, record: dict) -> None:
        """One record's effect on the maps; a malformed one is ignored, as
        replay must get past anything a torn or old write left."""
        if "j" in record:
            commit = record["j"]
            try:
                self.judged[commit] = (str(record.get("v", "")), int(record.get("n", 0)))
            except (TypeError, ValueError):
                return
            self._take_event(record.get("e"))
        elif "q" in record:
            if isinstance(record["q"], str):
                self.queue_seen[record["q"]] = None
                self._take_event(record.get("e"))
        elif "ok" in record or "gave_up" in record:
            event_id = record.get("ok") or record.get("gave_up")
            if event_id in self.remaining:
                self.remaining[event_id].discard(record.get("t"))
                self._settle(event_id)

    def _take_event(self, event) -> None:
        """An event to deliver, from a decision or queue record."""
        if isinstance(event, dict) and EVENT_KEYS <= event.keys() and isinstance(
                event["targets"], list) and isinstance(event["created"], (int, float)):
            self.events[event["id"]] = event
            self.remaining[event["id"]] = set(event.get("targets", []))
            self._settle(event["id"])

    def seen(self, key: str) -> bool:
        """Was this land queue event (``<entry id>:<event>``) taken before?"""
        with self.lock:
            return key in self.queue_seen

    def _settle(self, event_id: str) -> None:
        if not self.remaining.get(event_id):
            self.remaining.pop(event_id, None)
            self.events.pop(event_id, None)

    def open(self) -> None:
        self._log.open()

    def append(self, records: list[dict], sync: bool) -> None:
        """Write records (and apply them); with ``sync`` they are on disk
        when this returns."""
        if not records:
            return
        data = _encode(records)
        with self.lock:
            self._log.append(data, len(records), sync)
            for record in records:
                self._apply(record)
            self.records = self._log.records

    def mark(self, event_id: str, target: str, outcome: str = "ok") -> None:
        """``target`` is done with the event: ``ok`` or ``gave_up``."""
        self.append([{outcome: event_id, "t": target}], sync=True)

    def pending(self) -> list[dict]:
        """The undelivered events, oldest first, each naming only the
        targets it still has to reach."""
        with self.lock:
            return self._undelivered()

    def _undelivered(self) -> list[dict]:
        """``pending`` for a caller that holds the lock."""
        return [dict(e, targets=sorted(self.remaining[i])) for i, e in self.events.items()]

    def should_compact(self) -> bool:
        with self.lock:
            return self.records > 2 * (len(self.judged) + len(self.events) +
                                       len(self.queue_seen)) + COMPACT_SLACK

    def compact(self, keep: Callable[[str], bool] = lambda commit: True) -> None:
        """Atomically rewrite the journal with what is still needed: the
        last decision per commit (dropping commits ``keep`` refuses, e.g.
        whose result file is gone) and the undelivered events."""
        with self.lock:
            for commit in [c for c in self.judged if not keep(c)]:
                del self.judged[commit]
            # Undelivered events first (they outlive their result file's
            # removal), then the last decision per commit, which wins on replay.
            # A land queue event is no decision: it keeps its own record (a
            # "j" one would pass its commit off as judged).
            undelivered = self._undelivered()
            queue_keys = {e["id"]: f"{e['queue_id']}:{e['event']}" for e in undelivered
                          if "queue_id" in e}
            lines = [{"q": queue_keys[e["id"]], "e": e} if e["id"] in queue_keys else
                     {"j": e["commit"], "v": e["verdict"], "n": 0, "e": e}
                     for e in undelivered]
            waiting = set(queue_keys.values())
            lines.extend({"q": key} for key in self.queue_seen if key not in waiting)
            lines.extend({"j": commit, "v": verdict, "n": n}
                         for commit, (verdict, n) in self.judged.items())
            self._log.rewrite(_encode(lines), len(lines))
            self.records = len(lines)

    def close(self) -> None:
        try:
            self._log.close()
        except OSError:
            log.exception("cannot flush the journal")


def _encode(records: list[dict]) -> bytes:
    """Journal lines, one record each: JSON escapes a newline inside a
    string, so a record can never span two lines."""
    return b"".join(json.dumps(r, ensure_ascii=True).encode() + b"\n" for r in records)
