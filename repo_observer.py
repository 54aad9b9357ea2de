"""The repository observer: fetches its clone every ``--poll`` seconds (or
at once when a git hook sends ``notify``) and dispatches every new commit
of each watched branch, oldest first, along the first-parent line.

Branches are named or matched by glob patterns (or all watched); one
fetch per poll serves them all, and each branch is then handled on its own,
so one that fails never holds up the others.  A branch first seen after
the observer's first poll dispatches only its own commits.  Each dispatch
carries one ``<commit> <previous|-> <branch>`` line per commit.

The last dispatched commit per branch is kept in a state file and is
advanced only after the dispatcher has durably accepted the commits, so
nothing is skipped across restarts and outages: the backlog is simply
``git rev-list <head> ^<last>``, recomputed on every poll.

usage:  repo_observer.py [options] REPO
        repo_observer.py notify [--observer HOST:PORT]   (for git hooks)
        repo_observer.py land|unland BRANCH [--observer HOST:PORT]
        repo_observer.py queue [--observer HOST:PORT]     (the land queue, JSON)
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.argv[1:2] == ["notify"]:
    # The git hook's path, before anything else is imported: a hook runs
    # on every push and should cost milliseconds (see hook_client.py).
    import hook_client
    sys.exit(hook_client.main(sys.argv[2:]))

import argparse
import logging
import os
import threading

import helpers
from ci import auth
from ci.config import (ArgumentParser, ConfigError, add_common_arguments, configure_logging,
    positive)
from ci.files import ensure_dir
from ci.git import GitError, run_git
from ci.security import check_bind_allowed, persist_nonces, security_from_args
from ci.wire import format_address, parse_address
from ci.observer.poller import DEFAULT_NEW_BRANCH_LIMIT, Observer, Watch
from ci.observer.state import ObserverState

log = logging.getLogger(__name__)

DEFAULT_DISPATCHER = "localhost:8888"
DEFAULT_POLL = 5.0
DEFAULT_HOST = "localhost"
DEFAULT_PORT = 8887
DEFAULT_QUEUE_POLL = 1.0

# One-shot clients to a running observer (the land queue, docs/merge-queue.md).
QUEUE_CLIENTS = {
    "land": ("Ask the observer to land BRANCH into its --merge-into target through the "
             "land queue.", "BRANCH"),
    "unland": ("Take BRANCH out of the land queue (refused once its push is under way).",
               "BRANCH"),
    "queue": ("Print the land queue's snapshot (JSON).", None),
}


def queue_client(command: str, argv) -> int:
    description, positional = QUEUE_CLIENTS[command]
    return helpers.client_main(helpers.ClientCommand(
        f"repo_observer.py {command}", description, command, "--observer",
        f"{DEFAULT_HOST}:{DEFAULT_PORT}", positional=positional, server_role="observer"), argv)


# --------------------------------------------------------------------------
# Working out what to dispatch.


def valid_pattern(pattern: str) -> bool:
    """A branch name or glob: only ever matched with fnmatch, never given
    to git or a shell, but kept to what a ref name could look like."""
    return (0 < len(pattern) <= 255 and pattern.isprintable() and " " not in pattern
            and not pattern.startswith("-"))


def default_branch(repo: str) -> str:
    """The upstream's default branch, else the clone's current branch."""
    for args in (("symbolic-ref", "--short", "refs/remotes/origin/HEAD"),
                 ("symbolic-ref", "--short", "HEAD")):
        try:
            name = run_git(repo, *args).strip()
        except GitError:
            continue
        return name.removeprefix("origin/")
    raise ConfigError(f"cannot tell the default branch of {repo}; give --branch")


# --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="CI repository observer: dispatches every new commit to the dispatcher.",
        epilog="For git hooks: repo_observer.py notify [--observer HOST:PORT] wakes a running "
               "observer at once (see 'repo_observer.py notify --help').")
    parser.add_argument("repo", metavar="REPO", help="the observer's own clone of the upstream")
    parser.add_argument("--dispatcher-server", default=DEFAULT_DISPATCHER, metavar="HOST:PORT",
                        help="the dispatcher's address (default: %(default)s)")
    parser.add_argument("--poll", type=positive(float), default=DEFAULT_POLL, metavar="SECONDS",
                        help="seconds between polls of the upstream (default: %(default)s)")
    parser.add_argument("--branch", action="append", metavar="PATTERN",
                        help="branch to watch, or a glob pattern such as 'feature/*'; repeat "
                             "for several (default: the upstream's default branch)")
    parser.add_argument("--all-branches", action="store_true",
                        help="watch every branch of the upstream")
    parser.add_argument("--new-branch-limit", type=positive(int), default=DEFAULT_NEW_BRANCH_LIMIT,
                        metavar="N",
                        help="a new branch's first poll dispatches at most its newest N "
                             "commits of its own (default: %(default)s)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on for notify (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port to listen on for notify, 0 for any free one "
                             "(default: %(default)s)")
    parser.add_argument("--no-listen", action="store_true",
                        help="do not listen for notify; rely on polling alone")
    parser.add_argument("--state-dir",
                        help="folder for the last-dispatched state "
                             "(default: REPO/.git/ci-observer)")
    add_queue_arguments(parser)
    add_common_arguments(parser)
    return parser


def add_queue_arguments(parser: argparse.ArgumentParser) -> None:
    """The land queue's flags (docs/merge-queue.md)."""
    parser.add_argument("--merge-into", action="append", default=[], metavar="PATTERN=TARGET",
                        help="branches matching the glob PATTERN may land into branch TARGET "
                             "through the land queue; repeat for several (first match wins)")
    parser.add_argument("--queue-depth", type=positive(int), default=3, metavar="N",
                        help="land queue entries tested at once, each on top of those ahead "
                             "(default: %(default)s)")
    parser.add_argument("--queue-poll", type=positive(float), default=DEFAULT_QUEUE_POLL,
                        metavar="SECONDS",
                        help="while the land queue has entries, poll at least this often "
                             "(verdicts, landing) (default: %(default)s)")


def make_engine(args, repo: str, state_dir: str, dispatcher, security):
    """The land queue's engine, or None without --merge-into rules."""
    from ci.landing.engine import Engine
    from ci.landing.journal import QueueJournal
    from ci.landing.ports import DispatcherClient, GitCli
    from ci.landing.rules import parse_rule
    try:
        rules = [parse_rule(text) for text in args.merge_into]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not rules:
        return None
    path = os.path.join(state_dir, "queue.journal")
    try:
        journal = QueueJournal(path)
    except OSError as exc:
        raise ConfigError(f"cannot open the land queue journal {path}: {exc}") from None
    return Engine(journal, GitCli(repo), DispatcherClient(dispatcher, security), rules,
                  args.queue_depth)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["notify"]:
        import hook_client
        return hook_client.main(argv[1:])
    if argv[:1] and argv[0] in QUEUE_CLIENTS:
        return queue_client(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    server = None
    try:
        try:
            dispatcher = parse_address(args.dispatcher_server)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        repo = os.path.abspath(args.repo)
        if not os.path.isdir(os.path.join(repo, ".git")):
            raise ConfigError(f"{args.repo} is not a git clone (no .git folder)")
        if args.all_branches and args.branch:
            raise ConfigError("give --branch or --all-branches, not both")
        branches = args.branch or ([] if args.all_branches else [default_branch(repo)])
        for pattern in branches:
            if not valid_pattern(pattern):
                raise ConfigError(f"invalid branch name or pattern {pattern!r}")
        security = security_from_args(args)
        if security.server_tls:
            # Hooks hold the observer's (or an operator's) certificate; the
            # dispatcher must present the dispatcher's.
            security.tls_client_roles = frozenset({"observer", "operator"})
            security.tls_server_role = "dispatcher"
        state_dir = ensure_dir(args.state_dir or os.path.join(repo, ".git", "ci-observer"),
                                       "state folder")
        state = ObserverState(os.path.join(state_dir, "state.json"))
        watch = Watch(repo, branches, args.poll, args.all_branches, args.new_branch_limit)
        engine = make_engine(args, repo, state_dir, dispatcher, security)
        observer = Observer(watch, dispatcher, state, security, engine, args.queue_poll)
        if not args.no_listen:
            check_bind_allowed(args.host, security, args.insecure)
            persist_nonces(security, state_dir, "observer")
            try:
                server = helpers.MessageServer((args.host, args.port), observer.commands,
                                               security, args.max_connections,
                                               permissions=auth.OBSERVER_PERMISSIONS)
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {args.host}:{args.port}: {exc.strerror} "
                    "(use --port or --no-listen)") from None
    except ConfigError as exc:
        print(f"repo_observer: error: {exc}", file=sys.stderr)
        return 2
    log.info("observing %s branch(es) %s every %.1fs; dispatcher %s%s; secret %s, TLS %s", repo,
             ", ".join(branches) or "(all)", args.poll, format_address(dispatcher),
             f"; notify on {format_address(server.server_address[:2])}"
             if server else "",
             f"on (key {security.key_id})" if security.key_id else
             "on (shared)" if security.secret else "off",
             "on" if security.server_tls or security.client_tls else "off")
    observer.start()
    if server is None:
        server = _NullServer()
    helpers.serve_until_signalled(server, on_stop=observer.stop)
    log.info("observer stopped")
    return 0


class _NullServer:
    """Stands in for the notify listener under --no-listen."""

    def __init__(self):
        self._stop = threading.Event()

    def serve_forever(self, poll_interval=0.5):
        self._stop.wait()

    def shutdown(self):
        self._stop.set()

    def server_close(self):
        pass


if __name__ == "__main__":
    sys.exit(main())
