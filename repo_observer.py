"""The repository observer: fetches its clone every ``--poll`` seconds (or
at once when a git hook sends ``notify``) and dispatches every new commit
of each watched branch, oldest first, along the first-parent line.

The last dispatched commit per branch is kept in a state file and is
advanced only after the dispatcher has durably accepted the commits, so
nothing is skipped across restarts and outages: the backlog is simply
``git rev-list <head> ^<last>``, recomputed on every poll.

usage:  repo_observer.py [options] REPO
        repo_observer.py notify [--observer HOST:PORT]   (for git hooks)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import helpers
from helpers import GitError, Message

log = logging.getLogger(__name__)

DEFAULT_DISPATCHER = "localhost:8888"
DEFAULT_POLL = 5.0
DEFAULT_HOST = "localhost"
DEFAULT_PORT = 8887
# Commits per ``dispatch`` message: one fsync on the dispatcher per batch.
BATCH = 200
# Update of the clone may hang on a dead network: bound it.
FETCH_TIMEOUT = 300


# --------------------------------------------------------------------------
# Working out what to dispatch.

def new_commits(repo: str, head: str, last: str | None) -> tuple[list[str], bool]:
    """Commits after ``last`` up to ``head``, oldest first, on the
    first-parent line; (commits, history_rewritten)."""
    if last is None:
        return [head], False
    if last == head:
        return [], False
    try:
        helpers.run_git(repo, "merge-base", "--is-ancestor", last, head)
    except GitError as exc:
        if exc.code in (1, 128):  # not an ancestor, or no longer known at all
            return [head], True
        raise
    out = helpers.run_git(repo, "rev-list", "--first-parent", "--reverse", head, f"^{last}")
    return out.split(), False


class ObserverState:
    """Last dispatched commit per branch, persisted atomically."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self.last: dict[str, str] = {}
        try:
            with open(path, "rb") as handle:
                data = json.loads(handle.read() or b"{}")
            self.last = {b: c for b, c in data.get("last_dispatched", {}).items()
                         if isinstance(b, str) and helpers.valid_full_commit(c)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            raise helpers.ConfigError(f"cannot read observer state {path}: {exc}") from None

    def get(self, branch: str) -> str | None:
        with self._lock:
            return self.last.get(branch)

    def set(self, branch: str, commit: str) -> None:
        with self._lock:
            self.last[branch] = commit
            data = json.dumps({"last_dispatched": self.last}, indent=1, sort_keys=True)
            helpers.atomic_write(self.path, data.encode())


class Observer:
    def __init__(self, repo: str, branches: list[str], dispatcher: tuple[str, int],
                 poll: float, state: ObserverState, security: helpers.Security):
        self.repo = repo
        self.branches = branches
        self.dispatcher = dispatcher
        self.poll = poll
        self.state = state
        self.security = security
        self.wake = threading.Event()
        self.stop_event = threading.Event()
        self.polls = 0
        self._child_lock = threading.Lock()
        self._child: subprocess.Popen | None = None  # the running update_repo.sh
        self.thread = threading.Thread(target=self._loop, name="poll", daemon=True)
        self.commands = {"notify": self.do_notify, "status": self.do_status}

    def do_notify(self, message: Message, peer: str) -> Message:
        log.info("notified by %s", peer)
        self.wake.set()
        return Message("ok")

    def do_status(self, message: Message, peer: str) -> Message:
        fields = {"polls": self.polls}
        fields.update({f"branch_{i}": f"{b} {self.state.get(b) or '-'}"
                       for i, b in enumerate(self.branches)})
        return Message("ok", "", helpers.encode_fields(fields))

    def _loop(self) -> None:
        backoff = helpers.Backoff(0.25, self.poll)
        while not self.stop_event.is_set():
            self.wake.clear()
            started = time.monotonic()
            try:
                self.poll_once()
                backoff.reset()
                # Fixed rate: a commit waits at most --poll for its poll, not
                # --poll plus however long the fetch took.
                delay = max(0.0, self.poll - (time.monotonic() - started))
            except (OSError, helpers.ProtocolError, DispatcherRefused) as exc:
                delay = backoff.next()
                log.warning("dispatcher %s unavailable (%s); backlog kept, retrying in "
                            "%.1fs", helpers.format_address(self.dispatcher), exc, delay)
            except GitError as exc:
                delay = self.poll
                log.warning("updating %s failed; next poll in %.1fs: %s", self.repo,
                            delay, exc)
            except Exception:
                delay = self.poll
                log.exception("poll failed; trying again in %.1fs", delay)
            self.wake.wait(delay)

    def poll_once(self) -> None:
        """Fetch, then dispatch each branch's new commits in batches."""
        self.polls += 1
        for branch in self.branches:
            head = self._update(branch)
            last = self.state.get(branch)
            commits, rewritten = new_commits(self.repo, head, last)
            if rewritten:
                log.warning("branch %s was rewritten (%s is no longer an ancestor of %s); "
                            "dispatching the new head only", branch, last[:12], head[:12])
            if not commits:
                continue
            self._check_dispatcher()
            for start in range(0, len(commits), BATCH):
                batch = commits[start:start + BATCH]
                reply = helpers.call(self.dispatcher, "dispatch", " ".join(batch),
                                     security=self.security, reply_timeout=30)
                if reply.command != "ok":
                    raise DispatcherRefused(f"dispatch refused: {reply.argument}")
                self.state.set(branch, batch[-1])
                log.info("dispatched %d commit(s) of %s up to %s (%s)", len(batch), branch,
                         batch[-1][:12], reply.argument)

    def _update(self, branch: str) -> str:
        """Run update_repo.sh in its own process group, so that stopping
        the observer mid-fetch leaves no git process behind."""
        cmd = ["bash", helpers.script_path("update_repo.sh"), self.repo, branch]
        with self._child_lock:
            if self.stop_event.is_set():
                raise GitError(["fetch"], self.repo, -1, "observer stopping")
            proc = self._child = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=FETCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            raise GitError(["fetch"], self.repo, -1, "update_repo.sh timed out") from None
        finally:
            with self._child_lock:
                self._child = None
        head = out.strip()
        if proc.returncode or not helpers.valid_full_commit(head):
            raise GitError(["fetch"], self.repo, proc.returncode, err)
        return head

    def _check_dispatcher(self) -> None:
        reply = helpers.call(self.dispatcher, "status", security=self.security)
        if reply.command != "ok":
            raise DispatcherRefused(f"status answered {reply.command} {reply.argument}")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()
        with self._child_lock:
            if self._child is not None:
                _kill_group(self._child)
        self.thread.join(10)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class DispatcherRefused(Exception):
    pass


def default_branch(repo: str) -> str:
    """The upstream's default branch, else the clone's current branch."""
    for args in (("symbolic-ref", "--short", "refs/remotes/origin/HEAD"),
                 ("symbolic-ref", "--short", "HEAD")):
        try:
            name = helpers.run_git(repo, *args).strip()
        except GitError:
            continue
        return name.removeprefix("origin/")
    raise helpers.ConfigError(f"cannot tell the default branch of {repo}; give --branch")


# --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = helpers.ArgumentParser(
        description="CI repository observer: dispatches every new commit to the dispatcher.",
        epilog="For git hooks: repo_observer.py notify [--observer HOST:PORT] wakes a running "
               "observer at once (see 'repo_observer.py notify --help').")
    parser.add_argument("repo", metavar="REPO", help="the observer's own clone of the upstream")
    parser.add_argument("--dispatcher-server", default=DEFAULT_DISPATCHER, metavar="HOST:PORT",
                        help="the dispatcher's address (default: %(default)s)")
    parser.add_argument("--poll", type=float, default=DEFAULT_POLL, metavar="SECONDS",
                        help="seconds between polls of the upstream (default: %(default)s)")
    parser.add_argument("--branch", action="append", metavar="NAME",
                        help="branch to watch; repeat for several (default: the upstream's "
                             "default branch)")
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
    helpers.add_common_arguments(parser)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["notify"]:
        return helpers.client_main(
            "repo_observer.py notify", "Wake a running observer so it polls now "
            "(use in a post-receive or post-commit hook).", "notify", "--observer",
            f"{DEFAULT_HOST}:{DEFAULT_PORT}", argv[1:], server_role="observer")
    args = build_parser().parse_args(argv)
    helpers.configure_logging(args.log_level)
    server = None
    try:
        if args.poll <= 0:
            raise helpers.ConfigError("--poll must be positive")
        try:
            dispatcher = helpers.parse_address(args.dispatcher_server)
        except ValueError as exc:
            raise helpers.ConfigError(str(exc)) from None
        repo = os.path.abspath(args.repo)
        if not os.path.isdir(os.path.join(repo, ".git")):
            raise helpers.ConfigError(f"{args.repo} is not a git clone (no .git folder)")
        branches = args.branch or [default_branch(repo)]
        for branch in branches:
            if subprocess.run(["git", "check-ref-format", "--branch", branch],
                              capture_output=True).returncode:
                raise helpers.ConfigError(f"invalid branch name {branch!r}")
        security = helpers.security_from_args(args)
        if security.server_tls:
            # Hooks hold the observer's (or an operator's) certificate; the
            # dispatcher must present the dispatcher's.
            security.tls_client_roles = frozenset({"observer", "operator"})
            security.tls_server_role = "dispatcher"
        state_dir = helpers.ensure_dir(args.state_dir or os.path.join(repo, ".git", "ci-observer"),
                                       "state folder")
        state = ObserverState(os.path.join(state_dir, "state.json"))
        observer = Observer(repo, branches, dispatcher, args.poll, state, security)
        if not args.no_listen:
            helpers.check_bind_allowed(args.host, security, args.insecure)
            try:
                server = helpers.MessageServer((args.host, args.port), observer.commands,
                                               security, args.max_connections)
            except OSError as exc:
                raise helpers.ConfigError(
                    f"cannot listen on {args.host}:{args.port}: {exc.strerror} "
                    "(use --port or --no-listen)") from None
    except helpers.ConfigError as exc:
        print(f"repo_observer: error: {exc}", file=sys.stderr)
        return 2
    log.info("observing %s branch(es) %s every %.1fs; dispatcher %s%s", repo,
             ", ".join(branches), args.poll, helpers.format_address(dispatcher),
             f"; notify on {helpers.format_address(server.server_address[:2])}"
             if server else "")
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
