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
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.argv[1:2] == ["notify"]:
    # The git hook's path, before anything else is imported: a hook runs
    # on every push and should cost milliseconds (see hook_client.py).
    import hook_client
    sys.exit(hook_client.main(sys.argv[2:]))

import argparse
import fnmatch
import json
import logging
import os
import subprocess
import tempfile
import threading
import time

import helpers
from ci import procgroup
from ci.backoff import Backoff
from ci.config import (ArgumentParser, ConfigError, add_common_arguments, configure_logging,
    positive)
from ci.files import atomic_write, ensure_dir
from ci.git import GitError, run_git, script_path
from ci.security import Security, check_bind_allowed, persist_nonces, security_from_args
from ci.wire import (Message, ProtocolError, encode_fields, format_address, parse_address,
    valid_full_commit)

log = logging.getLogger(__name__)

DEFAULT_DISPATCHER = "localhost:8888"
DEFAULT_POLL = 5.0
DEFAULT_HOST = "localhost"
DEFAULT_PORT = 8887
# Commits per ``dispatch`` message: one fsync on the dispatcher per batch.
BATCH = 200
# Update of the clone may hang on a dead network: bound it.
FETCH_TIMEOUT = 300
# update_repo.sh's listing read at most (a line per branch: 2 MiB is ~20,000).
MAX_LISTING = 2 * 1024 * 1024
# The prefetch hint waits no longer than this (it runs beside our own fetch).
PREFETCH_TIMEOUT = 0.5
# Pushing an old branch must not flood the queue with its whole history.
DEFAULT_NEW_BRANCH_LIMIT = 20
# Dispatched commits remembered, to tell whether a new branch's fork point
# was tested (and so can be named as its first commit's previous one).
RECENT_LIMIT = 2000
# The status reply is a field list of bounded length.
MAX_STATUS_BRANCHES = 50


# --------------------------------------------------------------------------
# Working out what to dispatch.

def new_commits(repo: str, head: str, last: str | None) -> tuple[list[str], bool]:
    """Commits after ``last`` up to ``head``, oldest first, on the
    first-parent line; (commits, history_rewritten)."""
    if last is None:
        return [head], False
    if last == head:
        return [], False
    # The usual push: ``last`` is on head's first-parent line, which the
    # oldest new commit's first parent shows, so one git process is enough
    # (every process on this path adds to the commit-to-result time).
    try:
        out = run_git(repo, "rev-list", "--first-parent", "--reverse", "--parents",
                              head, f"^{last}")
    except GitError:
        out = ""  # ``last`` is gone: the check below says how
    lines = [line.split() for line in out.splitlines() if line.strip()]
    if lines and lines[0][1:2] == [last]:
        return [line[0] for line in lines], False
    try:
        run_git(repo, "merge-base", "--is-ancestor", last, head)
    except GitError as exc:
        if exc.code in (1, 128):  # not an ancestor, or no longer known at all
            return [head], True
        raise
    out = run_git(repo, "rev-list", "--first-parent", "--reverse", head, f"^{last}")
    return out.split(), False


def parse_heads(text: str) -> dict[str, str]:
    """``update_repo.sh``'s listing: one ``<full id> <branch>`` per line."""
    heads = {}
    for line in text.splitlines():
        commit, _, branch = line.partition(" ")
        if valid_full_commit(commit) and branch and branch.isprintable() \
                and " " not in branch:
            heads[branch] = commit
    return heads


def own_commits(repo: str, head: str, others: list[str]) -> list[str]:
    """A new branch's commits that no other watched branch has, oldest
    first, on its first-parent line (for a branch made from main: its own)."""
    out = run_git(repo, "rev-list", "--first-parent", "--reverse", head,
                          *[f"^{other}" for other in others])
    return out.split()


def first_parent(repo: str, commit: str) -> str | None:
    try:
        parent = run_git(repo, "rev-parse", "--verify", "--quiet",
                                 f"{commit}^1").strip()
    except GitError:
        return None  # a root commit
    return parent if valid_full_commit(parent) else None


def dispatch_body(commits: list[str], previous: str | None, branch: str) -> bytes:
    """One ``<commit> <previous|-> <branch>`` line per commit: what the
    dispatcher needs to judge each commit against the one before it on its
    branch (broke / fixed)."""
    lines = []
    for commit in commits:
        lines.append(f"{commit} {previous or '-'} {branch}")
        previous = commit
    return ("\n".join(lines) + "\n").encode()


class ObserverState:
    """Per branch, the last commit handled and the commit to name as the
    previous one; and the recently dispatched commits (to tell whether a
    new branch's fork point was tested).  Persisted atomically."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self.last: dict[str, str] = {}
        self.previous: dict[str, str] = {}
        self.recent: dict[str, None] = {}  # insertion-ordered, bounded
        self.initialized = False
        try:
            with open(path, "rb") as handle:
                data = json.loads(handle.read() or b"{}")
            self.last = {b: c for b, c in data.get("last_dispatched", {}).items()
                         if isinstance(b, str) and valid_full_commit(c)}
            # A state file from before "previous" was kept: the last
            # dispatched commit is the previous one.
            previous = data.get("previous", self.last)
            self.previous = {b: c for b, c in previous.items()
                             if b in self.last and valid_full_commit(c)}
            recent = [c for c in data.get("recent", []) if isinstance(c, str)]
            self.recent = dict.fromkeys(recent[-RECENT_LIMIT:] + list(self.previous.values()))
            self.initialized = True
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            raise ConfigError(f"cannot read observer state {path}: {exc}") from None

    def get(self, branch: str) -> str | None:
        with self._lock:
            return self.last.get(branch)

    def previous_of(self, branch: str) -> str | None:
        with self._lock:
            return self.previous.get(branch)

    def branches(self) -> list[str]:
        with self._lock:
            return sorted(self.last)

    def was_dispatched(self, commit: str) -> bool:
        with self._lock:
            return commit in self.recent

    def set(self, branch: str, commit: str, dispatched: list[str] = (),
            previous: str | None = None) -> None:
        """``commit`` handled on ``branch`` after dispatching ``dispatched``;
        ``previous`` is what the branch's next commit will name (default:
        ``commit``, which was dispatched)."""
        with self._lock:
            self.last[branch] = commit
            previous = commit if previous is None and dispatched else previous
            if previous:
                self.previous[branch] = previous
            else:
                self.previous.pop(branch, None)
            for done in dispatched:
                self.recent.pop(done, None)
                self.recent[done] = None
            while len(self.recent) > RECENT_LIMIT:
                del self.recent[next(iter(self.recent))]
            self._save()

    def forget(self, branch: str) -> None:
        with self._lock:
            self.last.pop(branch, None)
            self.previous.pop(branch, None)
            self._save()

    def mark_initialized(self) -> None:
        with self._lock:
            if not self.initialized:
                self.initialized = True
                self._save()

    def _save(self) -> None:
        """Caller holds the lock."""
        data = json.dumps({"last_dispatched": self.last, "previous": self.previous,
                           "recent": list(self.recent)}, indent=1, sort_keys=True)
        atomic_write(self.path, data.encode())


class Observer:
    def __init__(self, repo: str, patterns: list[str], dispatcher: tuple[str, int],
                 poll: float, state: ObserverState, security: Security,
                 all_branches: bool = False,
                 new_branch_limit: int = DEFAULT_NEW_BRANCH_LIMIT):
        self.repo = repo
        self.patterns = patterns
        self.all_branches = all_branches
        self.new_branch_limit = new_branch_limit
        self.dispatcher = dispatcher
        self.poll = poll
        self.state = state
        self.security = security
        self.wake = threading.Event()
        # Set by a hook's notify: a push has just happened, so runners are
        # told to fetch while this observer fetches (see _update).
        self.notified = threading.Event()
        self.stop_event = threading.Event()
        self.polls = 0
        self._unmatched: set[str] = set()  # patterns already warned about
        self._child_lock = threading.Lock()
        self._child: subprocess.Popen | None = None  # the running update_repo.sh
        self.thread = threading.Thread(target=self._loop, name="poll", daemon=True)
        self.commands = {"notify": self.do_notify, "status": self.do_status}

    def do_notify(self, message: Message, peer: str) -> Message:
        log.info("notified by %s", peer)
        self.notified.set()
        self.wake.set()
        return Message("ok")

    def do_status(self, message: Message, peer: str) -> Message:
        fields = {"polls": self.polls}
        fields.update({f"branch_{i}": f"{b} {self.state.get(b) or '-'}"
                       for i, b in enumerate(self.state.branches()[:MAX_STATUS_BRANCHES])})
        return Message("ok", "", encode_fields(fields))

    def _loop(self) -> None:
        backoff = Backoff(0.25, self.poll)
        while not self.stop_event.is_set():
            self.wake.clear()
            started = time.monotonic()
            try:
                self.poll_once()
                backoff.reset()
                # Fixed rate: a commit waits at most --poll for its poll, not
                # --poll plus however long the fetch took.
                delay = max(0.0, self.poll - (time.monotonic() - started))
            except (OSError, ProtocolError, DispatcherRefused) as exc:
                delay = backoff.next()
                log.warning("dispatcher %s unavailable (%s); backlog kept, retrying in "
                            "%.1fs", format_address(self.dispatcher), exc, delay)
            except GitError as exc:
                delay = self.poll
                log.warning("updating %s failed; next poll in %.1fs: %s", self.repo,
                            delay, exc)
            except Exception:
                delay = self.poll
                log.exception("poll failed; trying again in %.1fs", delay)
            self.wake.wait(delay)

    def poll_once(self) -> None:
        """Fetch once, then handle each watched branch on its own: a branch
        that fails is logged and the others go on.  Only the dispatcher
        being unreachable ends the poll (no branch could go on)."""
        self.polls += 1
        started = time.monotonic()
        watched = self._watched(self._update())
        log.debug("poll %d: fetched in %.3fs", self.polls, time.monotonic() - started)
        for branch in self.state.branches():
            if branch not in watched:
                log.info("branch %s is gone or no longer watched; forgetting it", branch)
                self.state.forget(branch)
        first_start = not self.state.initialized
        # Known branches first: a new branch made from one of them then
        # finds their new commits already dispatched.
        order = sorted(watched, key=lambda b: (self.state.get(b) is None, b))
        for branch in order:
            try:
                self._poll_branch(branch, watched, first_start)
            except (OSError, ProtocolError):
                raise
            except (GitError, DispatcherRefused) as exc:
                log.warning("branch %s: %s; the other branches go on", branch, exc)
            except Exception:
                log.exception("branch %s failed; the other branches go on", branch)
        self.state.mark_initialized()

    def _watched(self, heads: dict[str, str]) -> dict[str, str]:
        if self.all_branches:
            return heads
        watched = {b: c for b, c in heads.items()
                   if any(fnmatch.fnmatchcase(b, p) for p in self.patterns)}
        for pattern in self.patterns:
            if any(fnmatch.fnmatchcase(b, pattern) for b in heads):
                self._unmatched.discard(pattern)
            elif pattern not in self._unmatched:
                self._unmatched.add(pattern)
                log.warning("no branch of the upstream matches %r", pattern)
        return watched

    def _poll_branch(self, branch: str, watched: dict[str, str], first_start: bool) -> None:
        head = watched[branch]
        last = self.state.get(branch)
        if last is None and not first_start:
            commits, previous = self._new_branch(branch, watched)
            if not commits:
                # Nothing of its own: its next commit follows its head, if tested.
                self.state.set(branch, head, previous=head
                               if self.state.was_dispatched(head) else None)
                log.info("new branch %s at %s: no commits of its own", branch, head[:12])
                return
        else:
            commits, rewritten = new_commits(self.repo, head, last)
            previous = self.state.previous_of(branch)
            if rewritten:
                log.warning("branch %s was rewritten (%s is no longer an ancestor of %s); "
                            "dispatching the new head only", branch, last[:12], head[:12])
        if commits:
            self._dispatch(branch, commits, previous)

    def _new_branch(self, branch: str, watched: dict[str, str]) -> tuple[list[str], str | None]:
        """The commits of a branch first seen now that no known branch has,
        the newest --new-branch-limit of them; and their previous commit:
        the fork point, if it was dispatched."""
        others = [head for other, head in watched.items()
                  if other != branch and self.state.get(other) is not None]
        commits = own_commits(self.repo, watched[branch], others)
        if len(commits) > self.new_branch_limit:
            log.warning("new branch %s has %d commits of its own; dispatching the newest %d "
                        "(--new-branch-limit)", branch, len(commits), self.new_branch_limit)
            commits = commits[-self.new_branch_limit:]
        previous = first_parent(self.repo, commits[0]) if commits else None
        if previous and not self.state.was_dispatched(previous):
            previous = None
        if commits:
            log.info("new branch %s: %d commit(s) of its own", branch, len(commits))
        return commits, previous

    def _dispatch(self, branch: str, commits: list[str], previous: str | None) -> None:
        """Send in batches; the state advances only after each is accepted."""
        for start in range(0, len(commits), BATCH):
            batch = commits[start:start + BATCH]
            log.debug("dispatching %d commit(s) of %s", len(batch), branch)
            reply = helpers.call(self.dispatcher, "dispatch", " ".join(batch),
                                 dispatch_body(batch, previous, branch),
                                 security=self.security, reply_timeout=30)
            if reply.command != "ok":
                raise DispatcherRefused(f"dispatch refused: {reply.argument}")
            self.state.set(branch, batch[-1], batch)
            previous = batch[-1]
            log.info("dispatched %d commit(s) of %s up to %s (%s)", len(batch), branch,
                     batch[-1][:12], reply.argument)

    def _update(self) -> dict[str, str]:
        """Run update_repo.sh (one fetch, every branch's head) in its own
        process group, so that stopping the observer mid-fetch leaves no
        git process behind.  Its output goes to files, not pipes, so its
        exit can be awaited without reaping it: it is forgotten (under the
        lock stop() takes) before it is reaped, after which its PID may
        belong to someone else, whom stop() must not signal."""
        cmd = ["bash", script_path("update_repo.sh"), self.repo]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            with self._child_lock:
                if self.stop_event.is_set():
                    raise GitError(["fetch"], self.repo, -1, "observer stopping")
                proc = self._child = procgroup.start(cmd, stdout=out, stderr=err,
                                                     stdin=subprocess.DEVNULL)
            if self.notified.is_set():
                self.notified.clear()
                self._prefetch()
            exited = False
            try:
                exited = procgroup.wait_exit(proc, FETCH_TIMEOUT)
            finally:
                with self._child_lock:
                    if not exited:
                        procgroup.kill_group(proc.pid)
                    self._child = None
                proc.wait()
            if not exited:
                raise GitError(["fetch"], self.repo, -1, "update_repo.sh timed out")
            out.seek(0)
            err.seek(0)
            listing = out.read(MAX_LISTING).decode(errors="replace")
            if proc.returncode:
                raise GitError(["fetch"], self.repo, proc.returncode,
                               err.read(8192).decode(errors="replace"))
        return parse_heads(listing)

    def _prefetch(self) -> None:
        """Ask the dispatcher to have idle runners fetch now, while our own
        fetch runs: the commit a hook announced then reaches a runner's
        clone in parallel with ours instead of after it.  Only a hint: the
        runner's checkout fetches anyway, so any failure is just logged."""
        try:
            reply = helpers.call(self.dispatcher, "prefetch", security=self.security,
                                 timeout=PREFETCH_TIMEOUT, reply_timeout=PREFETCH_TIMEOUT)
            log.debug("prefetch: %s %s", reply.command, reply.argument)
        except (OSError, ProtocolError) as exc:
            log.debug("prefetch not sent: %s", exc)
        except Exception:  # never worth losing the fetch running beside it
            log.exception("prefetch failed")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()
        with self._child_lock:
            if self._child is not None:
                procgroup.kill_group(self._child.pid)
        self.thread.join(10)


class DispatcherRefused(Exception):
    pass


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
    add_common_arguments(parser)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["notify"]:
        import hook_client
        return hook_client.main(argv[1:])
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
        observer = Observer(repo, branches, dispatcher, args.poll, state, security,
                            args.all_branches, args.new_branch_limit)
        if not args.no_listen:
            check_bind_allowed(args.host, security, args.insecure)
            persist_nonces(security, state_dir, "observer")
            try:
                server = helpers.MessageServer((args.host, args.port), observer.commands,
                                               security, args.max_connections)
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
