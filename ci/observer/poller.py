"""The observer's work: poll (on a timer, or at once when a hook says
``notify``), fetch once for every branch, and dispatch each watched
branch's new commits; a failing branch or an unreachable dispatcher is
logged and retried, never fatal."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import subprocess
import tempfile
import threading
import time

import helpers
from ci import procgroup
from ci.backoff import Backoff
from ci.git import GitError, script_path
from ci.security import Security
from ci.wire import (DEFAULT_CONNECT_TIMEOUT, Message, ProtocolError, encode_fields,
                     format_address)
from ci.observer.commits import (MAX_LISTING, dispatch_batches, dispatch_body, first_parent,
                                 new_commits, own_commits, parse_heads, plan_fields)
from ci.landing.commands import QueueCommands
from ci.observer.fetchlock import fetch_lock
from ci.merging import Merged
from ci.observer.merges import BranchMerges
from ci.observer.state import ObserverState

log = logging.getLogger(__name__)


# Commits per ``dispatch`` message: one fsync on the dispatcher per batch.
BATCH = 200


# Update of the clone may hang on a dead network: bound it.
FETCH_TIMEOUT = 300


# The prefetch hint waits no longer than this (it runs beside our own fetch).
PREFETCH_TIMEOUT = 0.5


# Pushing an old branch must not flood the queue with its whole history.
DEFAULT_NEW_BRANCH_LIMIT = 20


# The status reply is a field list of bounded length.
MAX_STATUS_BRANCHES = 50


@dataclasses.dataclass(frozen=True)
class Watch:
    """What to watch: the clone, which branches (patterns, or all), how
    often to poll (``queue_poll``: while the land queue has work; None:
    as often), and how far back a new branch's commits go."""
    repo: str
    patterns: list[str]
    poll: float
    all_branches: bool = False
    new_branch_limit: int = DEFAULT_NEW_BRANCH_LIMIT
    queue_poll: float | None = None


class Observer:
    def __init__(self, watch: Watch, dispatcher: tuple[str, int], state: ObserverState,
                 security: Security, merges: BranchMerges | None = None, engine=None):
        self.repo = watch.repo
        self.patterns = watch.patterns
        self.all_branches = watch.all_branches
        self.new_branch_limit = watch.new_branch_limit
        self.dispatcher = dispatcher
        self.poll = watch.poll
        self.state = state
        self.security = security
        self.wake = threading.Event()
        # Set by a hook's notify: a push has just happened, so runners are
        # told to fetch while this observer fetches (see _update).
        self.notified = threading.Event()
        self.stop_event = threading.Event()
        self.polls = 0
        self._unmatched: set[str] = set()  # patterns already warned about
        self._skipped_names: set[str] = set()  # unusable branch names already warned about
        # --merge-into: branches tested as merged into their target.
        self.merges = merges
        self._missing_targets: set[str] = set()  # already warned about
        self._child = procgroup.Child()  # runs update_repo.sh
        self.thread = threading.Thread(target=self._loop, name="poll", daemon=True)
        # The land queue (ci/landing), run in this poll loop; None: off.
        self.engine = engine
        self.commands = {"notify": self.do_notify, "status": self.do_status,
                         **QueueCommands(engine).commands}
        self.queue_poll = watch.queue_poll or self.poll
        if engine is not None:
            engine.wake = self.wake.set

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
                every = self.poll
                if self.engine is not None and self.engine.busy():
                    every = min(every, self.queue_poll)
                delay = max(0.0, every - (time.monotonic() - started))
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
        heads = self._update()
        log.debug("poll %d: fetched in %.3fs", self.polls, time.monotonic() - started)
        if self.engine is not None:
            # Before the branches: a queue entry waits on no dispatch backlog.
            try:
                self.engine.step(heads)
            except Exception:
                log.exception("land queue step failed; trying again next poll")
            heads = {b: c for b, c in heads.items() if not b.startswith("land/")}
        watched = self._watched(heads)
        for branch in self.state.branches():
            if branch not in watched:
                log.info("branch %s is gone or no longer watched; forgetting it", branch)
                self.state.forget(branch)
                if self.merges is not None:
                    self.merges.forget(branch)
        first_start = not self.state.initialized
        # Known branches first: a new branch made from one of them then
        # finds their new commits already dispatched.
        order = sorted(watched, key=lambda b: (self.state.get(b) is None, b))
        for branch in order:
            try:
                target = self.merges.target_of(branch) if self.merges is not None else None
                if target is not None:
                    self._poll_merge_branch(branch, watched[branch], target, heads)
                else:
                    self._poll_branch(branch, watched, first_start)
            except (OSError, ProtocolError):
                raise
            except (GitError, DispatcherRefused) as exc:
                log.warning("branch %s: %s; the other branches go on", branch, exc)
            except Exception:
                log.exception("branch %s failed; the other branches go on", branch)
        self.state.mark_initialized()
        if self.merges is not None:
            self.merges.retire()

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
                # Force-pushed: its new commits, as a new branch's (they have
                # new ids; only the head was sent, the rest never tested).
                log.warning("branch %s was rewritten (%s is no longer an ancestor of %s); "
                            "dispatching its new commits", branch, last[:12], head[:12])
                commits, previous = self._new_branch(branch, watched, also_not=last)
                commits = commits or [head]
        if commits:
            self._dispatch(branch, commits, previous)

    def _poll_merge_branch(self, branch: str, head: str, target: str,
                           heads: dict[str, str]) -> None:
        """A branch tested as merged into ``target``: one merge per new head
        (the intermediate commits are not tested one by one)."""
        if self.state.get(branch) == head:
            return
        target_commit = heads.get(target)
        if target_commit is None:
            if target not in self._missing_targets:
                self._missing_targets.add(target)
                log.warning("branch %s is to be merged into %s, which the upstream does not "
                            "have; it waits until %s exists", branch, target, target)
            return
        self._missing_targets.discard(target)
        if self.merges.already_merged(head, target_commit):
            # Nothing of its own to test; its next head is merged as usual.
            self.state.set(branch, head, previous=self.state.previous_of(branch))
            log.info("branch %s at %s is already in %s: nothing to merge", branch, head[:12],
                     target)
            return
        prepared = self.merges.prepare(branch, head, target, target_commit)
        previous = self.state.previous_of(branch)
        body = dispatch_body([prepared.commit], previous, branch,
                             {prepared.commit: prepared.fields})
        reply = self._send([prepared.commit], body)
        self.state.set(branch, head, [prepared.commit], previous=prepared.commit)
        log.info("dispatched %s of %s (%s): %s", "the merge" if isinstance(
                     prepared.result, Merged) else "the conflict", branch,
                 prepared.commit[:12], reply.argument)

    def _new_branch(self, branch: str, watched: dict[str, str],
                    also_not: str | None = None) -> tuple[list[str], str | None]:
        """The commits of a branch first seen now (or rewritten: not on its
        old line ``also_not`` either) that no known branch has, the newest
        --new-branch-limit of them; and their previous commit: the fork
        point, if it was dispatched."""
        others = [head for other, head in watched.items()
                  if other != branch and self.state.get(other) is not None]
        try:
            commits = own_commits(self.repo, watched[branch],
                                  others + ([also_not] if also_not else []))
        except GitError:
            if not also_not:
                raise
            commits = own_commits(self.repo, watched[branch], others)   # the old line is gone
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
        """Send in batches (of BATCH commits, fewer where their matrices
        make the message large); the state advances only after each is
        accepted."""
        for start in range(0, len(commits), BATCH):
            chunk = commits[start:start + BATCH]
            plans = plan_fields(self.repo, chunk)
            for batch, body in dispatch_batches(chunk, previous, branch, plans, BATCH):
                log.debug("dispatching %d commit(s) of %s", len(batch), branch)
                reply = self._send(batch, body)
                self.state.set(branch, batch[-1], batch)
                previous = batch[-1]
                log.info("dispatched %d commit(s) of %s up to %s (%s)", len(batch), branch,
                         batch[-1][:12], reply.argument)

    def _send(self, commits: list[str], body: bytes) -> Message:
        """One ``dispatch``; DispatcherRefused unless the reply is ok."""
        reply = helpers.call(self.dispatcher, "dispatch", " ".join(commits), body,
                             security=self.security,
                             timeout=(DEFAULT_CONNECT_TIMEOUT, 30))
        if reply.command != "ok":
            raise DispatcherRefused(f"dispatch refused: {reply.argument}")
        return reply

    def _update(self) -> dict[str, str]:
        """Run update_repo.sh (one fetch, every branch's head) in its own
        process group, so that stopping the observer mid-fetch leaves no
        git process behind (``procgroup.Child``: a stop never signals a
        reaped PID that may be someone else's by then)."""
        cmd = ["bash", script_path("update_repo.sh"), self.repo]
        # The land queue's asks fetch this clone from the listener's threads.
        with fetch_lock(self.repo), tempfile.TemporaryFile() as out, \
                tempfile.TemporaryFile() as err:
            proc = self._child.start(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
            if proc is None:
                raise GitError(["fetch"], self.repo, -1, "observer stopping")
            if self.notified.is_set():
                self.notified.clear()
                self._prefetch()
            if not self._child.finish(proc, FETCH_TIMEOUT, end_group=False):
                raise GitError(["fetch"], self.repo, -1, "update_repo.sh timed out")
            out.seek(0)
            err.seek(0)
            listing = out.read(MAX_LISTING + 1)
            if proc.returncode:
                raise GitError(["fetch"], self.repo, proc.returncode,
                               err.read(8192).decode(errors="replace"))
            if len(listing) > MAX_LISTING:
                raise GitError(["for-each-ref"], self.repo, 0,
                               f"the upstream lists more than {MAX_LISTING} bytes of branches")
        skipped: list[str] = []
        heads = parse_heads(listing.decode(errors="replace"), skipped)
        for name in sorted(set(skipped) - self._skipped_names):
            log.warning("branch %r is not watched: its name is not printable UTF-8 without "
                        "spaces", name)
        self._skipped_names = set(skipped)
        return heads

    def _prefetch(self) -> None:
        """Ask the dispatcher to have idle runners fetch now, while our own
        fetch runs: the commit a hook announced then reaches a runner's
        clone in parallel with ours instead of after it.  Only a hint: the
        runner's checkout fetches anyway, so any failure is just logged."""
        try:
            reply = helpers.call(self.dispatcher, "prefetch", security=self.security,
                                 timeout=(PREFETCH_TIMEOUT, PREFETCH_TIMEOUT))
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
        self._child.cancel()
        if self.merges is not None:
            self.merges.repo.cancel()
        self.thread.join(10)
        if self.engine is not None:
            self.engine.close()


class DispatcherRefused(Exception):
    pass
