"""The dashboard's view of the dispatcher: its ``state`` and ``log:``
replies over the signed protocol, checked and cached briefly, so that a
page load costs at most one call and a dispatcher that is down or hangs
never takes the pages down with it."""

from __future__ import annotations

import json
import logging
import threading
import time

from ci import state_schema
from ci.dashboard import index as dashboard_index
from ci.wire import ProtocolError, format_address, one_line

log = logging.getLogger("dashboard")

# Live state is at most this old (seconds): every page and poll within it
# shares one dispatcher call.
STATE_TTL = 1.0
LOG_TTL = 0.5
# A dispatcher call must not hold a page up for long.
CALL_TIMEOUT = 1.0
# A failed call is not retried for this long (seconds), so a dead or
# hanging dispatcher costs one timeout per interval, not one per request.
FAILURE_TTL = 2.0


def normalize_state(data) -> dict:
    """The dashboard's view of a ``state`` reply, read through the shared
    schema (ci/state_schema.py: only its keys, each value checked and
    capped): plain dicts for the pages and /api/status, the held commits
    shown among the running ones, one row per commit."""
    state = state_schema.State.from_json(data)
    held = [state_schema.RunningJob(h.commit, h.branch, "waiting for " + (h.runner or "?"),
                                    cell=h.cell)
            for h in state.held]
    return {"queue": [j.to_json() for j in state.queue],
            "running": _one_per_commit([j.to_json() for j in state.running + held]),
            "runners": [r.to_json() for r in state.runners],
            "counts": state.counts}


def without_finished(state: dict | None, finished_of) -> dict | None:
    """The state without the running commits whose result has landed
    since they started (``finished_of(commit)``: the result's finish time,
    None if there is none).  The state is cached for a second, the results
    folder is read at once: a commit would otherwise show as done and
    running side by side.  A retest of a commit with an older result still
    runs.  A job started ``elapsed`` seconds before the state's wall-clock
    ``fetched`` time."""
    if not state or not state.get("running"):
        return state
    fetched = state.get("fetched")

    def done(job) -> bool:
        finished = finished_of(job["commit"])
        return finished is not None and fetched is not None \
            and job.get("elapsed") is not None and finished >= fetched - job["elapsed"]
    running = [j for j in state["running"] if not done(j)]
    return state if len(running) == len(state["running"]) else dict(state, running=running)


def _one_per_commit(running: list[dict]) -> list[dict]:
    """A sharded commit runs on several runners at once: one row for it,
    naming them all (each with its shard), with the longest elapsed time."""
    rows: dict = {}
    for job in running:
        if job["shard"]:
            job["runner"] = f"{job['runner'] or '?'} (shard {job['shard']})"
        row = rows.get(job["commit"])
        if row is None:
            rows[job["commit"]] = job
            continue
        row["runner"] = ", ".join(r for r in (row["runner"], job["runner"]) if r)
        row["shard"] = ", ".join(s for s in (row["shard"], job["shard"]) if s) or None
        if job.get("cell"):
            row["cell"] = ", ".join(c for c in (row.get("cell"), job["cell"]) if c)
        if job["elapsed"] is not None:
            row["elapsed"] = max(row["elapsed"] or 0.0, job["elapsed"])
    return list(rows.values())


class LiveState:
    """The dispatcher's ``state`` and ``log:`` replies, cached briefly.

    ``_data_lock`` guards the cached state; ``_state_lock`` is held by the
    one request that is asking the dispatcher, so there is never more than
    one state call in flight.  ``_log_lock`` serialises log calls (a
    commit's page polls once a second; they are cached per commit)."""

    def __init__(self, address, call, timeout: float = CALL_TIMEOUT):
        # ``call(address, command, argument, timeout=(connect, reply))``
        # returns the reply Message: the entry point passes the signed
        # client call (helpers.call with its security settings), so this
        # module needs neither the server side nor the keys.
        self.address = address
        self.call = call
        self.timeout = timeout
        self._state_lock = threading.Lock()
        self._data_lock = threading.Lock()
        self._state: dict | None = None
        self._state_error: str | None = "waiting for its first answer"
        self._state_at = float("-inf")
        self._state_ttl = STATE_TTL
        self._log_lock = threading.Lock()
        self._logs: dict[str, tuple[float, tuple]] = {}

    def _call(self, command: str, argument: str = ""):
        return self.call(self.address, command, argument,
                         timeout=(self.timeout, self.timeout * 2))

    def state(self) -> tuple[dict | None, str | None]:
        """(state, None) or (None, reason it is unavailable).  While one
        request asks the dispatcher, the others get the last answer
        instead of waiting behind it (a hanging dispatcher slows one
        request per interval, not every page)."""
        with self._data_lock:
            if time.monotonic() - self._state_at < self._state_ttl:
                return self._state, self._state_error
        if not self._state_lock.acquire(blocking=False):
            with self._data_lock:
                return self._state, self._state_error
        try:
            with self._data_lock:  # another request may just have refreshed it
                if time.monotonic() - self._state_at < self._state_ttl:
                    return self._state, self._state_error
            state, error = self._ask_state()
            with self._data_lock:
                self._state, self._state_error = state, error
                self._state_ttl = FAILURE_TTL if error else STATE_TTL
                self._state_at = time.monotonic()
                return state, error
        finally:
            self._state_lock.release()

    def _ask_state(self) -> tuple[dict | None, str | None]:
        state, error = None, None
        try:
            reply = self._call("state")
            if reply.command == "ok":
                state = normalize_state(json.loads(reply.body.decode("utf-8")))
                # Wall clock, to compare a job's start with a result's finish.
                state["fetched"] = time.time()
            elif "unknown command" in reply.argument:
                error = "the dispatcher does not know the 'state' command (older version)"
            else:
                error = f"the dispatcher refused: {reply.command} {reply.argument}"
        except OSError as exc:
            error = f"cannot reach the dispatcher at " \
                    f"{format_address(self.address)} ({exc.strerror or exc})"
        except ProtocolError as exc:
            error = f"bad reply from the dispatcher ({exc})"
        except (ValueError, UnicodeDecodeError) as exc:
            error = f"unreadable state from the dispatcher ({exc})"
        except Exception as exc:
            # A reply shape normalize_state did not foresee must cost the
            # pages their live part only, never an error page.
            log.exception("cannot read the dispatcher's state")
            error = f"unreadable state from the dispatcher ({type(exc).__name__}: {exc})"
        if error:
            log.debug("live state unavailable: %s", error)
            error = one_line(error, 300)
        return state, error

    def log(self, commit: str) -> tuple[str, str]:
        """(``running``, tail) / (``idle``, "") / (``unavailable``, reason)."""
        with self._log_lock:
            now = time.monotonic()
            cached = self._logs.get(commit)
            if cached and now - cached[0] < LOG_TTL:
                return cached[1]
            try:
                reply = self._call("log", commit)
                if reply.command == "ok" and reply.argument == "running":
                    answer = ("running", dashboard_index.strip_ansi(
                        reply.body.decode("utf-8", "replace")))
                elif reply.command == "ok":
                    answer = ("idle", "")
                else:
                    answer = ("unavailable", one_line(reply.argument, 200))
            except (OSError, ProtocolError) as exc:
                answer = ("unavailable", one_line(str(exc), 200))
            if len(self._logs) >= 64:
                self._logs.pop(min(self._logs, key=lambda c: self._logs[c][0]))
            self._logs[commit] = (time.monotonic(), answer)
            return answer
