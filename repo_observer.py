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
from ci import auth, client_cli
from ci.config import (ArgumentParser, ConfigError, add_common_arguments, configure_logging,
    positive)
from ci.files import ensure_dir
from ci.git import GitError, run_git
from ci.security import check_bind_allowed, persist_nonces, security_from_args
from ci.wire import format_address, parse_address
from ci.merging import MergeRepo, merge as merging, rules as merge_rules, url as push_urls
from ci.observer.merges import DEFAULT_KEEP, BranchMerges
from ci.observer.poller import DEFAULT_NEW_BRANCH_LIMIT, Observer, Watch
from ci.observer.state import ObserverState

log = logging.getLogger(__name__)

DEFAULT_DISPATCHER = "localhost:8888"
DEFAULT_POLL = 5.0
DEFAULT_HOST = "localhost"
DEFAULT_PORT = 8887
DEFAULT_QUEUE_POLL = 1.0
DEFAULT_QUEUE_DEPTH = 3

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
    return client_cli.client_main(client_cli.ClientCommand(
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


def merge_rules_from_args(args, repo: str) -> list:
    """The --merge-into rules, checked: each TARGET a branch of the upstream
    as the clone knows it (ConfigError otherwise; a target deleted later
    makes its branches wait, with a warning, until it exists again)."""
    try:
        rules = [merge_rules.parse_rule(text) for text in args.merge_into]
        merge_rules.check_rules(rules)
        merging.parse_identity(args.merge_identity)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not rules:
        if args.push_url or args.push_url_file:
            log.warning("--push-url/--push-url-file without --merge-into: nothing is pushed")
        return rules
    for target in dict.fromkeys(r.target for r in rules):
        if not upstream_has(repo, target):
            raise ConfigError(f"--merge-into: the upstream has no branch {target!r} (as {repo} "
                              "last fetched it)")
    return rules


def upstream_has(repo: str, branch: str) -> bool:
    """Whether the upstream has ``branch``, as update_repo.sh reads it: the
    origin's branches, or the clone's own when it has no origin."""
    try:
        run_git(repo, "remote", "get-url", "origin")
        ref = f"refs/remotes/origin/{branch}"
    except GitError:
        ref = f"refs/heads/{branch}"
    try:
        run_git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
        return True
    except GitError:
        return False


def push_url_from_args(args, repo: str):
    if args.push_url_file:
        return push_urls.from_file(args.push_url_file)
    if args.push_url:
        return push_urls.from_flag(args.push_url)
    return push_urls.default(repo)


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
    merging_flags = parser.add_argument_group(
        "merged results", "test branches as merged into their target (docs/branches.md)")
    merging_flags.add_argument(
        "--merge-into", action="append", default=[], metavar="PATTERN=TARGET",
        help="test each new head of the branches matching PATTERN (a glob, watched too) as "
             "its merge into TARGET's current head, e.g. 'feature/*=main'; TARGET must be a "
             "branch of the upstream; repeat for several (the first matching rule wins)")
    merging_flags.add_argument(
        "--merge-identity", default=merging.DEFAULT_IDENTITY, metavar="'NAME <EMAIL>'",
        help="author and committer of the merge commits (default: %(default)s)")
    merging_flags.add_argument(
        "--keep-merges", type=positive(int), default=DEFAULT_KEEP, metavar="N",
        help="merges kept published under refs/ci/merges/ per branch; older ones are "
             "deleted (default: %(default)s)")
    where = merging_flags.add_mutually_exclusive_group()
    where.add_argument("--push-url", metavar="URL",
                       help="where merges are pushed (default: the clone's origin push URL); "
                            "for a URL with credentials use --push-url-file")
    where.add_argument("--push-url-file", metavar="FILE",
                       help="a file (mode 600) holding the push URL with its credentials; the "
                            "URL is never logged")
    merging_flags.add_argument(
        "--queue-depth", type=positive(int), default=DEFAULT_QUEUE_DEPTH, metavar="N",
        help="land queue entries tested at once, each on top of those ahead "
             "(default: %(default)s; docs/merge-queue.md)")
    merging_flags.add_argument(
        "--queue-poll", type=positive(float), default=DEFAULT_QUEUE_POLL, metavar="SECONDS",
        help="while the land queue has entries, poll at least this often (verdicts, "
             "landing) (default: %(default)s)")
    add_common_arguments(parser)
    return parser


def make_engine(args, merges: BranchMerges, repo: str, state_dir: str, dispatcher, security):
    """The land queue's engine, or None without --merge-into rules; it
    makes and pushes its merges with the observer's one ``MergeRepo``
    (``merges.repo``), under the same rules and state as merged results."""
    from ci.landing.engine import Engine
    from ci.landing.journal import QueueJournal
    from ci.landing.ports import DispatcherClient, QueueGit
    if not merges.rules:
        return None
    path = os.path.join(state_dir, "queue.journal")
    try:
        journal = QueueJournal(path)
    except OSError as exc:
        raise ConfigError(f"cannot open the land queue journal {path}: {exc}") from None
    return Engine(journal, QueueGit(repo, merges.repo, merges.state),
                  DispatcherClient(dispatcher, security),
                  merges.rules, args.queue_depth)


def watched_branches(args, repo: str, rules) -> list[str]:
    """The branch names and patterns to watch (empty: all), checked; a
    ``--merge-into`` pattern is watched too (a rule for unwatched branches
    would do nothing)."""
    if args.all_branches and args.branch:
        raise ConfigError("give --branch or --all-branches, not both")
    branches = args.branch or ([] if args.all_branches else [default_branch(repo)])
    for pattern in branches:
        if not valid_pattern(pattern):
            raise ConfigError(f"invalid branch name or pattern {pattern!r}")
    if not args.all_branches:
        branches += [r.pattern for r in rules if r.pattern not in branches]
    return branches


def make_merges(args, repo: str, state_dir: str, rules, state: ObserverState):
    """Merged results (``--merge-into``), or None without rules."""
    if not rules:
        return None
    merges = BranchMerges(
        MergeRepo(repo, state_dir, push_url_from_args(args, repo),
                  merging.parse_identity(args.merge_identity)),
        rules, state, args.keep_merges)
    log.info("merged results: %s; merges pushed to %s",
             ", ".join(f"{r.pattern} into {r.target}" for r in rules),
             merges.repo.push_url.shown)
    return merges


def listen(args, security, state_dir: str, commands: dict):
    """The notify listener, or None under --no-listen."""
    if args.no_listen:
        return None
    check_bind_allowed(args.host, security, args.insecure)
    persist_nonces(security, state_dir, "observer")
    try:
        return helpers.MessageServer((args.host, args.port), commands, security,
                                     args.max_connections,
                                     permissions=auth.OBSERVER_PERMISSIONS)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc.strerror} "
                          "(use --port or --no-listen)") from None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["notify"]:
        import hook_client
        return hook_client.main(argv[1:])
    if argv[:1] and argv[0] in QUEUE_CLIENTS:
        return queue_client(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        try:
            dispatcher = parse_address(args.dispatcher_server)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        repo = os.path.abspath(args.repo)
        if not os.path.isdir(os.path.join(repo, ".git")):
            raise ConfigError(f"{args.repo} is not a git clone (no .git folder)")
        rules = merge_rules_from_args(args, repo)
        branches = watched_branches(args, repo, rules)
        security = security_from_args(args)
        if security.server_tls:
            # Hooks hold the observer's (or an operator's) certificate; the
            # dispatcher must present the dispatcher's.
            security.tls_client_roles = frozenset({"observer", "operator"})
            security.tls_server_role = "dispatcher"
        state_dir = ensure_dir(args.state_dir or os.path.join(repo, ".git", "ci-observer"),
                                       "state folder")
        state = ObserverState(os.path.join(state_dir, "state.json"))
        watch = Watch(repo, branches, args.poll, args.all_branches, args.new_branch_limit,
                      args.queue_poll)
        merges = make_merges(args, repo, state_dir, rules, state)
        engine = make_engine(args, merges, repo, state_dir, dispatcher,
                             security) if merges else None
        observer = Observer(watch, dispatcher, state, security, merges, engine)
        server = listen(args, security, state_dir, observer.commands)
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
