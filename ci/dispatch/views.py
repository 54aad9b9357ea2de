"""What the dispatcher's state shows: the ``status`` counts and the
``state`` reply (its schema: ci/state_schema.py).

``StateViews`` is a part of ``DispatcherState`` (ci/dispatch/state.py);
both methods take its lock.
"""

from __future__ import annotations

import collections
import itertools
import json
import time

from ci import state_schema
from ci.dispatch.runners import Runner
from ci.dispatch.work import WorkState


# Distinct reasons ``status`` names at most (the rest: "and N more").
MAX_REASONS = 10


def reason_counts(reasons) -> str:
    """``reason (count)`` for each distinct reason, most cells first, then
    in queue order; one line however many cells wait."""
    ordered = collections.Counter(reasons).most_common()     # ties: queue order
    text = "; ".join(f"{r} ({n})" for r, n in ordered[:MAX_REASONS])
    more = len(ordered) - MAX_REASONS
    return text + (f"; and {more} more" if more > 0 else "")


class StateViews:
    """Read-only views; mixed into ``DispatcherState``."""

    def status(self) -> dict:
        with self.cond:
            running = sum(w.state in (WorkState.RUNNING, WorkState.HELD)
                          or w.shards is not None for w in self.work.values())
            status = {"queued": len(self.queue), "running": running,
                      "runners": len(self.runners),
                      "idle_runners": sum(r.free for r in self.runners.values()),
                      "done": len(self.done), "completed": self.completed,
                      "pruned": len(self.pruned)}
            waiting = self._unroutable()
            if waiting:
                # Cells no registered runner can take: how many, why the
                # first waits, and every distinct reason with its count (a
                # matrix missing two kinds of runner says both; the cells
                # one by one are in ``state``).
                status["waiting"] = len(waiting)
                status["waiting_for"] = f"{waiting[0][0].key}: {waiting[0][1]}"
                status["waiting_reasons"] = reason_counts(reason for _, reason in waiting)
            return status

    def describe(self) -> bytes:
        """The ``state`` reply: queue, running jobs, held commits and
        runners as JSON."""
        now = time.monotonic()
        with self.cond:
            def branch(job):
                work = self.work.get(job.key)
                return work.branch if work else None

            def cell(job) -> str | None:
                work = self.work.get(job.key)
                return work.cell.name or None if work else None

            def queued(i: int, key) -> state_schema.QueueEntry:
                work = self.work[key]
                return state_schema.QueueEntry(work.commit, work.branch, i + 1,
                                               work.cell.name or None,
                                               self._waiting_reason(work))

            def failing(job):
                work = self.work.get(job.key)
                return work.failing[0] if work and work.failing else None

            def called(key: str, key_name: str | None) -> str:
                """Its own name, else its issued key's, else its address."""
                runner = self.runners.get(key)
                return (runner.given_name if runner else None) or key_name or key

            def busy_with(r: Runner) -> str | None:
                if r.job:
                    return r.job.commit
                return r.occupied_with if r.occupied_with not in (None, "unknown") else None

            state = state_schema.State(
                queue=[queued(i, k) for i, k in enumerate(itertools.islice(self.queue, 500))],
                running=[state_schema.RunningJob(
                    j.commit, branch(j), called(j.runner, j.name),
                    round(now - j.started, 1), f"{j.shard}/{j.shards}" if j.shards else None,
                    cell(j), failing=failing(j))
                    for j in self._live_jobs()],
                held=[state_schema.HeldCommit(w.commit, w.branch, w.held_by,
                                              w.cell.name or None)
                      for w in self._held()],
                runners=[state_schema.RunnerInfo(called(r.key, r.name), r.key, r.state,
                                                 busy_with(r), sorted(r.traits.labels),
                                                 r.traits.exclusive)
                         for r in self.runners.values()],
                # One snapshot: the counts agree with the lists (a re-entrant lock).
                counts=self.status())
        return json.dumps(state.to_json()).encode()
