"""The dispatcher: keeps the durable queue of commits to test, hands them to
free runners as soon as one is free, watches runners' health, and writes
each commit's verdict to ``<results-dir>/<commit>``.

Durability: every queued commit is appended (with fsync) to a journal
before ``dispatch`` is answered ``ok``; a result file is written atomically
and is itself the proof that a commit is done.  After a crash the journal
is replayed and every recorded commit without a result file is queued
again, those that were running first.

Which result wins: the first complete result to arrive for a commit.  A
later one (from a runner whose job was reassigned, or a duplicate
delivery) is acknowledged and dropped, so the file is never rewritten.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import math
import os
import re
import secrets
import sys
import threading
import time

import helpers
from helpers import Message, Reply

log = logging.getLogger(__name__)

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 8888
DEFAULT_RESULTS_DIR = "test_results"
# Often enough to notice a dead runner well within a test run.
DEFAULT_PING_INTERVAL = 5.0
DEFAULT_PING_MISSES = 3
# Dead runners must not stall the sweep: connect timeouts stay short.
DEFAULT_PING_TIMEOUT = 1.0
# Runners' default --timeout is 600 s; leave room for fetch and checkout.
DEFAULT_JOB_TIMEOUT = 900.0
DEFAULT_MAX_ATTEMPTS = 3
# Threads that send ``runtest`` and pings, so no runner can block another.
DEFAULT_WORKERS = 32
# The journal is rewritten once this many records are superseded.
COMPACT_AFTER = 10_000
MAX_COMMITS_PER_DISPATCH = 1000


# --------------------------------------------------------------------------
# The journal: append-only, one record a line, replayed at start.

class Journal:
    """Records ``Q`` (queued), ``A`` (assigned), ``L`` (run lost), ``D``
    (done) and ``R`` (test again although a result exists) per commit.  Only ``Q`` needs fsync before the reply; the others
    can be recomputed (an assignment is re-run, a result file proves done)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._handle = None
        self.records = 0

    def replay(self):
        """Return (queued in order, assigned set, lost counts, done set,
        commits whose retest was asked for and has no result yet)."""
        order: dict[str, None] = {}
        assigned: set[str] = set()
        lost: collections.Counter = collections.Counter()
        done: set[str] = set()
        retest: set[str] = set()
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            data = b""
        for raw in data.split(b"\n"):
            parts = raw.decode("ascii", "replace").split(" ")
            # A torn last line (crash mid-write) or junk is skipped.
            if len(parts) != 2 or not helpers.valid_full_commit(parts[1]):
                continue
            kind, commit = parts
            if kind == "Q":
                order.setdefault(commit)
            elif kind == "A":
                assigned.add(commit)
            elif kind == "L":
                lost[commit] += 1
            elif kind == "D":
                done.add(commit)
                retest.discard(commit)
            elif kind == "R":
                retest.add(commit)
        return list(order), assigned, lost, done, retest

    def rewrite(self, queued, assigned, lost, retest=frozenset()) -> None:
        """Atomically replace the journal with only what is still pending."""
        lines = []
        for commit in queued:
            lines.append(f"Q {commit}")
            if commit in retest:
                lines.append(f"R {commit}")
            if commit in assigned:
                lines.append(f"A {commit}")
            lines.extend(f"L {commit}" for _ in range(lost.get(commit, 0)))
        data = ("\n".join(lines) + "\n").encode() if lines else b""
        with self._lock:
            # Write first: if that fails, the old file and handle stay in
            # use; a closed handle would make every later append fail.
            helpers.atomic_write(self.path, data)
            if self._handle:
                self._handle.close()
            self._handle = open(self.path, "ab")
            self.records = len(lines)

    def append(self, records: list[str], sync: bool) -> None:
        if not records:
            return
        with self._lock:
            self._handle.write(("\n".join(records) + "\n").encode())
            self._handle.flush()
            if sync:
                os.fsync(self._handle.fileno())
            self.records += len(records)

    def close(self) -> None:
        with self._lock:
            if self._handle:
                self._handle.flush()
                os.fsync(self._handle.fileno())
                self._handle.close()
                self._handle = None


# --------------------------------------------------------------------------
# Shared state: one object, one condition.

@dataclasses.dataclass
class Runner:
    key: str
    address: tuple[str, int]
    instance: str
    job: Job | None = None
    # The runner is busy with work we did not give it (a reassigned or
    # pre-restart job); it is not offered anything until it says it is idle.
    busy_elsewhere: bool = False
    # A ``runtest`` could not be delivered; wait for a good ping.
    suspect: bool = False
    misses: int = 0

    @property
    def free(self) -> bool:
        return self.job is None and not self.busy_elsewhere and not self.suspect


@dataclasses.dataclass
class Job:
    commit: str
    job_id: str
    runner: str
    address: tuple[str, int]
    started: float


class DispatcherState:
    """Queue, runners, running jobs and finished commits.

    All containers are guarded by ``self.cond``; public methods take it,
    methods starting with ``_`` expect the caller to hold it.  Waiters
    (the assignment loop) are woken whenever a runner or a commit becomes
    available."""

    def __init__(self, results_dir: str, journal: Journal, max_attempts: int):
        self.results_dir = results_dir
        self.journal = journal
        self.max_attempts = max_attempts
        self.cond = threading.Condition()
        self.queue: collections.deque[str] = collections.deque()
        self.queued: set[str] = set()
        self.jobs: dict[str, Job] = {}
        self.runners: dict[str, Runner] = {}
        self.done: set[str] = set()
        self.lost: collections.Counter = collections.Counter()
        # Commits with a result that were asked to be tested again.
        self.retests: set[str] = set()
        self.stopping = False
        self.completed = 0
        # Job ids stay unique across restarts, so logs never mix two runs.
        self._boot = secrets.token_hex(3)
        self._ids = itertools.count(1)

    # ---- start-up -------------------------------------------------------
    def recover(self) -> None:
        """Rebuild the queue from the journal and the results folder."""
        with self.cond:
            self.done = {name for name in os.listdir(self.results_dir)
                         if helpers.valid_full_commit(name)}
            order, assigned, lost, _, retest = self.journal.replay()
            pending = [c for c in order if c not in self.done or c in retest]
            self.retests = retest & set(pending)
            self.done -= self.retests
            # Interrupted runs go first: they were at the head before.
            pending.sort(key=lambda c: c not in assigned)
            self.queue.extend(pending)
            self.queued.update(pending)
            self.lost.update({c: n for c, n in lost.items() if c in self.queued})
            self.journal.rewrite(pending, set(), self.lost, self.retests)
            if pending:
                log.info("recovered %d commit(s) to test (%d were running)",
                         len(pending), len(assigned & set(pending)))

    # ---- commands -------------------------------------------------------
    def enqueue(self, commits: list[str]) -> list[str]:
        """Queue new commits durably; return those that were new."""
        with self.cond:
            # dict.fromkeys: drops repeats in order, without a quadratic scan.
            new = list(dict.fromkeys(
                c for c in commits
                if c not in self.queued and c not in self.jobs and c not in self.done))
            self._queue_durably(new, [f"Q {c}" for c in new])
            return new

    def retest(self, commits: list[str]) -> list[str]:
        """Queue commits again even if they have a result (a "rebuild" of a
        flaky run); the new result replaces the file atomically.  Returns
        the commits queued; those already queued or running are left."""
        with self.cond:
            new = list(dict.fromkeys(
                c for c in commits if c not in self.queued and c not in self.jobs))
            self._queue_durably(new, [f"{kind} {c}" for c in new for kind in "QR"])
            for commit in new:
                self.done.discard(commit)
                self.retests.add(commit)
                self.lost.pop(commit, None)
            return new

    def _queue_durably(self, commits: list[str], records: list[str]) -> None:
        # fsync before anything can be assigned or acknowledged.
        self.journal.append(records, sync=True)
        self.queue.extend(commits)
        self.queued.update(commits)
        if commits:
            self.cond.notify_all()

    def register(self, address: tuple[str, int], instance: str, busy: str | None) -> str:
        key = helpers.format_address(address)
        with self.cond:
            runner = self.runners.get(key)
            if runner and runner.instance == instance:
                runner.misses = 0
                if runner.suspect:
                    # Freed: the assignment loop may be waiting for it.
                    runner.suspect = False
                    self.cond.notify_all()
                if busy is None and runner.busy_elsewhere and runner.job is None:
                    runner.busy_elsewhere = False
                    self.cond.notify_all()
                return "known"
            if runner and runner.job:
                # The runner restarted: whatever it was running is gone.
                log.warning("runner %s restarted while running %s; requeueing",
                            key, runner.job.commit[:12])
                self._lose(runner.job, head=True, count=True)
            runner = self.runners[key] = Runner(key, address, instance,
                                                busy_elsewhere=busy is not None)
            if busy in self.queued:
                # Typically after our own restart: the runner is still running
                # a commit we requeued.  Adopt that run instead of starting a
                # second one elsewhere.
                self.queue.remove(busy)
                self.queued.discard(busy)
                job = Job(busy, self._job_id(), key, address, time.monotonic())
                self.jobs[busy] = runner.job = job
                runner.busy_elsewhere = False
                log.info("runner %s is still running %s; adopted as job %s", key,
                         busy[:12], job.job_id)
            self.cond.notify_all()
            log.info("runner %s registered%s (%d runners)", key,
                     f" while busy with {busy[:12]}" if busy else "", len(self.runners))
            return "registered"

    def _job_id(self) -> str:
        return f"{self._boot}x{next(self._ids)}"

    def next_assignment(self) -> Job | None:
        """Block until a commit and a free runner are both available."""
        with self.cond:
            while True:
                if self.stopping:
                    return None
                if self.queue:
                    runner = next((r for r in self.runners.values() if r.free), None)
                    if runner:
                        break
                self.cond.wait()
            commit = self.queue.popleft()
            self.queued.discard(commit)
            job = Job(commit, self._job_id(), runner.key, runner.address, time.monotonic())
            runner.job = job
            self.jobs[commit] = job
            try:
                self.journal.append([f"A {commit}"], sync=False)
            except OSError:
                # Only an ordering hint for recovery; an exception here
                # would end the assignment thread for good.
                log.exception("cannot journal the assignment of %s", commit[:12])
            return job

    def assignment_failed(self, job: Job, busy: bool) -> None:
        """The runner did not take the job: put it back at the head."""
        with self.cond:
            if self.jobs.get(job.commit) is not job:
                return
            runner = self.runners.get(job.runner)
            if runner and runner.job is job:
                runner.job = None
                if busy:
                    runner.busy_elsewhere = True
                else:
                    runner.suspect = True
            self._lose(job, head=True, count=False)

    def release(self, commit: str, runner_key: str) -> bool:
        """A runner that is stopping hands its job back unrun."""
        with self.cond:
            job = self.jobs.get(commit)
            if not job or job.runner != runner_key:
                return False
            runner = self.runners.pop(runner_key, None)
            if runner:
                runner.job = None
            self._lose(job, head=True, count=False)
            return True

    def record_result(self, commit: str, runner_key: str, fields: dict,
                      output: bytes) -> bool:
        """Write the verdict if this is the first result; False if a result
        already exists.  Frees the runner either way."""
        with self.cond:
            runner = self.runners.get(runner_key)
            if runner:
                if runner.job and runner.job.commit == commit:
                    runner.job = None
                runner.busy_elsewhere = False
                runner.suspect = False
                runner.misses = 0
            self.cond.notify_all()
            if commit in self.done:
                return False
            # Claim the commit, then write without the lock: the two fsyncs
            # of every result would otherwise serialise all handlers and the
            # assignment loop.  A concurrent result for it now counts as a
            # duplicate, and a lost runner can no longer requeue it.
            self.done.add(commit)
        fields = dict(fields, commit=commit)
        try:
            helpers.atomic_write(os.path.join(self.results_dir, commit),
                                 helpers.format_result(fields, output))
        except BaseException:
            with self.cond:
                self.done.discard(commit)
            raise
        with self.cond:
            self._finish(commit, fields.get("verdict"))
        return True

    def _write_result(self, commit: str, fields: dict, output: bytes) -> None:
        fields = dict(fields, commit=commit)
        helpers.atomic_write(os.path.join(self.results_dir, commit),
                             helpers.format_result(fields, output))
        self.done.add(commit)
        self._finish(commit, fields.get("verdict"))

    def _finish(self, commit: str, verdict: str | None) -> None:
        """Bookkeeping once ``commit``'s result file is on disk."""
        self.completed += 1
        self.retests.discard(commit)
        job = self.jobs.pop(commit, None)
        if job:
            holder = self.runners.get(job.runner)
            if holder and holder.job is job:
                holder.job = None
                self.cond.notify_all()  # the holder is free for the next commit
        if commit in self.queued:
            self.queued.discard(commit)
            self.queue.remove(commit)
        self.lost.pop(commit, None)
        self.journal.append([f"D {commit}"], sync=False)
        if self.journal.records > COMPACT_AFTER and self.journal.records > 4 * (
                len(self.queue) + len(self.jobs)):
            self.journal.rewrite(list(self.jobs) + list(self.queue), set(self.jobs),
                                 self.lost, self.retests)
        log.info("result for %s: %s", commit[:12], verdict)

    def _lose(self, job: Job, head: bool, count: bool) -> None:
        """Take a job away from its runner; requeue it unless it is poison."""
        self.jobs.pop(job.commit, None)
        if job.commit in self.done:
            return
        if count:
            self.lost[job.commit] += 1
            self.journal.append([f"L {job.commit}"], sync=False)
            if self.lost[job.commit] >= self.max_attempts:
                reason = (f"gave up: the run lost its runner {self.lost[job.commit]} times "
                          f"(last: {job.runner})")
                log.error("commit %s: %s", job.commit[:12], reason)
                try:
                    self._write_result(job.commit, {
                        "verdict": "error", "tests": 0, "failures": 0, "errors": 0,
                        "skipped": 0, "runner": "dispatcher", "reason": reason,
                        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "duration": "0.000"}, (reason + "\n").encode())
                    return
                except OSError:
                    # Neither done nor queued would strand it: keep it queued.
                    log.exception("cannot write the verdict for %s; requeueing it",
                                  job.commit[:12])
                    if job.commit in self.done:
                        return
        if job.commit not in self.queued:
            if head:
                self.queue.appendleft(job.commit)
            else:
                self.queue.append(job.commit)
            self.queued.add(job.commit)
        self.cond.notify_all()

    # ---- health ---------------------------------------------------------
    def runner_snapshot(self) -> list[Runner]:
        with self.cond:
            return [dataclasses.replace(r) for r in self.runners.values()]

    def ping_result(self, key: str, instance: str, ok: bool, busy: str | None,
                    misses_allowed: int) -> None:
        with self.cond:
            runner = self.runners.get(key)
            if runner is None:
                return
            if ok and instance != runner.instance:
                ok = False  # a different process now answers on that port
            if ok:
                runner.misses = 0
                runner.suspect = False
                if runner.job is None:
                    # Its own word on being busy beats our guess either way.
                    runner.busy_elsewhere = busy is not None
                if runner.free:
                    self.cond.notify_all()
                return
            runner.misses += 1
            if runner.misses < misses_allowed:
                return
            del self.runners[key]
            log.warning("runner %s missed %d pings; dropped (%d left)", key,
                        runner.misses, len(self.runners))
            if runner.job:
                self._lose(runner.job, head=True, count=True)

    def expire_jobs(self, job_timeout: float) -> None:
        """The dispatcher's own deadline: a runner that answers pings but
        never reports loses its job to another runner."""
        now = time.monotonic()
        with self.cond:
            for job in [j for j in self.jobs.values() if now - j.started > job_timeout]:
                log.warning("commit %s exceeded the job deadline on %s; reassigning",
                            job.commit[:12], job.runner)
                runner = self.runners.get(job.runner)
                if runner and runner.job is job:
                    runner.job = None
                    runner.busy_elsewhere = True
                self._lose(job, head=True, count=True)

    def status(self) -> dict:
        with self.cond:
            return {"queued": len(self.queue), "running": len(self.jobs),
                    "runners": len(self.runners),
                    "idle_runners": sum(r.free for r in self.runners.values()),
                    "done": len(self.done), "completed": self.completed}

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()


# --------------------------------------------------------------------------
# The daemon: request handlers plus the assignment and health threads.

RESULT_INT_FIELDS = ("tests", "failures", "errors", "skipped", "exit_code")
# ASCII digits only: str.isdigit() also accepts '²' and '--1', which int() rejects.
RESULT_INT_RE = re.compile(r"-?[0-9]{1,12}")
SETUP_STATES = ("built", "reused", "none", "failed")
RESULT_DURATION_RE = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?")


def commit_list(message: Message, command: str) -> list[str]:
    """The full commit ids of a ``dispatch`` or ``retest``; Reply if any is bad."""
    commits = message.argument.split()
    if not commits or len(commits) > MAX_COMMITS_PER_DISPATCH:
        raise Reply(f"usage: {command}:<commit> [<commit> ...] (1 to "
                    f"{MAX_COMMITS_PER_DISPATCH} full ids)")
    bad = next((c for c in commits if not helpers.valid_full_commit(c)), None)
    if bad is not None:
        raise Reply(f"invalid commit id {bad[:80]!r}: need a full 40- or 64-hex id")
    return commits


def parse_results_message(message: Message) -> tuple[str, dict, bytes]:
    """Validate a ``results`` message; Reply with the reason if malformed."""
    parts = message.argument.split(" ")
    if len(parts) != 2 or not helpers.valid_full_commit(parts[0]) \
            or not parts[1].isalnum() or len(parts[1]) > 40:
        raise Reply("usage: results:<full commit id> <job id>")
    head, sep, output = message.body.partition(b"\n\n")
    if not sep:
        raise Reply("results body needs fields, a blank line, then output")
    try:
        raw = helpers.decode_fields(head)
    except helpers.ProtocolError as exc:
        raise Reply(str(exc)) from None
    if raw.get("verdict") not in helpers.VERDICTS:
        raise Reply(f"verdict must be one of {', '.join(helpers.VERDICTS)}")
    fields = {"verdict": raw["verdict"]}
    for name in RESULT_INT_FIELDS:
        value = raw.get(name, "0")
        if not RESULT_INT_RE.fullmatch(value):
            raise Reply(f"field {name} must be an integer")
        fields[name] = int(value)
    try:
        duration = float(raw.get("duration", "0"))
    except ValueError:
        raise Reply("field duration must be a number") from None
    if not math.isfinite(duration):
        raise Reply("field duration must be a finite number")
    fields["duration"] = f"{duration:.3f}"
    for name in ("runner", "started", "reason"):
        if name in raw:
            fields[name] = helpers.one_line(raw[name], 500)
    # How the runner readied the commit's environment (issue 12).
    if raw.get("setup") in SETUP_STATES:
        fields["setup"] = raw["setup"]
    if RESULT_DURATION_RE.fullmatch(raw.get("setup_duration", "")):
        fields["setup_duration"] = raw["setup_duration"]
    return parts[0], fields, output


class Dispatcher:
    def __init__(self, state: DispatcherState, security: helpers.Security,
                 ping_interval: float, ping_misses: int, ping_timeout: float,
                 job_timeout: float, workers: int):
        self.state = state
        self.security = security
        self.ping_interval = ping_interval
        self.ping_misses = ping_misses
        self.ping_timeout = ping_timeout
        self.job_timeout = job_timeout
        self.stop_event = threading.Event()
        # Pings have their own pool so a sweep over dead runners never
        # delays handing out work.
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, "send")
        self.ping_pool = concurrent.futures.ThreadPoolExecutor(workers, "ping")
        self.threads = [threading.Thread(target=self._assign_loop, name="assign", daemon=True),
                        threading.Thread(target=self._health_loop, name="health", daemon=True)]
        self.commands = {"status": self.do_status, "register": self.do_register,
                         "dispatch": self.do_dispatch, "retest": self.do_retest,
                         "results": self.do_results,
                         "release": self.do_release}

    # ---- handlers (run on request threads: short, no network I/O) --------
    def do_status(self, message: Message, peer: str) -> Message:
        return Message("ok", "", helpers.encode_fields(self.state.status()))

    def do_register(self, message: Message, peer: str) -> Message:
        try:
            address = helpers.parse_address(message.argument)
        except ValueError as exc:
            raise Reply(str(exc)) from None
        fields = self._fields(message.body)
        instance = fields.get("instance", "")
        busy = fields.get("busy") or None
        if busy is not None and not helpers.valid_commit(busy):
            busy = "unknown"
        return Message("ok", self.state.register(address, instance[:64], busy))

    def do_dispatch(self, message: Message, peer: str) -> Message:
        commits = commit_list(message, "dispatch")
        new = self.state.enqueue(commits)
        log.info("dispatch from %s: %d commit(s), %d new", peer, len(commits), len(new))
        return Message("ok", f"queued {len(new)}")

    def do_retest(self, message: Message, peer: str) -> Message:
        commits = commit_list(message, "retest")
        new = self.state.retest(commits)
        log.info("retest from %s: %d commit(s), %d queued again", peer, len(commits),
                 len(new))
        return Message("ok", f"queued {len(new)}")

    def do_results(self, message: Message, peer: str) -> Message:
        commit, fields, output = parse_results_message(message)
        runner_key = fields.get("runner", "")
        try:
            stored = self.state.record_result(commit, runner_key, fields, output)
        except OSError as exc:
            # A full or failing disk is not the runner's fault: ``busy``
            # tells it to keep the result and try again later.
            log.error("cannot store the result for %s: %s", commit[:12], exc)
            return Message("busy", "cannot store the result now")
        if stored:
            return Message("ok", "stored")
        log.info("duplicate result for %s from %s dropped (first result wins)",
                 commit[:12], runner_key or peer)
        return Message("ok", "duplicate")

    def do_release(self, message: Message, peer: str) -> Message:
        parts = message.argument.split(" ")
        if len(parts) != 2 or not helpers.valid_full_commit(parts[0]):
            raise Reply("usage: release:<commit> <runner host:port>")
        released = self.state.release(parts[0], parts[1])
        return Message("ok", "released" if released else "unknown")

    @staticmethod
    def _fields(body: bytes) -> dict:
        try:
            return helpers.decode_fields(body, max_fields=8)
        except helpers.ProtocolError as exc:
            raise Reply(str(exc)) from None

    # ---- background work ------------------------------------------------
    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.state.stop()
        for thread in self.threads:
            thread.join(5)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.ping_pool.shutdown(wait=False, cancel_futures=True)
        self.state.journal.close()

    def _assign_loop(self) -> None:
        while not self.stop_event.is_set():
            job = self.state.next_assignment()
            if job is None:
                return
            try:
                self.pool.submit(self._send_job, job)
            except RuntimeError:  # pool shut down while stopping
                return

    def _send_job(self, job: Job) -> None:
        try:
            reply = helpers.call(job.address, "runtest", f"{job.commit} {job.job_id}",
                                 security=self.security, timeout=self.ping_timeout * 3,
                                 reply_timeout=self.ping_timeout * 3)
        except (OSError, helpers.ProtocolError) as exc:
            log.warning("could not send %s to %s: %s", job.commit[:12], job.runner, exc)
            self.state.assignment_failed(job, busy=False)
            return
        if reply.command == "ok":
            log.info("commit %s -> runner %s (job %s)", job.commit[:12], job.runner,
                     job.job_id)
        else:
            log.info("runner %s answered %s %s; requeueing %s", job.runner,
                     reply.command, reply.argument, job.commit[:12])
            self.state.assignment_failed(job, busy=reply.command == "busy")

    def _health_loop(self) -> None:
        while not self.stop_event.wait(self.ping_interval):
            try:
                self.sweep()
            except Exception:
                log.exception("health sweep failed")

    def sweep(self) -> float:
        """Ping every runner concurrently; return the sweep's duration."""
        started = time.monotonic()
        self.state.expire_jobs(self.job_timeout)
        runners = self.state.runner_snapshot()
        futures = {self.ping_pool.submit(self._ping, r): r for r in runners}
        for future in concurrent.futures.as_completed(futures):
            runner = futures[future]
            ok, instance, busy = future.result()
            self.state.ping_result(runner.key, instance, ok, busy, self.ping_misses)
        duration = time.monotonic() - started
        # A sweep longer than the interval means dead runners are noticed late.
        log.log(logging.WARNING if duration > self.ping_interval else logging.DEBUG,
                "health sweep of %d runner(s) took %.3fs", len(runners), duration)
        return duration

    def _ping(self, runner: Runner) -> tuple[bool, str, str | None]:
        try:
            # The reply is bounded too: a frozen runner still accepts the
            # connection (the kernel does) but never answers, and waiting the
            # full read timeout for it would stall the whole health sweep.
            reply = helpers.call(runner.address, "ping", security=self.security,
                                 timeout=self.ping_timeout, reply_timeout=self.ping_timeout)
            fields = helpers.decode_fields(reply.body) if reply.command == "ok" else {}
        except (OSError, helpers.ProtocolError) as exc:
            log.debug("ping %s failed: %s", runner.key, exc)
            return False, "", None
        if reply.command != "ok":
            return False, "", None
        return True, fields.get("instance", ""), fields.get("busy") or None


# --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = helpers.ArgumentParser(
        description="CI dispatcher: queues commits and hands them to test runners.")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port to listen on (default: %(default)s)")
    parser.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR,
                        help="folder for the result files (default: %(default)s)")
    parser.add_argument("--state-dir",
                        help="folder for the durable queue "
                             "(default: dispatcher_state beside the results folder)")
    parser.add_argument("--ping-interval", type=float, default=DEFAULT_PING_INTERVAL,
                        metavar="SECONDS",
                        help="seconds between runner health checks (default: %(default)s)")
    parser.add_argument("--ping-misses", type=int, default=DEFAULT_PING_MISSES,
                        help="missed pings before a runner is dropped (default: %(default)s)")
    parser.add_argument("--ping-timeout", type=float, default=DEFAULT_PING_TIMEOUT,
                        metavar="SECONDS",
                        help="connect/reply timeout of one ping (default: %(default)s)")
    parser.add_argument("--job-timeout", type=float, default=DEFAULT_JOB_TIMEOUT,
                        metavar="SECONDS",
                        help="reassign a commit whose runner has not reported within this "
                             "time (default: %(default)s)")
    parser.add_argument("--max-attempts", type=int, default=DEFAULT_MAX_ATTEMPTS,
                        help="give a commit verdict 'error' after its run lost its runner "
                             "this many times (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help="threads for talking to runners (default: %(default)s)")
    helpers.add_common_arguments(parser)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        return helpers.client_main(
            "dispatcher.py status", "Print a running dispatcher's queue and runner counts.",
            "status", "--dispatcher-server", f"{DEFAULT_HOST}:{DEFAULT_PORT}", argv[1:])
    if argv[:1] == ["retest"]:
        return helpers.client_main(
            "dispatcher.py retest", "Test commits again although they have a result; the "
            "new verdict replaces the file.", "retest", "--dispatcher-server",
            f"{DEFAULT_HOST}:{DEFAULT_PORT}", argv[1:], positional="COMMIT")
    parser = build_parser()
    parser.epilog = ("'dispatcher.py status [--dispatcher-server HOST:PORT]' prints a running "
                     "dispatcher's queue and runner counts; 'dispatcher.py retest COMMIT...' "
                     "tests commits again.")
    args = parser.parse_args(argv)
    helpers.configure_logging(args.log_level)
    try:
        for name in ("ping_interval", "ping_timeout", "job_timeout"):
            if getattr(args, name) <= 0:
                raise helpers.ConfigError(f"--{name.replace('_', '-')} must be positive")
        for name in ("ping_misses", "max_attempts", "workers"):
            if getattr(args, name) < 1:
                raise helpers.ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= args.port < 65536:
            raise helpers.ConfigError("--port must be 0-65535")
        security = helpers.security_from_args(args)
        helpers.check_bind_allowed(args.host, security, args.insecure)
        results_dir = helpers.ensure_dir(os.path.abspath(args.results_dir), "results folder")
        state_dir = args.state_dir or os.path.join(os.path.dirname(results_dir),
                                                   "dispatcher_state")
        helpers.ensure_dir(state_dir, "state folder")
        state = DispatcherState(results_dir, Journal(os.path.join(state_dir, "journal")),
                                args.max_attempts)
        state.recover()
        dispatcher = Dispatcher(state, security, args.ping_interval, args.ping_misses,
                                args.ping_timeout, args.job_timeout, args.workers)
        try:
            server = helpers.MessageServer((args.host, args.port), dispatcher.commands,
                                           security, args.max_connections)
        except OSError as exc:
            raise helpers.ConfigError(
                f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    except helpers.ConfigError as exc:
        print(f"dispatcher: error: {exc}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    log.info("dispatcher listening on %s, results in %s",
             helpers.format_address((host, port)), results_dir)
    dispatcher.start()
    helpers.serve_until_signalled(server, on_stop=dispatcher.stop)
    log.info("dispatcher stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
