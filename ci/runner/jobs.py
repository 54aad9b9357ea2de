"""The runner's job state: the one job it holds, as ``runtest`` handed
it (``RunnerJob``, not the dispatcher's ``journal.Assignment``), and the
condition the request handlers, the worker and the stop path share."""

from __future__ import annotations

import dataclasses
import threading

from ci import jobspec
from ci.runner import environments
from ci.wire import Message, Reply, TOKEN_RE, valid_full_commit


@dataclasses.dataclass
class RunnerJob:
    """A job this runner holds: the commit to test, the dispatcher's token
    for it (proof that a result or a ``release`` is for this very job),
    and the rest of what ``runtest`` said (its shard, branch and trust,
    matrix cell, tests to run first, quarantine rules: ci/jobspec.py)."""
    commit: str
    token: str
    spec: jobspec.JobSpec = jobspec.JobSpec()

    @property
    def scope(self) -> environments.Scope:
        return environments.job_scope(self.spec.branch, self.spec.trusted, self.commit)


def parse_runtest(message: Message) -> RunnerJob:
    """The job a ``runtest`` hands us; Reply with the reason if malformed.
    A full commit id only: the result of a job named by a short one could
    never be reported (results name full ids), and was dropped after the run."""
    parts = message.argument.split(" ")
    if len(parts) != 2 or not valid_full_commit(parts[0]) \
            or not TOKEN_RE.fullmatch(parts[1]):
        raise Reply("usage: runtest:<full commit id> <token>")
    try:
        spec = jobspec.parse(message.body)
    except ValueError as exc:
        raise Reply(str(exc)) from None
    return RunnerJob(parts[0], parts[1], spec)


# What RunnerState.take hands the worker when it should fetch, not test.
PREFETCH = "prefetch"


class RunnerState:
    """The one job this runner holds, guarded by one condition shared by the
    request handlers (``runtest``), the worker and the stop path."""

    def __init__(self):
        self.cond = threading.Condition()
        self.current: RunnerJob | None = None
        self.pending: RunnerJob | None = None
        self.fetch_wanted = False  # a push was announced: fetch while idle
        self.stopping = False

    def want_fetch(self) -> bool:
        """Ask the worker to fetch now, unless it holds a job (whose
        checkout fetches anyway).  Repeated asks before it starts are one."""
        with self.cond:
            if self.stopping or self.current is not None:
                return False
            self.fetch_wanted = True
            self.cond.notify_all()
            return True

    def offer(self, assignment: RunnerJob) -> bool:
        with self.cond:
            if self.stopping or self.current is not None:
                return False
            self.current = self.pending = assignment
            self.cond.notify_all()
            return True

    def take(self) -> RunnerJob | str | None:
        """Block the worker until a job arrives (None when stopping), or
        return ``PREFETCH`` when a fetch is wanted and no job is waiting.
        A job that arrives during a prefetch waits for it (the two must not
        run git in the clone at once) and then finds its commit there."""
        with self.cond:
            while self.pending is None and not self.fetch_wanted and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return None
            wanted, self.fetch_wanted = self.fetch_wanted, False
            if self.pending is None and wanted:
                return PREFETCH
            job, self.pending = self.pending, None
            return job

    def finish(self) -> None:
        """The job is reported (or dropped): take the next."""
        with self.cond:
            self.current = None

    def busy_with(self) -> str | None:
        with self.cond:
            return self.current.commit if self.current else None

    def current_job(self) -> RunnerJob | None:
        with self.cond:
            return self.current

    def stop(self) -> RunnerJob | None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            return self.current
