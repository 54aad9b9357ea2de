"""The dispatcher daemon's work: its message handlers (one method per
command, checked and answered at once), the thread that hands queued
work to free runners, and the health thread that pings them.

The state they act on is ``ci/dispatch/state.py``; ``dispatcher.py`` only
parses flags and wires these together."""

from __future__ import annotations
import concurrent.futures
import dataclasses
import errno
import logging
import threading
import time
from ci import auth
import helpers
from ci import jobspec, matrix, mergeinfo, verdicts
from ci.dispatch.landqueue import LandQueueView
from ci.dispatch.register import job_limit, runner_given_name, runner_says, runner_traits
from ci.dispatch.runners import PingReply, Runner
from ci.dispatch.state import DispatcherState
from ci.dispatch.work import Job, Meta
from ci.dispatch.journal import BRANCH_RE, parse_meta_line, split_key, TOKEN_RE
from ci.config import ConfigError
from ci.notify.notifier import NotReady
from ci.notify.queue_events import QueueEventError, parse_queue_event
from ci.outcome import Outcome
from ci.queue_snapshot import SnapshotError
from ci.security import Security
from ci.wire import (Message, ProtocolError, Reply, Unauthentic, decode_fields, encode_fields,
    format_address, one_line, parse_address, valid_full_commit)

log = logging.getLogger(__name__)

# Runners' default --timeout is 600 s; leave room for fetch and checkout.
DEFAULT_JOB_TIMEOUT = 900.0
# On a hook's push notice, this many idle runners (the next in line) fetch
# at once, beside the observer's own fetch.
DEFAULT_PREFETCH_RUNNERS = 2
MAX_COMMITS_PER_DISPATCH = 1000

# --------------------------------------------------------------------------
# The daemon: request handlers plus the assignment and health threads.



def commit_list(message: Message, command: str, cells: bool = False) -> list[str]:
    """The full commit ids of a ``dispatch`` or ``retest`` (``cells``: or
    ``<commit>:<cell>``, one cell of a matrix); Reply if any is bad."""
    commits = message.argument.split()
    if not commits or len(commits) > MAX_COMMITS_PER_DISPATCH:
        raise Reply(f"usage: {command}:<commit> [<commit> ...] (1 to "
                    f"{MAX_COMMITS_PER_DISPATCH} full ids)")
    bad = next((c for c in commits if not (valid_full_commit(c) or (
        cells and split_key(c) is not None))), None)
    if bad is not None:
        raise Reply(f"invalid commit id {bad[:80]!r}: need a full 40- or 64-hex id"
                    + (" or <commit>:<cell>" if cells else ""))
    return commits


def parse_dispatch_body(body: bytes, commits: list[str],
                        max_cells: int = matrix.DEFAULT_MAX_CELLS) -> tuple[dict, dict]:
    """The observer's metadata, one line per commit ``<commit> <previous|->
    <branch> [key=value ...]``: after the three positional fields any
    number of ``key=value`` fields in any order, unknown keys skipped
    (forward compatible): ``cells=``/``error=`` (a commit whose recipe has
    a matrix: ci/dispatch/cells.py), ``merge=`` and ``conflict=`` (a
    merge commit, or one that could not be made: ci/mergeinfo.py).  Lines
    for commits not in the command, or that do not parse, are ignored (the
    commit is still queued, as one cell, only without them); a malformed
    ``merge=`` is no merge info.  A conflict has no plan: it never runs.
    Returns (commit -> Meta, commit -> Plan)."""
    wanted = set(commits)
    meta, plans = {}, {}
    for line in body.decode("utf-8", "replace").splitlines()[:MAX_COMMITS_PER_DISPATCH]:
        parts = line.strip().split(" ")
        parsed = parse_meta_line(" ".join(parts[:3]))
        if not parsed or parsed[0] not in wanted:
            continue
        extra = [p for p in parts[3:] if p]
        merge, conflicts = mergeinfo.parse_extra_fields(extra)
        meta[parsed[0]] = Meta(parsed[2], parsed[1], merge, conflicts)
        plan = next((p for p in extra if p.startswith((matrix.CELLS_FIELD, matrix.ERROR_FIELD))), None)
        if plan is not None and conflicts is None:
            plans[parsed[0]] = matrix.decode_plan(plan, max_cells)
    return meta, plans


def commit_and_token(message: Message, command: str) -> tuple[str, str]:
    parts = message.argument.split(" ")
    if len(parts) != 2 or not valid_full_commit(parts[0]) \
            or not TOKEN_RE.fullmatch(parts[1]):
        raise Reply(f"usage: {command}:<full commit id> <token>")
    return parts[0], parts[1]


def parse_results_message(message: Message) -> tuple[str, str, Outcome]:
    """Validate a ``results`` message; Reply with the reason if malformed
    (``Outcome.from_body`` checks the runner's fields)."""
    commit, token = commit_and_token(message, "results")
    try:
        return commit, token, Outcome.from_body(message.body)
    except ProtocolError as exc:
        raise Reply(str(exc)) from None


@dataclasses.dataclass
class Options:
    """The dispatcher's health and sending flags (see build_parser)."""
    ping_interval: float
    ping_misses: int
    ping_timeout: float
    job_timeout: float | None       # None: the default, or a runner's own limits
    workers: int
    prefetch_runners: int = DEFAULT_PREFETCH_RUNNERS


class Dispatcher:
    def __init__(self, state: DispatcherState, security: Security, options: Options,
                 land_queue: LandQueueView | None = None, notifier=None):
        self.state = state
        # The observer's land queue: its snapshot (kept here, with its own
        # lock) and its events (told on by the notifier, if any).
        self.land_queue = land_queue or LandQueueView(None)
        self.notifier = notifier
        self.prefetch_runners = options.prefetch_runners
        self.security = security
        self.ping_interval = options.ping_interval
        self.ping_misses = options.ping_misses
        self.ping_timeout = options.ping_timeout
        # Not given: the default, stretched for a runner whose own limits
        # (a first environment build, say) may take longer.  Given: as is.
        self.job_timeout = DEFAULT_JOB_TIMEOUT if options.job_timeout is None \
            else options.job_timeout
        self.trust_runner_limits = options.job_timeout is None
        workers = options.workers
        self.stop_event = threading.Event()
        # Pings have their own pool so a sweep over dead runners never
        # delays handing out work.
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, "send")
        self.ping_pool = concurrent.futures.ThreadPoolExecutor(workers, "ping")
        self.threads = [threading.Thread(target=self._assign_loop, name="assign", daemon=True),
                        threading.Thread(target=self._health_loop, name="health", daemon=True)]
        self.commands = {"status": self.do_status, "state": self.do_state,
                         "log": self.do_log, "register": self.do_register,
                         "dispatch": self.do_dispatch, "retest": self.do_retest,
                         "results": self.do_results, "release": self.do_release,
                         "progress": self.do_progress, "prefetch": self.do_prefetch,
                         "failing": self.do_failing, "verdicts": self.do_verdicts,
                         "queue": self.do_queue,
                         "queue-state": self.do_queue_state,
                         "queue-event": self.do_queue_event}

    # ---- handlers (run on request threads: short, no network I/O) --------
    def do_status(self, message: Message, peer: str) -> Message:
        return Message("ok", "", encode_fields(self.state.status()))

    def do_state(self, message: Message, peer: str) -> Message:
        return Message("ok", "", self.state.describe())

    def do_log(self, message: Message, peer: str) -> Message:
        if not valid_full_commit(message.argument):
            raise Reply("usage: log:<full commit id>")
        tail = self.state.log_tail(message.argument)
        return Message("ok", "idle") if tail is None else Message("ok", "running", tail)

    def do_register(self, message: Message, peer: str) -> Message:
        try:
            address = parse_address(message.argument)
        except ValueError as exc:
            raise Reply(str(exc)) from None
        fields = self._fields(message.body)
        instance = fields.get("instance", "")
        busy, token = runner_says(fields)
        limit = job_limit(fields)
        given_name = runner_given_name(fields)
        # A runner's own limits stretch the default deadline only; an
        # explicit --job-timeout is exact.
        traits = runner_traits(fields, limit if self.trust_runner_limits else None)
        name = self._runner_name(peer)
        claim = (address, instance[:64], busy, token, name, traits)
        answer = self.state.register(*claim)
        if answer == "unproven":
            refusal = self._prove(address, name, instance[:64])
            if refusal is not None:
                return refusal
            answer = self.state.register(*claim, proven=True)
        self.state.name_runner(address, given_name)
        if answer == "registered" and given_name:
            log.info("runner %s calls itself %s", message.argument, given_name)
        if answer == "registered" and limit and limit > self.job_timeout \
                and not self.trust_runner_limits:
            log.warning("runner %s may by its own limits take %.0fs per commit (checkout, "
                        "environment build, tests), more than --job-timeout %gs: a commit "
                        "that long is reassigned", message.argument, limit, self.job_timeout)
        return Message("ok", answer)

    def _prove(self, address: tuple[str, int], name: str, instance: str) -> Message | None:
        """None once ``address`` answered a ping signed with runner
        ``name``'s key, from the process that registers (``instance``);
        else the refusal.  One ping, so a runner is entered as fast as it
        answers; a key that failed waits a ping interval before the next."""
        where = format_address(address)
        if not self.state.start_proof(name):
            return Message("busy", f"a ping for runner {name} is under way or failed less "
                                   f"than {self.ping_interval:g}s ago; try again")
        reply = PingReply("timeout")
        try:
            reply = self._ping_at(address, name)
        finally:   # whatever happened, the key is not left marked under way
            proven = reply.outcome == "ok" and reply.instance == instance
            self.state.proof_done(name, proven, self.ping_interval)
        if proven:
            return None
        why = {"unauthentic": f"answered a ping for runner {name} with another key",
               "refused": f"refused a ping for runner {name} (nothing listens there)",
               "ok": f"is answered by another process than runner {name}'s {instance!r}",
               }.get(reply.outcome, f"did not answer a ping for runner {name} in time")
        raise Reply(f"{where} {why}: a runner registers only where it answers")

    @staticmethod
    def _runner_name(peer) -> str | None:
        """With issued keys, a runner is who its key says; with the shared
        secret (or none) only its tokens identify its work."""
        return getattr(peer, "name", None) if getattr(peer, "role", "") == "runner" else None

    def do_dispatch(self, message: Message, peer: str) -> Message:
        commits = commit_list(message, "dispatch")
        meta, plans = parse_dispatch_body(message.body, commits, self.state.max_cells)
        new = self.state.enqueue(commits, meta, plans)
        log.info("dispatch from %s: %d commit(s), %d new", peer, len(commits), len(new))
        return Message("ok", f"queued {len(new)}")

    def do_prefetch(self, message: Message, peer: str) -> Message:
        """A push was just announced: the idle runners next in line fetch
        now, so the commit is in their clone by the time it is assigned
        (the observer is still fetching it to find out its id)."""
        targets = self.state.prefetch_targets(self.prefetch_runners)
        for address, name in targets:
            try:
                self.pool.submit(self._send_fetch, address, name)
            except RuntimeError:  # pool shut down while stopping
                break
        return Message("ok", f"fetching on {len(targets)}")

    def do_retest(self, message: Message, peer: str) -> Message:
        commits = commit_list(message, "retest", cells=True)
        new = self.state.retest(commits)
        log.info("retest from %s: %d commit(s), %d queued again", peer, len(commits),
                 len(new))
        return Message("ok", f"queued {len(new)}")

    def do_results(self, message: Message, peer: str) -> Message:
        with self.state.result_gate:     # the pruner waits meanwhile
            return self._store_result(message, peer)

    def _store_result(self, message: Message, peer: str) -> Message:
        commit, token, outcome = parse_results_message(message)
        try:
            stored = self.state.record_result(commit, token, self._runner_name(peer), outcome)
        except OSError as exc:
            # A full or failing disk is not the runner's fault: ``busy``
            # tells it to keep the result and try again later.
            log.error("cannot store the result for %s: %s", commit[:12], exc)
            return Message("busy", "cannot store the result now")
        if stored:
            return Message("ok", "stored")
        log.info("duplicate result for %s from %s dropped (first result wins)",
                 commit[:12], outcome.header.get("runner") or peer)
        return Message("ok", "duplicate")

    def do_release(self, message: Message, peer: str) -> Message:
        commit, token = commit_and_token(message, "release")
        self.state.release(commit, token, self._runner_name(peer))
        return Message("ok", "released")

    def do_progress(self, message: Message, peer: str) -> Message:
        commit, token = commit_and_token(message, "progress")
        self.state.progress(commit, token, self._runner_name(peer), message.body)
        return Message("ok")

    def do_failing(self, message: Message, peer: str) -> Message:
        """A running job's first failing test, told as it fails (body:
        ``test`` and ``after``, the seconds since its tests started)."""
        commit, token = commit_and_token(message, "failing")
        fields = self._fields(message.body)
        test = one_line(fields.get("test", ""), 500).strip()
        try:
            after = float(fields.get("after", ""))
        except ValueError:
            after = -1.0
        if not test or not 0 <= after < 1e7:
            raise Reply("usage: failing:<commit> <token>, body test: <id>, after: <seconds>")
        first = self.state.first_failure(commit, token, self._runner_name(peer), test, after)
        return Message("ok", "first" if first else "known")

    def do_verdicts(self, message: Message, peer: str) -> Message:
        """Where each asked commit stands (ci/verdicts.py): the land queue's
        question, answered from result headers and the queue."""
        try:
            commits = verdicts.parse_request(message.argument)
        except verdicts.VerdictsError as exc:
            raise Reply(str(exc)) from None
        return Message("ok", "", verdicts.format_reply(self.state.verdicts(commits)))

    def do_queue(self, message: Message, peer: str) -> Message:
        """The land queue's latest snapshot (JSON), as the observer sent it."""
        return Message("ok", "", self.land_queue.json())

    def do_queue_state(self, message: Message, peer: str) -> Message:
        """The observer's new snapshot: checked whole (a bad one changes
        nothing), on disk before the reply."""
        try:
            snapshot = self.land_queue.replace(message.body)
        except SnapshotError as exc:
            raise Reply(f"bad queue snapshot: {exc}") from None
        except OSError as exc:
            log.error("cannot store the land queue snapshot: %s", exc)
            return Message("busy", "cannot store the snapshot now")
        log.debug("land queue snapshot from %s: %d entries", peer, len(snapshot["entries"]))
        return Message("ok", "stored")

    def do_queue_event(self, message: Message, peer: str) -> Message:
        """An entry landed or was rejected: ``ok`` once the notifier has it
        on disk (or there is no notifier), so the observer may stop
        retrying; the same event told again is ``ok duplicate``."""
        try:
            event = parse_queue_event(message.body)
        except QueueEventError as exc:
            raise Reply(f"bad queue event: {exc}") from None
        if self.notifier is None:
            log.info("queue event %s %s into %s: no notification targets", event.branch,
                     event.event, event.target)
            return Message("ok", "no notifier")
        try:
            return Message("ok", self.notifier.queue_event(event))
        except NotReady as exc:
            return Message("busy", str(exc))
        except (OSError, ValueError) as exc:  # ValueError: the journal closed (stopping)
            log.error("cannot journal the queue event %s: %s", event.key, exc)
            return Message("busy", "cannot journal the event now")

    @staticmethod
    def _fields(body: bytes) -> dict:
        try:
            return decode_fields(body, max_fields=8)
        except ProtocolError as exc:
            raise Reply(str(exc)) from None

    # ---- talking to runners ----------------------------------------------
    def _security_for(self, runner_name: str | None) -> Security:
        """Sign with the runner's own key: it holds nothing else."""
        keyring = self.security.keyring
        if isinstance(keyring, auth.MasterKeyring):
            key, key_id = keyring.key_for("runner", runner_name)
            return self.security.signed_as(key, key_id)
        return self.security

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
            # A shard's body names it and carries the durations the runner
            # splits the commit's test files by; a whole commit's is empty.
            reply = helpers.call(job.address, "runtest", f"{job.commit} {job.token}",
                                 job.request, security=self._security_for(job.name),
                                 timeout=(self.ping_timeout * 3, self.ping_timeout * 3))
        except (OSError, ProtocolError) as exc:
            log.warning("could not send %s to %s: %s", job.commit[:12], job.runner, exc)
            self.state.assignment_failed(job, "refused" if refused(exc) else "unauthentic"
                                         if isinstance(exc, Unauthentic) else "error")
            return
        except Exception:
            # Lost in the pool's future otherwise, the runner would stay
            # "running" it until --job-timeout.
            log.exception("sending %s to %s failed", job.commit[:12], job.runner)
            self.state.assignment_failed(job, "error")
            return
        if reply.command == "ok":
            # The key names the cell (``<commit>:<cell>``) of a matrix commit.
            log.info("commit %s%s -> runner %s", job.key[:12] + job.key[len(job.commit):],
                     f" shard {job.shard}/{job.shards}" if job.shards else "", job.runner)
        else:
            log.info("runner %s answered %s %s; requeueing %s", job.runner,
                     reply.command, reply.argument, job.commit[:12])
            self.state.assignment_failed(job, "busy" if reply.command == "busy" else "error")

    def _send_fetch(self, address: tuple[str, int], name: str | None) -> None:
        try:
            reply = helpers.call(address, "fetch", security=self._security_for(name),
                                 timeout=(self.ping_timeout, self.ping_timeout))
            log.debug("fetch on %s: %s %s", format_address(address), reply.command,
                      reply.argument)
        except (OSError, ProtocolError) as exc:
            # Only a hint; the health sweep deals with a runner that is gone.
            log.debug("fetch on %s not sent: %s", format_address(address), exc)

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
        self.state.release_held()
        self.state.expire_unroutable()
        runners = self.state.runner_snapshot()
        futures = {self.ping_pool.submit(self._ping, r): r for r in runners}
        for future in concurrent.futures.as_completed(futures):
            runner = futures[future]
            try:
                reply = future.result()
            except Exception:  # one odd ping must not cost the others' results
                log.exception("ping of %s failed", runner.key)
                continue
            self.state.ping_result(runner.key, reply, self.ping_misses, pinged=runner.instance)
        duration = time.monotonic() - started
        # A sweep longer than the interval means dead runners are noticed late.
        log.log(logging.WARNING if duration > self.ping_interval else logging.DEBUG,
                "health sweep of %d runner(s) took %.3fs", len(runners), duration)
        return duration

    def _ping(self, runner: Runner) -> PingReply:
        keyring = self.security.keyring
        if runner.name and isinstance(keyring, auth.MasterKeyring) and \
                keyring.revocations.revoked(f"runner:{runner.name}"):
            # Revoked: it could take work but never report it; drop it now.
            log.warning("runner %s (%s) holds a revoked key; dropped", runner.name, runner.key)
            return PingReply("refused")
        return self._ping_at(runner.address, runner.name)

    def _ping_at(self, address: tuple[str, int], name: str | None) -> PingReply:
        try:
            # The reply is bounded too: a frozen runner still accepts the
            # connection (the kernel does) but never answers, and waiting the
            # full read timeout for it would stall the whole health sweep.
            reply = helpers.call(address, "ping", security=self._security_for(name),
                                 timeout=(self.ping_timeout, self.ping_timeout))
            fields = decode_fields(reply.body) if reply.command == "ok" else {}
        except Unauthentic as exc:
            # Another key (or none) answers there: not a slow runner.
            log.debug("ping %s failed: %s", format_address(address), exc)
            return PingReply("unauthentic")
        except (OSError, ProtocolError) as exc:
            log.debug("ping %s failed: %s", format_address(address), exc)
            return PingReply("refused" if refused(exc) else "timeout")
        if reply.command == "busy":     # signed: alive, only loaded (or flooded)
            return PingReply("busy")
        if reply.command != "ok":
            return PingReply("timeout")
        return PingReply("ok", fields.get("instance", ""), *runner_says(fields))


def refused(exc: BaseException) -> bool:
    """Nothing listens on the port (the runner's process is gone): unlike
    a timeout, this is not a slow network, and waiting would only delay
    its commit."""
    return isinstance(exc, ConnectionRefusedError) or \
        getattr(exc, "errno", None) == errno.ECONNREFUSED


# --------------------------------------------------------------------------

def trusted_patterns(given: list[str] | None) -> tuple[str, ...]:
    """The ``--trusted-branch`` patterns, or the default; ConfigError for
    one that no branch name could match (empty, spaces, control
    characters)."""
    for pattern in given or ():
        if not BRANCH_RE.fullmatch(pattern):
            raise ConfigError(f"--trusted-branch {pattern!r}: not a branch name or "
                                      "pattern (no spaces or control characters)")
    return tuple(dict.fromkeys(given)) if given else jobspec.DEFAULT_TRUSTED_BRANCHES


