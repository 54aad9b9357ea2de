"""The dashboard's view of the land queue (issue 22): the dispatcher's
``queue`` reply (the observer's latest snapshot), read back through the
same check the dispatcher made (ci/queue_snapshot.py) and cached briefly,
like the live state (ci/dashboard/live.py): a page load costs at most one
call a second, and a dispatcher that is down costs one timeout per
interval, never an error page."""

from __future__ import annotations

import logging
import threading
import time

from ci import queue_snapshot
from ci.wire import ProtocolError, format_address, one_line

log = logging.getLogger("dashboard")

TTL = 1.0
FAILURE_TTL = 2.0
CALL_TIMEOUT = 1.0


class QueueSource:
    """(snapshot, None) or (None, why it is unavailable), cached."""

    def __init__(self, address, call, timeout: float = CALL_TIMEOUT):
        # ``call``: as LiveState's, the signed client call (helpers.call).
        self.address = address
        self.call = call
        self.timeout = timeout
        self._lock = threading.Lock()       # one call in flight
        self._data_lock = threading.Lock()  # the cached answer
        self._answer: tuple[dict | None, str | None] = (None, "waiting for its first answer")
        self._at = float("-inf")
        self._ttl = TTL

    def get(self) -> tuple[dict | None, str | None]:
        with self._data_lock:
            if time.monotonic() - self._at < self._ttl:
                return self._answer
        if not self._lock.acquire(blocking=False):
            with self._data_lock:   # another request is asking: its last answer
                return self._answer
        try:
            answer = self._ask()
            with self._data_lock:
                self._answer, self._at = answer, time.monotonic()
                self._ttl = FAILURE_TTL if answer[1] else TTL
            return answer
        finally:
            self._lock.release()

    def _ask(self) -> tuple[dict | None, str | None]:
        error = None
        try:
            reply = self.call(self.address, "queue", "",
                              timeout=(self.timeout, self.timeout * 2))
            if reply.command == "ok":
                if not reply.body.strip():
                    return queue_snapshot.empty(), None
                snapshot = queue_snapshot.parse_snapshot(reply.body)
                return snapshot, None
            if "unknown command" in reply.argument:
                error = "the dispatcher does not know the 'queue' command (older version)"
            else:
                error = f"the dispatcher refused: {reply.command} {reply.argument}"
        except OSError as exc:
            error = (f"cannot reach the dispatcher at {format_address(self.address)} "
                     f"({exc.strerror or exc})")
        except ProtocolError as exc:
            error = f"bad reply from the dispatcher ({exc})"
        except queue_snapshot.SnapshotError as exc:
            error = f"unreadable queue from the dispatcher ({exc})"
        except Exception as exc:
            log.exception("cannot read the dispatcher's queue")
            error = f"unreadable queue from the dispatcher ({type(exc).__name__})"
        log.debug("queue unavailable: %s", error)
        return None, one_line(error, 300)
