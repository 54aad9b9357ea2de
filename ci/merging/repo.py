"""``MergeRepo``: the observer's private merge repository and its pushes,
the one object the observer (and its land queue) holds for git writes.

Every git process it starts is bounded in time and redacted (``gitproc``)
and runs in the isolated environment (``isolation``)."""

from __future__ import annotations

import logging

from ci.git import GitError, TooLarge, read_blobs
from ci.mergeinfo import TARGET_RE
from ci.wire import valid_full_commit
from ci.merging import isolation, merge as merging, push
from ci.merging.gitproc import GitRunner, GitTimeout
from ci.merging.merge import Conflict, Merged
from ci.merging.push import Failed, Landed, Stale
from ci.merging.url import PushUrl

log = logging.getLogger(__name__)

MERGE_TIMEOUT = 120.0
COMMIT_TIMEOUT = 30.0
PUSH_TIMEOUT = 120.0
LS_REMOTE_TIMEOUT = 60.0
# Refs per push: one process for many, but a command line of bounded length.
REFS_PER_PUSH = 500


class MergeRepo:
    def __init__(self, clone: str, state_dir: str, push_url: PushUrl,
                 identity: tuple[str, str] = merging.parse_identity(merging.DEFAULT_IDENTITY)):
        self.clone = clone
        self.push_url = push_url
        self.identity = identity
        self.path, home, hooks = isolation.prepare(clone, state_dir)
        self.git = GitRunner(isolation.git_env(self.path, home, hooks), self.path,
                             push_url.redact)
        # The upstream as git's command line names it, and the credentials
        # it lacks, for the environment of the git processes that call it.
        self.remote = push_url.argument
        self.remote_env = isolation.added_config(self.git.env, push_url.git_config)

    # ---- merging --------------------------------------------------------
    def merge(self, target_commit: str, head: str, branch: str,
              target_branch: str) -> Merged | Conflict:
        """``head`` (of ``branch``) merged into ``target_branch`` at
        ``target_commit``: the merge commit, or the conflicting paths.
        GitError if git cannot tell (a missing commit, a timeout)."""
        for commit in (target_commit, head):
            if not valid_full_commit(commit):
                raise ValueError(f"not a full commit id: {commit!r}")
        try:
            done = self.git.run("merge-tree", "--write-tree", "--name-only", "--no-messages",
                                "-z", target_commit, head, timeout=MERGE_TIMEOUT, ok=(0, 1))
        except GitTimeout:
            raise
        except GitError as exc:   # not a conflict: a failure, unless no history is shared
            if merging.unrelated(exc.stderr):
                return Conflict((), f"{branch} and {target_branch} have no common history")
            raise
        try:
            tree, paths = merging.parse_merge_tree(done.code, done.stdout)
        except ValueError as exc:
            raise GitError(["merge-tree"], self.path, done.code, str(exc)) from None
        if paths:
            return Conflict(paths)
        name, email = self.identity
        made = self.git.run(
            "commit-tree", tree, "-p", target_commit, "-p", head,
            "-m", merging.merge_message(branch, target_branch), timeout=COMMIT_TIMEOUT,
            env={"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email,
                 "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email})
        commit = made.stdout.decode("ascii", "replace").strip()
        if not valid_full_commit(commit):
            raise GitError(["commit-tree"], self.path, 0, f"printed {commit[:80]!r}")
        return Merged(commit, tree)

    def read_blob(self, commit: str, path: str, max_size: int) -> bytes | TooLarge | None:
        """A file of a commit this repository knows (a merge it made), None
        if there is no such file, TooLarge past ``max_size`` bytes (the
        file is a pushed branch's: ``read_blobs`` asks its size first)."""
        spec = f"{commit}:{path}"
        return read_blobs(self.path, [spec], max_size, timeout=COMMIT_TIMEOUT,
                          env=self.git.env)[spec]

    def first_parent(self, commit: str) -> str | None:
        done = self.git.run("rev-parse", "--verify", "--quiet", f"{commit}^1^{{commit}}",
                            timeout=COMMIT_TIMEOUT, ok=(0, 1, 128))
        parent = done.stdout.decode("ascii", "replace").strip()
        return parent if done.code == 0 and valid_full_commit(parent) else None

    # ---- pushing --------------------------------------------------------
    def publish(self, commits: list[str]) -> None:
        """Push each commit to ``refs/ci/merges/<commit>`` (one push per
        REFS_PER_PUSH); GitError naming the refs the remote did not take."""
        self._push_refs([f"{c}:{push.merge_ref(c)}" for c in self._valid(commits)], "publish")

    def unpublish(self, commits: list[str]) -> None:
        """Delete ``refs/ci/merges/<commit>`` of each (one that is already
        gone is fine: the remote only warns)."""
        self._push_refs([f":{push.merge_ref(c)}" for c in self._valid(commits)], "unpublish")

    def _push_refs(self, refspecs: list[str], what: str) -> None:
        for start in range(0, len(refspecs), REFS_PER_PUSH):
            chunk = refspecs[start:start + REFS_PER_PUSH]
            done = self.git.run("push", "--porcelain", "--no-verify", self.remote, *chunk,
                                timeout=PUSH_TIMEOUT, ok=(0, 1), env=self.remote_env)
            statuses = push.parse_porcelain(self.push_url.redact(done.stdout.decode(
                "utf-8", "replace")))
            missing = push.unfinished(statuses, [s.partition(":")[2] for s in chunk])
            if missing:
                raise GitError(["push", self.push_url.shown], self.path, done.code,
                               f"{what}: " + "; ".join(missing[:5])
                               + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
                               + (f"; {done.stderr.strip()[-300:]}" if done.stderr.strip()
                                  else ""))
        if refspecs:
            log.debug("%s: %d ref(s) on %s", what, len(refspecs), self.push_url.shown)

    def land(self, target_branch: str, old: str, new: str) -> Landed | Stale | Failed:
        """Move ``target_branch`` on the upstream from ``old`` to ``new`` by
        a lease push; only a ``new`` whose first parent is ``old`` is
        pushed.  The porcelain line decides; without one (the connection
        broke, the time ran out) the remote's ref is read and decides."""
        if not (TARGET_RE.fullmatch(target_branch) and valid_full_commit(old)
                and valid_full_commit(new)):
            return Failed(f"bad land request {target_branch!r} {old!r} -> {new!r}")
        try:
            parent = self.first_parent(new)
        except GitError as exc:
            return Failed(f"cannot read {new[:12]}: {exc}")
        if parent != old:
            return Failed(f"{new[:12]} is not a fast-forward of {old[:12]} (its first parent "
                          f"is {parent[:12] if parent else 'none'}); not pushed")
        ref = f"refs/heads/{target_branch}"
        why = ""
        try:
            done = self.git.run("push", "--porcelain", "--atomic", "--no-verify",
                                f"--force-with-lease={ref}:{old}", self.remote,
                                f"{new}:{ref}", timeout=PUSH_TIMEOUT, ok=(0, 1, 128),
                                env=self.remote_env)
            outcome = push.land_outcome(push.parse_porcelain(self.push_url.redact(
                done.stdout.decode("utf-8", "replace"))).get(ref), new)
            if outcome is not None:
                self._log_land(outcome, target_branch, old, new)
                return outcome
            last = (done.stderr.strip().splitlines() or ["-"])[-1]
            why = f"push exited {done.code} without a report: {last}"[:300]
        except GitTimeout as exc:
            why = str(exc)
        except GitError as exc:
            why = f"push failed: {exc}"
        log.warning("landing %s on %s: outcome unclear (%s); asking the remote",
                    new[:12], target_branch, why)
        try:
            remote = self.remote_head(target_branch)
        except GitError as exc:
            # Never a guess: the push may have happened.  The engine keeps
            # its intent and settles it from the remote when it can.
            raise GitError(exc.args_, exc.cwd, exc.code,
                           f"push outcome unknown ({why}); the remote could not be read: "
                           f"{exc.stderr}") from None
        outcome = push.decide_from_remote(remote, old, new, why)
        self._log_land(outcome, target_branch, old, new)
        return outcome

    def is_ancestor(self, commit: str, of: str) -> bool:
        """Whether ``commit`` is ``of`` or one of its ancestors (this
        repository sees the clone's commits and its own merges)."""
        done = self.git.run("merge-base", "--is-ancestor", commit, of,
                            timeout=COMMIT_TIMEOUT, ok=(0, 1))
        return done.code == 0

    def delete_branch(self, branch: str, expected: str) -> None:
        """Delete the upstream's ``branch`` if it is still at ``expected``
        (a lease); GitError if the remote did not take it."""
        if not (TARGET_RE.fullmatch(branch) and valid_full_commit(expected)):
            raise ValueError(f"bad branch deletion {branch!r} at {expected!r}")
        ref = f"refs/heads/{branch}"
        done = self.git.run("push", "--porcelain", "--no-verify",
                            f"--force-with-lease={ref}:{expected}", self.remote,
                            f":{ref}", timeout=PUSH_TIMEOUT, ok=(0, 1), env=self.remote_env)
        status = push.parse_porcelain(self.push_url.redact(
            done.stdout.decode("utf-8", "replace"))).get(ref)
        if status is None or not status.done:
            raise GitError(["push", self.push_url.shown], self.path, done.code,
                           f"delete {ref}: {status.describe() if status else 'no report'}")

    def remote_head(self, branch: str) -> str | None:
        """The upstream's ``refs/heads/<branch>`` now (None: no such branch)."""
        ref = f"refs/heads/{branch}"
        done = self.git.run("ls-remote", self.remote, ref, timeout=LS_REMOTE_TIMEOUT,
                            env=self.remote_env)
        return push.parse_ls_remote(done.stdout.decode("utf-8", "replace"), ref)

    def _log_land(self, outcome, target: str, old: str, new: str) -> None:
        if isinstance(outcome, Landed):
            log.info("landed %s on %s (was %s)", new[:12], target, old[:12])
        else:
            log.warning("landing %s on %s (expected %s): %s: %s", new[:12], target, old[:12],
                        outcome.state, outcome.reason)

    @staticmethod
    def _valid(commits: list[str]) -> list[str]:
        bad = [c for c in commits if not valid_full_commit(c)]
        if bad:
            raise ValueError(f"not full commit ids: {bad[:3]!r}")
        return list(dict.fromkeys(commits))

    def cancel(self) -> None:
        """The observer is stopping: end every git process of ours."""
        self.git.cancel()
