"""What the land queue needs of git and of the dispatcher, as two small
protocols, with a minimal real implementation of each.

The queue's engine only ever talks to these, so the observer's merge and
push functions (``ci/merging``) and the
dispatcher's ``verdicts``/``queue-state``/``queue-event`` clients can be
put behind them at integration without touching the engine, and tests can
drive the engine with stand-ins.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

import helpers
from ci.git import GitError, run_git
from ci.merging import MergeRepo
from ci.merging.merge import Conflict
from ci.merging.push import Landed, Stale
from ci.observer.commits import merge_plan
from ci.observer.fetchlock import fetch_lock
from ci.observer.state import ObserverState
from ci.verdicts import MAX_COMMITS, format_request, parse_reply
from ci.wire import DEFAULT_CONNECT_TIMEOUT, encode_fields, valid_full_commit

log = logging.getLogger(__name__)


class Git(Protocol):
    def branch_head(self, branch: str) -> str | None: ...
    def fresh_head(self, branch: str) -> str | None: ...
    def fresh_heads(self, *branches: str) -> dict[str, str | None]: ...
    def real_head(self, branch: str) -> str | None: ...
    def merge(self, base: str, head: str, branch: str,
              target: str) -> tuple[str | None, tuple]: ...
    def conflicts(self, base: str, head: str) -> tuple: ...
    def publish(self, commit: str, entry: int | None = None) -> None: ...
    def retire(self, active: set[int]) -> None: ...
    def land(self, target: str, old: str, new: str) -> str: ...
    def is_ancestor(self, commit: str, of: str) -> bool: ...
    def plan(self, commit: str) -> str: ...
    def author_of(self, commit: str) -> str: ...
    def delete_branch(self, branch: str, expected: str) -> None: ...


class Dispatcher(Protocol):
    def dispatch(self, lines: list[str]) -> None: ...
    def verdicts(self, commits: list[str]) -> dict[str, tuple[str, str]]: ...
    def send_state(self, body: bytes) -> None: ...
    def send_event(self, fields: dict) -> None: ...


class Refused(Exception):
    """The dispatcher answered, but not ``ok``."""


# --------------------------------------------------------------------------
# Git: the observer's clone for what the upstream has (fetched heads,
# authors), its private merge repository (ci/merging) for every merge and
# push, so nothing in a commit's content can steer either.


def land_result(outcome) -> str:
    """``landed``, ``stale`` or ``failed:<reason>`` of a ``MergeRepo.land``."""
    if isinstance(outcome, Landed):
        return "landed"
    if isinstance(outcome, Stale):
        return "stale"
    return f"failed:{outcome.reason}"


# The owner under which a queue entry's published merges are kept in the
# observer's state (beside each branch's merged results); a space is in no
# branch name, so it can never be taken for one.
QUEUE_OWNER = "land queue entry "
# An entry keeps every merge it was built as until it is finished.
KEEP_PER_ENTRY = 1000


class QueueGit:
    def __init__(self, repo: str, merge_repo: MergeRepo, state: ObserverState | None = None):
        self.repo = repo
        self.merges = merge_repo
        # Where published merges are remembered until they are deleted in
        # batches (BranchMerges.retire); None: never deleted.
        self.state = state
        self._remote: bool | None = None   # see _has_origin

    def _has_origin(self) -> bool:
        """Whether the clone fetches an origin (else it is the upstream
        itself).  Asked of git once: every ask reads two heads, and a
        process per read was on its path."""
        if self._remote is None:
            try:
                run_git(self.repo, "remote", "get-url", "origin")
                self._remote = True
            except GitError:
                self._remote = False
        return self._remote

    def _ref(self, branch: str) -> str:
        return f"refs/remotes/origin/{branch}" if self._has_origin() else f"refs/heads/{branch}"

    def branch_head(self, branch: str) -> str | None:
        try:
            out = run_git(self.repo, "rev-parse", "--verify", "--quiet",
                          f"{self._ref(branch)}^{{commit}}").strip()
        except GitError:
            return None
        return out if valid_full_commit(out) else None

    def fresh_head(self, branch: str) -> str | None:
        return self.fresh_heads(branch)[branch]

    def fresh_heads(self, *branches: str) -> dict[str, str | None]:
        """Each branch's head on the upstream, fetched into the clone now
        (an ask right after a push must not wait for the next poll), in ONE
        fetch; None for a branch the upstream does not have."""
        missing: set[str] = set()
        if self._has_origin() and not self._fetch(branches):
            # Which one the upstream lacks: each on its own (a refusal's path).
            missing = {b for b in branches if not self._fetch([b])}
        return {b: None if b in missing else self.branch_head(b) for b in branches}

    def _fetch(self, branches) -> bool:
        """False when the upstream lacks one of ``branches`` (none fetched)."""
        try:
            with fetch_lock(self.repo):   # the poll fetches this clone too
                run_git(self.repo, "fetch", "--quiet", "--no-tags", "origin",
                        *[f"+refs/heads/{b}:{self._ref(b)}" for b in branches],
                        env=dict(os.environ, GIT_TERMINAL_PROMPT="0"), timeout=120)
        except GitError as exc:
            if "couldn't find remote ref" in exc.stderr.lower():
                return False
            raise
        return True

    def real_head(self, branch: str) -> str | None:
        """The branch's head on the upstream now (not the clone's copy).
        GitError when the upstream cannot be read: never guess."""
        return self.merges.remote_head(branch)

    def merge(self, base: str, head: str, branch: str, target: str) -> tuple[str | None, tuple]:
        made = self.merges.merge(base, head, branch, target)
        if isinstance(made, Conflict):
            return None, made.paths or (made.describe(),)
        return made.commit, ()

    def conflicts(self, base: str, head: str) -> tuple:
        made = self.merges.merge(base, head, "branch", "target")
        return (made.paths or (made.describe(),)) if isinstance(made, Conflict) else ()

    def publish(self, commit: str, entry: int | None = None) -> None:
        """Push ``commit`` under refs/ci/merges/ (where runners fetch it),
        remembered as ``entry``'s until that entry is finished."""
        self.merges.publish([commit])
        if self.state is not None and entry is not None:
            self.state.add_published(f"{QUEUE_OWNER}{entry}", commit, KEEP_PER_ENTRY)

    def retire(self, active: set[int]) -> None:
        """The published merges of every entry not in ``active`` (landed:
        the target holds them now; rejected, cancelled, or rebuilt since)
        are handed to the observer's batch deletion of old merges.  Kept
        while the entry is active, even those it was rebuilt from: one may
        still wait at the dispatcher, and a runner must be able to fetch it."""
        if self.state is None:
            return
        for owner in self.state.owners():
            if owner.startswith(QUEUE_OWNER):
                number = owner[len(QUEUE_OWNER):]
                if not (number.isdigit() and int(number) in active):
                    self.state.forget(owner)

    def land(self, target: str, old: str, new: str) -> str:
        return land_result(self.merges.land(target, old, new))

    def is_ancestor(self, commit: str, of: str) -> bool:
        """In the merge repository, which sees the clone's commits and its
        own merges alike."""
        return self.merges.is_ancestor(commit, of)

    def plan(self, commit: str) -> str:
        """The dispatch line's matrix field of a merge made here ("" for
        none): without it, a recipe's matrix and labels were dropped, and
        one plain run on any runner could land the branch."""
        return merge_plan(self.merges, commit)

    def author_of(self, commit: str) -> str:
        try:
            return run_git(self.repo, "log", "-1", "--format=%ae", commit).strip()
        except GitError:
            return ""

    def delete_branch(self, branch: str, expected: str) -> None:
        """Delete the upstream's ``branch`` if it is still at ``expected``."""
        self.merges.delete_branch(branch, expected)


# --------------------------------------------------------------------------
# The dispatcher, by its commands.


class DispatcherClient:
    def __init__(self, address: tuple[str, int], security):
        self.address = address
        self.security = security

    def _call(self, command: str, argument: str = "", body: bytes = b""):
        reply = helpers.call(self.address, command, argument, body, security=self.security,
                             timeout=(DEFAULT_CONNECT_TIMEOUT, 30))
        if reply.command != "ok":
            raise Refused(f"{command} refused: {reply.command} {reply.argument}")
        return reply

    def dispatch(self, lines: list[str]) -> None:
        commits = [line.split(" ", 1)[0] for line in lines]
        self._call("dispatch", " ".join(commits), ("\n".join(lines) + "\n").encode())

    def verdicts(self, commits: list[str]) -> dict[str, tuple[str, str]]:
        """Asked in batches of the most one request may name (ci/verdicts.py
        formats and parses both sides)."""
        found = {}
        for start in range(0, len(commits), MAX_COMMITS):
            batch = commits[start:start + MAX_COMMITS]
            found.update(parse_reply(self._call("verdicts", format_request(batch)).body))
        return found

    def send_state(self, body: bytes) -> None:
        self._call("queue-state", "", body)

    def send_event(self, fields: dict) -> None:
        self._call("queue-event", "", encode_fields(fields))
