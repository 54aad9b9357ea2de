"""The dispatcher: keeps the durable queue of commits to test, hands them to
free runners as soon as one is free, watches runners' health, and writes
each commit's verdict to ``<results-dir>/<commit>``.

Durability: every queued commit is appended (with fsync) to a journal
before ``dispatch`` is answered ``ok``; a result file is written atomically
and is itself the proof that a commit is done.  After a crash the journal
is replayed and every recorded commit without a result file is queued
again, those that were running first.

Which result wins: the first complete result to arrive for a commit that
carries the token of an assignment that really happened.  A later one (from
a runner whose job was reassigned, or a duplicate delivery) is acknowledged
and dropped, so the file is never rewritten; one with no such token is
refused and logged.  The state itself lives in ``dispatch_state.py``, the
journal in ``journal.py``, keys and roles in ``auth.py``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import errno
import logging
import os
import sys
import threading
import time

from ci import auth
import helpers
from ci import jobspec
from ci import state_schema
from ci.dispatch.state import DispatcherState, Job, Runner
from ci.notify import flags as notify_flags
from ci.history import store as history_store
from ci.history.writer import HistoryWriter
from ci.dispatch.journal import BRANCH_RE, Journal, parse_meta_line, TOKEN_RE
from ci.config import ArgumentParser, ConfigError, add_common_arguments, configure_logging
from ci.files import ensure_dir
from ci.outcome import Outcome
from ci.security import (Security, check_bind_allowed, load_credentials, persist_nonces,
    security_from_args)
from ci.wire import (Message, ProtocolError, Reply, decode_fields, encode_fields, format_address,
    parse_address, valid_commit, valid_full_commit)

log = logging.getLogger(__name__)

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 8888
DEFAULT_RESULTS_DIR = "test_results"
# A runner whose port refuses a ping is dropped at once, so this interval
# is how soon a killed runner's commit runs again; a ping is one small
# signed message, cheap enough every second even for hundreds of runners.
DEFAULT_PING_INTERVAL = 1.0
DEFAULT_PING_MISSES = 3
# Dead runners must not stall the sweep: connect timeouts stay short.
DEFAULT_PING_TIMEOUT = 1.0
# Runners' default --timeout is 600 s; leave room for fetch and checkout.
DEFAULT_JOB_TIMEOUT = 900.0
# A runner's own limits (checkout, environment build, tests) may exceed
# the default job deadline; its jobs then get that long, up to this.
MAX_RUNNER_LIMIT = 7 * 24 * 3600.0
DEFAULT_MAX_ATTEMPTS = 3
# Threads that send ``runtest`` and pings, so no runner can block another.
DEFAULT_WORKERS = 32
MAX_COMMITS_PER_DISPATCH = 1000
# After a restart, commits that were running wait this long for their
# runner to re-register and keep them (one heartbeat, plus its backoff).
DEFAULT_RESTART_GRACE = 10.0
# On a hook's push notice, this many idle runners (the next in line) fetch
# at once, beside the observer's own fetch.
DEFAULT_PREFETCH_RUNNERS = 2


# --------------------------------------------------------------------------
# The daemon: request handlers plus the assignment and health threads.



def commit_list(message: Message, command: str) -> list[str]:
    """The full commit ids of a ``dispatch`` or ``retest``; Reply if any is bad."""
    commits = message.argument.split()
    if not commits or len(commits) > MAX_COMMITS_PER_DISPATCH:
        raise Reply(f"usage: {command}:<commit> [<commit> ...] (1 to "
                    f"{MAX_COMMITS_PER_DISPATCH} full ids)")
    bad = next((c for c in commits if not valid_full_commit(c)), None)
    if bad is not None:
        raise Reply(f"invalid commit id {bad[:80]!r}: need a full 40- or 64-hex id")
    return commits


def parse_dispatch_body(body: bytes, commits: list[str]) -> dict:
    """The observer's metadata, one line per commit ``<commit> <previous|->
    <branch>``; lines for commits not in the command, or that do not
    parse, are ignored (the commit is still queued, only without them)."""
    wanted = set(commits)
    meta = {}
    for line in body.decode("utf-8", "replace").splitlines()[:MAX_COMMITS_PER_DISPATCH]:
        parsed = parse_meta_line(line.strip())
        if parsed and parsed[0] in wanted:
            meta[parsed[0]] = (parsed[2], parsed[1])
    return meta


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


class Dispatcher:
    def __init__(self, state: DispatcherState, security: Security,
                 ping_interval: float, ping_misses: int, ping_timeout: float,
                 job_timeout: float | None, workers: int,
                 prefetch_runners: int = DEFAULT_PREFETCH_RUNNERS):
        self.state = state
        self.prefetch_runners = prefetch_runners
        self.security = security
        self.ping_interval = ping_interval
        self.ping_misses = ping_misses
        self.ping_timeout = ping_timeout
        # Not given: the default, stretched for a runner whose own limits
        # (a first environment build, say) may take longer.  Given: as is.
        self.job_timeout = DEFAULT_JOB_TIMEOUT if job_timeout is None else job_timeout
        self.trust_runner_limits = job_timeout is None
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
                         "progress": self.do_progress, "prefetch": self.do_prefetch}

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
        label = runner_label(fields)
        # A runner's own limits stretch the default deadline only; an
        # explicit --job-timeout is exact.
        answer = self.state.register(address, instance[:64], busy, token,
                                     self._runner_name(peer),
                                     limit if self.trust_runner_limits else None)
        self.state.label_runner(address, label)
        if answer == "registered" and label:
            log.info("runner %s calls itself %s", message.argument, label)
        if answer == "registered" and limit and limit > self.job_timeout \
                and not self.trust_runner_limits:
            log.warning("runner %s may by its own limits take %.0fs per commit (checkout, "
                        "environment build, tests), more than --job-timeout %gs: a commit "
                        "that long is reassigned", message.argument, limit, self.job_timeout)
        return Message("ok", answer)

    @staticmethod
    def _runner_name(peer) -> str | None:
        """With issued keys, a runner is who its key says; with the shared
        secret (or none) only its tokens identify its work."""
        return getattr(peer, "name", None) if getattr(peer, "role", "") == "runner" else None

    def do_dispatch(self, message: Message, peer: str) -> Message:
        commits = commit_list(message, "dispatch")
        new = self.state.enqueue(commits, parse_dispatch_body(message.body, commits))
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
        commits = commit_list(message, "retest")
        new = self.state.retest(commits)
        log.info("retest from %s: %d commit(s), %d queued again", peer, len(commits),
                 len(new))
        return Message("ok", f"queued {len(new)}")

    def do_results(self, message: Message, peer: str) -> Message:
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
                                 timeout=self.ping_timeout * 3,
                                 reply_timeout=self.ping_timeout * 3)
        except (OSError, ProtocolError) as exc:
            log.warning("could not send %s to %s: %s", job.commit[:12], job.runner, exc)
            self.state.assignment_failed(job, "refused" if refused(exc) else "error")
            return
        except Exception:
            # Lost in the pool's future otherwise, the runner would stay
            # "running" it until --job-timeout.
            log.exception("sending %s to %s failed", job.commit[:12], job.runner)
            self.state.assignment_failed(job, "error")
            return
        if reply.command == "ok":
            log.info("commit %s%s -> runner %s", job.commit[:12],
                     f" shard {job.shard}/{job.shards}" if job.shards else "", job.runner)
        else:
            log.info("runner %s answered %s %s; requeueing %s", job.runner,
                     reply.command, reply.argument, job.commit[:12])
            self.state.assignment_failed(job, "busy" if reply.command == "busy" else "error")

    def _send_fetch(self, address: tuple[str, int], name: str | None) -> None:
        try:
            reply = helpers.call(address, "fetch", security=self._security_for(name),
                                 timeout=self.ping_timeout, reply_timeout=self.ping_timeout)
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
        runners = self.state.runner_snapshot()
        futures = {self.ping_pool.submit(self._ping, r): r for r in runners}
        for future in concurrent.futures.as_completed(futures):
            runner = futures[future]
            try:
                outcome, instance, busy, token = future.result()
            except Exception:  # one odd ping must not cost the others' results
                log.exception("ping of %s failed", runner.key)
                continue
            self.state.ping_result(runner.key, outcome, instance, busy, self.ping_misses, token,
                                   pinged=runner.instance)
        duration = time.monotonic() - started
        # A sweep longer than the interval means dead runners are noticed late.
        log.log(logging.WARNING if duration > self.ping_interval else logging.DEBUG,
                "health sweep of %d runner(s) took %.3fs", len(runners), duration)
        return duration

    def _ping(self, runner: Runner) -> tuple[str, str, str | None, str | None]:
        keyring = self.security.keyring
        if runner.name and isinstance(keyring, auth.MasterKeyring) and \
                keyring.revocations.revoked(f"runner:{runner.name}"):
            # Revoked: it could take work but never report it; drop it now.
            log.warning("runner %s (%s) holds a revoked key; dropped", runner.name, runner.key)
            return "refused", "", None, None
        try:
            # The reply is bounded too: a frozen runner still accepts the
            # connection (the kernel does) but never answers, and waiting the
            # full read timeout for it would stall the whole health sweep.
            reply = helpers.call(runner.address, "ping",
                                 security=self._security_for(runner.name),
                                 timeout=self.ping_timeout, reply_timeout=self.ping_timeout)
            fields = decode_fields(reply.body) if reply.command == "ok" else {}
        except (OSError, ProtocolError) as exc:
            log.debug("ping %s failed: %s", runner.key, exc)
            return ("refused" if refused(exc) else "timeout"), "", None, None
        if reply.command != "ok":
            return "timeout", "", None, None
        return ("ok", fields.get("instance", ""), *runner_says(fields))


def job_limit(fields: dict) -> float | None:
    """The longest a job may take on a runner by its own limits (its
    ``register`` field ``limit``), None if it says none or nonsense."""
    try:
        seconds = float(fields.get("limit", ""))
    except ValueError:
        return None
    return seconds if 0 < seconds <= MAX_RUNNER_LIMIT else None


def runner_label(fields: dict) -> str | None:
    """The name a runner gives itself in its ``register`` field ``name``
    (``test_runner.py --name``), None if it gives none; a name it may not
    have is refused with the rule, not shortened into another one."""
    label = fields.get("name") or None
    if label is not None:
        try:
            state_schema.check_runner_name(label)
        except ValueError as exc:
            raise Reply(str(exc)) from None
    return label


def runner_says(fields: dict) -> tuple[str | None, str | None]:
    """(the commit a runner is busy with, its job's token) from its
    ``register`` or ``ping`` fields: ``unknown`` for a malformed commit,
    no token for a malformed one."""
    busy = fields.get("busy") or None
    if busy is not None and not valid_commit(busy):
        busy = "unknown"
    token = fields.get("job") or None
    return busy, token if token and TOKEN_RE.fullmatch(token) else None


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


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
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
    parser.add_argument("--job-timeout", type=float, metavar="SECONDS",
                        help="reassign a commit whose runner has not reported within this "
                             f"time (default: {DEFAULT_JOB_TIMEOUT:g}, or longer for a runner "
                             "whose own limits for checkout, setup and tests add up to more)")
    parser.add_argument("--max-attempts", type=int, default=DEFAULT_MAX_ATTEMPTS,
                        help="give a commit verdict 'error' after its run lost its runner "
                             "this many times (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help="threads for talking to runners (default: %(default)s)")
    parser.add_argument("--restart-grace", type=float, default=DEFAULT_RESTART_GRACE,
                        metavar="SECONDS",
                        help="after a restart, how long commits that were running wait for "
                             "their runner to re-register and keep them (default: "
                             "%(default)s; 0 requeues them at once)")
    parser.add_argument("--max-shards", type=int, default=1, metavar="N",
                        help="split a commit's tests over up to N runners when more runners "
                             "are free than commits are queued, balanced by each test file's "
                             "last known duration; the shards' results are merged into one "
                             "(default: %(default)s, never split)")
    parser.add_argument("--min-shard-seconds", type=float, default=1.0, metavar="SECONDS",
                        help="split only as far as each shard gets this much test time by the "
                             "last known durations, and no more shards than known test "
                             "classes (default: %(default)s; 0: no such limit)")
    parser.add_argument("--prefetch-runners", type=int, default=DEFAULT_PREFETCH_RUNNERS,
                        metavar="N",
                        help="when a git hook announces a push, tell up to N idle runners "
                             "(the next in line for work) to fetch at once, so the new "
                             "commit's checkout need not wait for a fetch (default: "
                             "%(default)s; 0: off)")
    parser.add_argument("--trusted-branch", action="append", metavar="PATTERN",
                        help="a branch (fnmatch pattern; repeat for several) whose commits "
                             "build the environments every branch may reuse; another "
                             "branch's commits reuse those and their own branch's, never a "
                             "third branch's (default: "
                             f"{' and '.join(jobspec.DEFAULT_TRUSTED_BRANCHES)})")
    notify_flags.add_arguments(parser)
    add_common_arguments(parser)
    return parser


def default_state_dir(results_dir: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(results_dir)), "dispatcher_state")


def issue_key_main(argv) -> int:
    parser = ArgumentParser(
        prog="dispatcher.py issue-key",
        description="Print (or write) the key file of one process, derived from the "
                    "dispatcher's master secret: give it to that process as --secret-file.")
    parser.add_argument("name", metavar="NAME",
                        help="who holds the key, e.g. runner1 (letters, digits, . _ -)")
    parser.add_argument("--role", choices=auth.ROLES, default="runner",
                        help="what the key may do: runner (register, report its own jobs), "
                             "observer/operator (dispatch, retest, status), viewer (status, "
                             "state, log: the dashboard) (default: %(default)s)")
    parser.add_argument("--secret-file", metavar="PATH",
                        help="the dispatcher's master secret (default: $CI_SECRET)")
    parser.add_argument("--output", metavar="PATH",
                        help="write the key file here, mode 600 (default: print it)")
    args = parser.parse_args(argv)
    try:
        master, key_id = load_credentials(args.secret_file)
        if master is None or key_id is not None:
            raise ConfigError("issue-key needs the dispatcher's master secret "
                                      "(--secret-file or CI_SECRET), not an issued key")
        text = auth.format_key_file(args.role, args.name, master)
        if args.output:
            fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
        else:
            sys.stdout.write(text)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"dispatcher.py issue-key: error: {exc}", file=sys.stderr)
        return 2
    return 0


def revoke_key_main(argv) -> int:
    parser = ArgumentParser(
        prog="dispatcher.py revoke-key",
        description="Stop accepting an issued key (a running dispatcher notices within a "
                    "second). Issue the holder a key under a new name to let it back in.")
    parser.add_argument("name", metavar="NAME", help="NAME (every role) or ROLE:NAME")
    parser.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR,
                        help="the dispatcher's results folder (default: %(default)s)")
    parser.add_argument("--state-dir", help="the dispatcher's state folder "
                        "(default: dispatcher_state beside the results folder)")
    args = parser.parse_args(argv)
    state_dir = args.state_dir or default_state_dir(args.results_dir)
    try:
        ensure_dir(state_dir, "state folder")
        auth.add_revocation(os.path.join(state_dir, REVOKED_FILE), args.name)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"dispatcher.py revoke-key: error: {exc}", file=sys.stderr)
        return 2
    print(f"revoked {args.name}")
    return 0


REVOKED_FILE = "revoked-keys"


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
    if argv[:1] == ["issue-key"]:
        return issue_key_main(argv[1:])
    if argv[:1] == ["revoke-key"]:
        return revoke_key_main(argv[1:])
    parser = build_parser()
    parser.epilog = ("'dispatcher.py status [--dispatcher-server HOST:PORT]' prints a running "
                     "dispatcher's queue and runner counts; 'dispatcher.py retest COMMIT...' "
                     "tests commits again; 'dispatcher.py issue-key NAME' makes a key file "
                     "for a runner (--role for others); 'dispatcher.py revoke-key NAME' "
                     "revokes one.")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        for name in ("ping_interval", "ping_timeout", "job_timeout"):
            if getattr(args, name) is not None and getattr(args, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        for name in ("ping_misses", "max_attempts", "workers", "max_shards"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= args.port < 65536:
            raise ConfigError("--port must be 0-65535")
        if args.restart_grace < 0:
            raise ConfigError("--restart-grace must not be negative")
        if args.max_shards > 100:
            raise ConfigError("--max-shards must be at most 100")
        if not 0 <= args.min_shard_seconds < 1e6:
            raise ConfigError("--min-shard-seconds must be 0 or more")
        if not 0 <= args.prefetch_runners <= 1000:
            raise ConfigError("--prefetch-runners must be 0-1000")
        trusted = trusted_patterns(args.trusted_branch)
        security = security_from_args(args)
        check_bind_allowed(args.host, security, args.insecure)
        results_dir = ensure_dir(os.path.abspath(args.results_dir), "results folder")
        state_dir = args.state_dir or default_state_dir(results_dir)
        ensure_dir(state_dir, "state folder")
        if security.key_id:
            raise ConfigError("the dispatcher's --secret-file must hold the master "
                                      "secret, not an issued key")
        persist_nonces(security, state_dir, "dispatcher")
        if security.secret:
            security.keyring = auth.MasterKeyring(
                security.secret, auth.Revocations(os.path.join(state_dir, REVOKED_FILE)))
        if security.server_tls:
            security.tls_client_roles = frozenset({"runner", "observer", "operator",
                                                   "viewer"})
            security.tls_server_role = "runner"
        notifier = notify_flags.from_args(args, state_dir, results_dir)
        state = DispatcherState(results_dir, Journal(os.path.join(state_dir, "journal")),
                                args.max_attempts)
        state.max_shards = args.max_shards
        state.min_shard_seconds = args.min_shard_seconds
        state.trusted_branches = trusted
        state.recover(args.restart_grace)
        if notifier:
            state.listeners.append(notifier.result_written)
        history = HistoryWriter(os.path.join(state_dir, history_store.FILE_NAME), results_dir)
        state.listeners.append(history.result_written)
        dispatcher = Dispatcher(state, security, args.ping_interval, args.ping_misses,
                                args.ping_timeout, args.job_timeout, args.workers,
                                args.prefetch_runners)
        try:
            server = helpers.MessageServer((args.host, args.port), dispatcher.commands,
                                           security, args.max_connections,
                                           auth.DISPATCHER_PERMISSIONS)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    except ConfigError as exc:
        print(f"dispatcher: error: {exc}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    log.info("dispatcher listening on %s, results in %s; secret %s, TLS %s; trusted "
             "branches %s", format_address((host, port)), results_dir,
             "on (master; issued keys accepted)" if security.secret else "off",
             "on (certificate roles checked)" if security.server_tls else "off",
             ", ".join(state.trusted_branches))
    if notifier:
        notifier.start(state.is_pending)
    history.start()
    dispatcher.start()

    def stop():
        dispatcher.stop()
        if notifier:
            notifier.stop()
        history.stop()
    helpers.serve_until_signalled(server, on_stop=stop)
    log.info("dispatcher stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
