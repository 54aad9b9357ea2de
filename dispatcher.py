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
refused and logged.  The state itself lives in ``ci/dispatch/state.py``, the
journal in ``ci/dispatch/journal.py``, keys and roles in ``auth.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from ci import auth, client_cli
import helpers
from ci import jobspec, matrix
from ci.dispatch import cells, landqueue
from ci.dispatch.state import DispatcherState
from ci.notify import flags as notify_flags
from ci.history import store as history_store
from ci.history.queries import HistoryReader
from ci.history.writer import HistoryWriter
from ci.dispatch.journal import Journal
from ci.dispatch.spares import SpareFiles
from ci.retention import policy as retention_policy
from ci.retention import gate, pruner
from ci.retention import index as result_index
from ci.retention.tombstones import FILE_NAME as TOMBSTONE_FILE, TombstoneFile
from ci.config import (ArgumentParser, ConfigError, check_port, configure_logging,
                       grouped_parser, non_negative, positive)
from ci.files import atomic_write, ensure_dir
from ci.security import (Security, check_bind_allowed, load_credentials, persist_nonces,
    security_from_args)
from ci.wire import format_address
from ci.dispatch.server import (DEFAULT_JOB_TIMEOUT, DEFAULT_PREFETCH_RUNNERS, Dispatcher, Options,
                               trusted_patterns)

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
DEFAULT_MAX_ATTEMPTS = 3
# Threads that send ``runtest`` and pings, so no runner can block another.
DEFAULT_WORKERS = 32
# After a restart, commits that were running wait this long for their
# runner to re-register and keep them (one heartbeat, plus its backoff).
DEFAULT_RESTART_GRACE = 10.0


def _where_flags(group) -> None:
    """Its address, and the folders that must survive a restart."""
    group.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default: %(default)s)")
    group.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port to listen on (default: %(default)s)")
    group.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR,
                        help="folder for the result files (default: %(default)s)")
    group.add_argument("--state-dir",
                        help="folder for the durable queue "
                             "(default: dispatcher_state beside the results folder)")


def _runner_flags(group) -> None:
    """How soon a silent runner is dropped and its work given to another."""
    group.add_argument("--ping-interval", type=positive(float), default=DEFAULT_PING_INTERVAL,
                        metavar="SECONDS",
                        help="seconds between runner health checks (default: %(default)s)")
    group.add_argument("--ping-misses", type=positive(int), default=DEFAULT_PING_MISSES,
                        help="missed pings before a runner is dropped (default: %(default)s)")
    group.add_argument("--ping-timeout", type=positive(float), default=DEFAULT_PING_TIMEOUT,
                        metavar="SECONDS",
                        help="connect/reply timeout of one ping (default: %(default)s)")
    group.add_argument("--job-timeout", type=positive(float), metavar="SECONDS",
                        help="reassign a commit whose runner has not reported within this "
                             f"time (default: {DEFAULT_JOB_TIMEOUT:g}, or longer for a runner "
                             "whose own limits for checkout, setup and tests add up to more)")
    group.add_argument("--max-attempts", type=positive(int), default=DEFAULT_MAX_ATTEMPTS,
                        help="give a commit verdict 'error' after its run lost its runner "
                             "this many times (default: %(default)s)")
    group.add_argument("--workers", type=positive(int), default=DEFAULT_WORKERS,
                        help="threads for talking to runners (default: %(default)s)")
    group.add_argument("--restart-grace", type=float, default=DEFAULT_RESTART_GRACE,
                        metavar="SECONDS",
                        help="after a restart, how long commits that were running wait for "
                             "their runner to re-register and keep them (default: "
                             "%(default)s; 0 requeues them at once)")
    group.add_argument("--prefetch-runners", type=int, default=DEFAULT_PREFETCH_RUNNERS,
                        metavar="N",
                        help="when a git hook announces a push, tell up to N idle runners "
                             "(the next in line for work) to fetch at once, so the new "
                             "commit's checkout need not wait for a fetch (default: "
                             "%(default)s; 0: off)")


def _work_flags(group) -> None:
    """Shards, matrix cells and environment scopes: what a commit becomes on the runners."""
    group.add_argument("--max-shards", type=positive(int), default=1, metavar="N",
                        help="split a commit's tests over up to N runners when more runners "
                             "are free than commits are queued, balanced by each test file's "
                             "last known duration; the shards' results are merged into one "
                             "(default: %(default)s, never split)")
    group.add_argument("--min-shard-seconds", type=float, default=1.0, metavar="SECONDS",
                        help="split only as far as each shard gets this much test time by the "
                             "last known durations, and no more shards than known test "
                             "classes (default: %(default)s; 0: no such limit)")
    group.add_argument("--max-cells", type=positive(int), default=matrix.DEFAULT_MAX_CELLS,
                        metavar="N",
                        help="a commit whose recipe's build matrix has more cells than this "
                             "gets an error verdict instead of a run (default: %(default)s)")
    group.add_argument("--unroutable-timeout", type=positive(float),
                        default=cells.DEFAULT_UNROUTABLE_TIMEOUT, metavar="SECONDS",
                        help="a queued cell that no registered runner can take (none has "
                             "every label it needs) gets an error verdict saying so after "
                             "this long; it waits, with the reason in status and state, "
                             "meanwhile (default: %(default)s)")
    group.add_argument("--trusted-branch", action="append", metavar="PATTERN",
                        help="a branch (fnmatch pattern; repeat for several) whose commits "
                             "build the environments every branch may reuse; another "
                             "branch's commits reuse those and their own branch's, never a "
                             "third branch's (default: "
                             f"{' and '.join(jobspec.DEFAULT_TRUSTED_BRANCHES)})")


def _retention_flags(group) -> None:
    """Retention and the per-test history: what the results folder holds over time."""
    group.add_argument("--keep-results", type=retention_policy.keep_argument, metavar="N|AGE|N,AGE",
                        help="prune old results (result file, JUnit XML, test history rows) "
                             "in the background: N keeps the newest N of each branch, AGE "
                             "(90m, 12h, 30d, 8w) keeps everything younger, N,AGE keeps what "
                             "either keeps; a branch's latest verdict, the commits that broke "
                             "or fixed a branch and pending commits are always kept, and a "
                             "pruned commit leaves a tombstone so it is never tested again "
                             "(default: keep everything)")
    group.add_argument("--prune-interval", type=positive(float),
                        default=pruner.DEFAULT_INTERVAL, metavar="SECONDS",
                        help="seconds between pruning passes with --keep-results "
                             "(default: %(default)s)")
    group.add_argument("--prune-rest", type=non_negative(float), default=gate.REST,
                        metavar="FACTOR",
                        help="after every batch of a pass (and every 256 header reads of "
                             "its plan) the pass rests this many times as long as it took, "
                             "at most 50 ms, so it holds the disk less of the time and meets "
                             "fewer results (0: no rest, a faster pass that competes more; "
                             "default: %(default)s)")
    group.add_argument("--no-test-history", action="store_true",
                        help="do not write the per-test history store "
                             "(<state-dir>/history.sqlite3): no writer process, and the "
                             "dashboard's test pages say there is no history; a store left "
                             "from before is not touched and is caught up from the result "
                             "files when the dispatcher next starts without this flag")


def build_parser() -> argparse.ArgumentParser:
    return grouped_parser(
        "CI dispatcher: queues commits and hands them to test runners.",
        [("where it listens and keeps its files", _where_flags),
         ("runners and their health", _runner_flags),
         ("how work is split and routed", _work_flags),
         ("results kept", _retention_flags)],
        notify_flags.add_arguments)


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
            # A new file (mode 600, mkstemp's) renamed over the path: opened
            # in place, a file already there kept its mode (a key readable
            # by all after "> runner1.key"), and a symlink was followed.
            atomic_write(args.output, text.encode())
            print(f"wrote {os.path.abspath(args.output)} (mode 600)", file=sys.stderr)
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
    state_dir = os.path.abspath(args.state_dir or default_state_dir(args.results_dir))
    path = os.path.join(state_dir, REVOKED_FILE)
    try:
        # Only where a dispatcher keeps its state: a file written anywhere
        # else (run from another folder without flags) revoked nothing,
        # and said it had.
        if not os.path.isfile(os.path.join(state_dir, JOURNAL_FILE)):
            raise ConfigError(f"no dispatcher state in {state_dir} (no {JOURNAL_FILE}): give "
                              "the dispatcher's --state-dir, or its --results-dir")
        auth.add_revocation(path, args.name)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"dispatcher.py revoke-key: error: {exc}", file=sys.stderr)
        return 2
    print(f"revoked {args.name} (in {path})")
    return 0


REVOKED_FILE = "revoked-keys"
JOURNAL_FILE = "journal"


def status_main(argv) -> int:
    return client_cli.client_main(client_cli.ClientCommand(
        "dispatcher.py status", "Print a running dispatcher's queue and runner counts.",
        "status", "--dispatcher-server", f"{DEFAULT_HOST}:{DEFAULT_PORT}"), argv)


def retest_main(argv) -> int:
    return client_cli.client_main(client_cli.ClientCommand(
        "dispatcher.py retest", "Test commits again although they have a result; the "
        "new verdict replaces the file.", "retest", "--dispatcher-server",
        f"{DEFAULT_HOST}:{DEFAULT_PORT}", positional="COMMIT"), argv)


# ``dispatcher.py WORD ...``: the subcommands, each its own small program.
SUBCOMMANDS = {"status": status_main, "retest": retest_main,
               "issue-key": issue_key_main, "revoke-key": revoke_key_main}
EPILOG = ("'dispatcher.py status [--dispatcher-server HOST:PORT]' prints a running "
          "dispatcher's queue and runner counts; 'dispatcher.py retest COMMIT...' "
          "tests commits again; 'dispatcher.py issue-key NAME' makes a key file "
          "for a runner (--role for others); 'dispatcher.py revoke-key NAME' "
          "revokes one.")


def check_flags(args: argparse.Namespace) -> None:
    """ConfigError for the first flag out of its range (counts and
    durations are checked positive as they are parsed)."""
    check_port(args)
    if args.restart_grace < 0:
        raise ConfigError("--restart-grace must not be negative")
    if args.max_shards > 100:
        raise ConfigError("--max-shards must be at most 100")
    if args.max_cells > matrix.MAX_CELLS_LIMIT:
        raise ConfigError(f"--max-cells must be at most {matrix.MAX_CELLS_LIMIT}")
    if not 0 <= args.min_shard_seconds < 1e6:
        raise ConfigError("--min-shard-seconds must be 0 or more")
    if not 0 <= args.prefetch_runners <= 1000:
        raise ConfigError("--prefetch-runners must be 0-1000")


def secure_master(security: Security, state_dir: str) -> None:
    """The master secret (never an issued key), its replay cache and
    revocations, and which certificate roles may connect."""
    if security.key_id:
        raise ConfigError("the dispatcher's --secret-file must hold the master "
                          "secret, not an issued key")
    persist_nonces(security, state_dir, "dispatcher")
    if security.secret:
        security.keyring = auth.MasterKeyring(
            security.secret, auth.Revocations(os.path.join(state_dir, REVOKED_FILE)))
    if security.server_tls:
        security.tls_client_roles = frozenset({"runner", "observer", "operator", "viewer"})
        security.tls_server_role = "runner"


def recovered_state(args: argparse.Namespace, results_dir: str, state_dir: str,
                    trusted: tuple[str, ...]) -> DispatcherState:
    """The dispatcher's state, configured and rebuilt from the journal."""
    state = DispatcherState(results_dir, Journal(os.path.join(state_dir, JOURNAL_FILE)),
                            args.max_attempts)
    state.max_shards = args.max_shards
    state.max_cells = args.max_cells
    state.unroutable_timeout = args.unroutable_timeout
    state.min_shard_seconds = args.min_shard_seconds
    state.trusted_branches = trusted
    state.tombstones = TombstoneFile(os.path.join(state_dir, TOMBSTONE_FILE))
    state.result_index = os.path.join(state_dir, result_index.FILE_NAME)
    state.recover(args.restart_grace)
    state.spares = SpareFiles(results_dir, state.result_gate)
    return state


@dataclasses.dataclass
class Wired:
    """What ``main`` starts and stops."""
    server: helpers.MessageServer
    dispatcher: Dispatcher
    notifier: object
    history: HistoryWriter | None    # None with --no-test-history
    security: Security
    state: DispatcherState
    results_dir: str
    pruner: pruner.Pruner | None = None


def wire_up(args: argparse.Namespace) -> Wired:
    """Check the flags and build every part, serving nothing yet;
    ConfigError for anything wrong."""
    check_flags(args)
    trusted = trusted_patterns(args.trusted_branch)
    security = security_from_args(args)
    check_bind_allowed(args.host, security, args.insecure)
    results_dir = ensure_dir(os.path.abspath(args.results_dir), "results folder")
    state_dir = args.state_dir or default_state_dir(results_dir)
    ensure_dir(state_dir, "state folder")
    secure_master(security, state_dir)
    notifier = notify_flags.from_args(args, state_dir, results_dir)
    state = recovered_state(args, results_dir, state_dir, trusted)
    if notifier:
        state.listeners.append(notifier.result_written)
        state.failing_listeners.append(notifier.failing_now)
    history = None
    if not args.no_test_history:
        history = HistoryWriter(os.path.join(state_dir, history_store.FILE_NAME), results_dir,
                                args.log_level, gate=state.result_gate)
        state.listeners.append(history.result_written)
        # A branch's failing tests first: from the history for a branch not
        # seen since the start (results teach the rest as they come).
        state.recent_failures.load = HistoryReader(history.path).recent_failures
    dispatcher = Dispatcher(state, security, Options(
        args.ping_interval, args.ping_misses, args.ping_timeout, args.job_timeout,
        args.workers, args.prefetch_runners), landqueue.open_view(state_dir), notifier)
    try:
        server = helpers.MessageServer((args.host, args.port), dispatcher.commands,
                                       security, args.max_connections,
                                       auth.DISPATCHER_PERMISSIONS)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    pruning = None
    if args.keep_results:
        pruning = pruner.Pruner(state, state.tombstones, args.keep_results,
                                args.prune_interval, history and history.forget,
                                args.log_level, rest=args.prune_rest)
    return Wired(server, dispatcher, notifier, history, security, state, results_dir, pruning)


def serve(wired: Wired) -> None:
    """Run until SIGTERM or SIGINT, then stop the threads."""
    host, port = wired.server.server_address[:2]
    log.info("dispatcher listening on %s, results in %s; secret %s, TLS %s; trusted "
             "branches %s", format_address((host, port)), wired.results_dir,
             "on (master; issued keys accepted)" if wired.security.secret else "off",
             "on (certificate roles checked)" if wired.security.server_tls else "off",
             ", ".join(wired.state.trusted_branches))
    if not wired.state.spares.start():
        wired.state.spares = None
    if wired.notifier:
        wired.notifier.start(wired.state.is_pending)
    if wired.history:
        wired.history.start()
    wired.dispatcher.start()
    if wired.pruner:
        wired.pruner.start()

    def stop():
        if wired.pruner:
            wired.pruner.stop()
        wired.dispatcher.stop()
        if wired.notifier:
            wired.notifier.stop()
        if wired.history:
            wired.history.stop()
        if wired.state.spares:
            wired.state.spares.stop()
    helpers.serve_until_signalled(wired.server, on_stop=stop)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    parser = build_parser()
    parser.epilog = EPILOG
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        wired = wire_up(args)
    except ConfigError as exc:
        print(f"dispatcher: error: {exc}", file=sys.stderr)
        return 2
    serve(wired)
    log.info("dispatcher stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
