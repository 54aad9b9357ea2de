"""What the land queue needs of git and of the dispatcher, as two small
protocols, with a minimal real implementation of each.

The queue's engine only ever talks to these, so the observer's merge and
push functions (``ci/merging``, issue 22 contract section 5) and the
dispatcher's ``verdicts``/``queue-state``/``queue-event`` clients can be
put behind them at integration without touching the engine, and tests can
drive the engine with stand-ins.
"""

from __future__ import annotations

import logging
import os
import subprocess
from typing import Protocol

import helpers
from ci.git import GitError, run_git
from ci.wire import encode_fields, valid_full_commit

log = logging.getLogger(__name__)

DEFAULT_IDENTITY = ("CI merge queue", "ci@localhost")
# verdicts: asks at most this many commits at once (contract section 3).
MAX_VERDICTS = 200


class Git(Protocol):
    def branch_head(self, branch: str) -> str | None: ...
    def fresh_head(self, branch: str) -> str | None: ...
    def real_head(self, branch: str) -> str | None: ...
    def merge(self, base: str, head: str, message: str) -> tuple[str | None, tuple]: ...
    def conflicts(self, base: str, head: str) -> tuple: ...
    def publish(self, commit: str) -> None: ...
    def land(self, target: str, old: str, new: str) -> str: ...
    def is_ancestor(self, commit: str, of: str) -> bool: ...
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
# Git, by plain git processes in the observer's clone.  (The contract's
# private merge repository and push credentials are ci/merging's.)


def parse_push_porcelain(code: int, out: str) -> str:
    """``landed``, ``stale`` or ``failed:<reason>`` from ``git push
    --porcelain``'s output (stdout and stderr) and exit code."""
    flags = [line.split("\t", 2) for line in out.splitlines() if "\t" in line]
    refs = [parts for parts in flags if len(parts) >= 2 and parts[0] in " +-*=!"]
    if code == 0 and refs and all(p[0] in " +*=" for p in refs):
        return "landed"
    text = out.lower()
    if "stale info" in text or "fetch first" in text or "non-fast-forward" in text:
        return "stale"
    reason = " ".join(out.split())[-300:] or f"git push exited {code}"
    return f"failed:{reason}"


class GitCli:
    def __init__(self, repo: str, push_url: str | None = None,
                 identity: tuple[str, str] = DEFAULT_IDENTITY):
        self.repo = repo
        self.identity = identity
        self._push_url = push_url

    @property
    def push_url(self) -> str:
        if self._push_url is None:
            try:
                self._push_url = run_git(self.repo, "remote", "get-url", "origin").strip()
            except GitError:
                self._push_url = self.repo   # watching the upstream itself
        return self._push_url

    def _env(self) -> dict:
        name, email = self.identity
        return dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_AUTHOR_NAME=name,
                    GIT_AUTHOR_EMAIL=email, GIT_COMMITTER_NAME=name,
                    GIT_COMMITTER_EMAIL=email)

    def _ref(self, branch: str) -> str:
        try:
            run_git(self.repo, "remote", "get-url", "origin")
            return f"refs/remotes/origin/{branch}"
        except GitError:
            return f"refs/heads/{branch}"

    def branch_head(self, branch: str) -> str | None:
        try:
            out = run_git(self.repo, "rev-parse", "--verify", "--quiet",
                          f"{self._ref(branch)}^{{commit}}").strip()
        except GitError:
            return None
        return out if valid_full_commit(out) else None

    def fresh_head(self, branch: str) -> str | None:
        """The branch's head on the upstream, fetched into the clone now
        (an ask right after a push must not wait for the next poll);
        None when the upstream has no such branch."""
        ref = self._ref(branch)
        if ref.startswith("refs/remotes/"):
            try:
                run_git(self.repo, "fetch", "--quiet", "--no-tags", "origin",
                        f"+refs/heads/{branch}:{ref}", env=self._env(), timeout=120)
            except GitError as exc:
                if "couldn't find remote ref" in exc.stderr.lower():
                    return None
                raise
        return self.branch_head(branch)

    def real_head(self, branch: str) -> str | None:
        """The branch's head on the upstream now (not the clone's copy).
        GitError when the upstream cannot be read: never guess."""
        out = run_git(self.repo, "ls-remote", self.push_url, f"refs/heads/{branch}",
                      env=self._env(), timeout=60)
        for line in out.splitlines():
            commit, _, ref = line.partition("\t")
            if ref == f"refs/heads/{branch}" and valid_full_commit(commit):
                return commit
        return None

    def _merge_tree(self, base: str, head: str) -> tuple[str | None, tuple]:
        proc = subprocess.run(["git", "-C", self.repo, "merge-tree", "--write-tree",
                               "--name-only", "--no-messages", base, head],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=120, env=self._env())
        lines = proc.stdout.splitlines()
        if proc.returncode == 0 and lines:
            return lines[0], ()
        if proc.returncode == 1 and lines:
            return None, tuple(dict.fromkeys(line for line in lines[1:] if line))
        raise GitError(["merge-tree", base, head], self.repo, proc.returncode, proc.stderr)

    def conflicts(self, base: str, head: str) -> tuple:
        return self._merge_tree(base, head)[1]

    def merge(self, base: str, head: str, message: str) -> tuple[str | None, tuple]:
        tree, paths = self._merge_tree(base, head)
        if tree is None:
            return None, paths
        commit = run_git(self.repo, "commit-tree", tree, "-p", base, "-p", head, "-m", message,
                         env=self._env()).strip()
        return commit, ()

    def publish(self, commit: str) -> None:
        run_git(self.repo, "push", "--quiet", self.push_url,
                f"{commit}:refs/ci/merges/{commit}", env=self._env(), timeout=120)

    def land(self, target: str, old: str, new: str) -> str:
        parent = run_git(self.repo, "rev-parse", "--verify", f"{new}^1").strip()
        if parent != old:
            return f"failed:{new[:12]} is not a child of {old[:12]}"
        proc = subprocess.run(
            ["git", "-C", self.repo, "push", "--porcelain", "--atomic",
             f"--force-with-lease=refs/heads/{target}:{old}", self.push_url,
             f"{new}:refs/heads/{target}"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
            env=self._env())
        result = parse_push_porcelain(proc.returncode, proc.stdout + "\n" + proc.stderr)
        if result == "landed":
            self._track(target, new)
        return result

    def _track(self, branch: str, commit: str) -> None:
        ref = self._ref(branch)
        if ref.startswith("refs/remotes/"):
            try:
                run_git(self.repo, "update-ref", ref, commit)
            except GitError as exc:
                log.debug("could not move %s: %s", ref, exc)

    def is_ancestor(self, commit: str, of: str) -> bool:
        try:
            run_git(self.repo, "merge-base", "--is-ancestor", commit, of)
            return True
        except GitError as exc:
            if exc.code == 1:
                return False
            raise

    def author_of(self, commit: str) -> str:
        try:
            return run_git(self.repo, "log", "-1", "--format=%ae", commit).strip()
        except GitError:
            return ""

    def delete_branch(self, branch: str, expected: str) -> None:
        """Delete the upstream's ``branch`` if it is still at ``expected``."""
        run_git(self.repo, "push", "--quiet", "--porcelain",
                f"--force-with-lease=refs/heads/{branch}:{expected}", self.push_url,
                f":refs/heads/{branch}", env=self._env(), timeout=120)


# --------------------------------------------------------------------------
# The dispatcher, by its commands (contract sections 3 and 4).


def parse_verdicts(body: bytes) -> dict[str, tuple[str, str]]:
    """``verdicts``'s reply body: ``<commit> <state> <reason>`` a line."""
    found = {}
    for line in body.decode("utf-8", "replace").splitlines():
        parts = line.split(" ", 2)
        if len(parts) >= 2 and valid_full_commit(parts[0]) and parts[1]:
            reason = parts[2] if len(parts) == 3 else "-"
            found[parts[0]] = (parts[1], reason)
    return found


class DispatcherClient:
    def __init__(self, address: tuple[str, int], security):
        self.address = address
        self.security = security

    def _call(self, command: str, argument: str = "", body: bytes = b""):
        reply = helpers.call(self.address, command, argument, body, security=self.security,
                             reply_timeout=30)
        if reply.command != "ok":
            raise Refused(f"{command} refused: {reply.command} {reply.argument}")
        return reply

    def dispatch(self, lines: list[str]) -> None:
        commits = [line.split(" ", 1)[0] for line in lines]
        self._call("dispatch", " ".join(commits), ("\n".join(lines) + "\n").encode())

    def verdicts(self, commits: list[str]) -> dict[str, tuple[str, str]]:
        found = {}
        for start in range(0, len(commits), MAX_VERDICTS):
            batch = commits[start:start + MAX_VERDICTS]
            found.update(parse_verdicts(self._call("verdicts", " ".join(batch)).body))
        return found

    def send_state(self, body: bytes) -> None:
        self._call("queue-state", "", body)

    def send_event(self, fields: dict) -> None:
        self._call("queue-event", "", encode_fields(fields))
