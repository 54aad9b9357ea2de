"""What a running job says while it runs: its live output tail (``progress``,
the dashboard's ``log``) and its first failing test (``failing``).

``LiveOutput`` is a part of ``DispatcherState`` (ci/dispatch/state.py)."""

from __future__ import annotations

import logging

from ci.dispatch.work import WorkState
from ci.wire import Reply

log = logging.getLogger(__name__)

# Live output kept per running job for ``log``.
TAIL_BYTES = 64 * 1024


class LiveOutput:
    """Mixed into ``DispatcherState``: its lock and work table (see there
    for the locking rule)."""

    def progress(self, commit: str, token: str, name: str | None, data: bytes) -> None:
        with self.cond:
            work = self._work(commit, token)
            job = work.current_job(token) if work else None
            if not job or (name is not None and job.name != name):
                raise Reply(f"progress for {commit[:12]} refused: not the current assignment")
            work.tail += data[-TAIL_BYTES:]
            if len(work.tail) > TAIL_BYTES:
                del work.tail[:len(work.tail) - TAIL_BYTES]

    def first_failure(self, commit: str, token: str, name: str | None, test: str,
                      after: float) -> bool:
        """A running job's tests just had their first failure: kept for
        the ``state`` view and put in the live output; True the first time
        for this commit's run (a second shard's, or a resend, changes
        nothing), when the early listeners are told (outside the lock)."""
        with self.cond:
            work = self._work(commit, token)
            job = work.current_job(token) if work else None
            if not job or (name is not None and job.name != name):
                raise Reply(f"failing for {commit[:12]} refused: not the current assignment")
            if work.failing is not None:
                return False
            work.failing = (test, after)
            line = f"\n[ci] first failing test: {test} (after {after:.1f}s)\n"
            work.tail += line.encode("utf-8", "replace")
            if len(work.tail) > TAIL_BYTES:
                del work.tail[:len(work.tail) - TAIL_BYTES]
            meta = work.meta
        for listener in self.failing_listeners:
            try:
                listener(commit, meta.branch if meta else None, test, after)
            except Exception:
                log.exception("failing listener failed for %s", commit[:12])
        return True

    def log_tail(self, commit: str) -> bytes | None:
        """The live output of a running commit; None when it is not running."""
        with self.cond:
            live = [w for w in (self.work.get(k) for k in self._keys_of(commit))
                    if w and (w.state is WorkState.RUNNING or w.shards is not None)]
            if not live:
                return None
            return b"".join(bytes(w.tail) for w in live)
