"""The runner's repository, out of the test user's reach (``--test-user``).

The tests run as an unprivileged user who must own the working tree
(suites write caches and build files into it).  If that user owned the
clone's ``.git`` too, a hostile commit could change what the *next*
checkout on this runner produces: a hook, a config entry
(``core.fsmonitor``, a filter), a replace ref or a rewritten object would
make a later commit be checked out or tested as the hostile one chose.

So the repository lives in the runner's state folder (``<state>/git``),
owned by the runner's user and only readable by others; the runner's own
git processes (fetch, checkout, clean) name it explicitly (``GIT_DIR``,
``GIT_WORK_TREE``) and never look at the working tree's ``.git``.  The
working tree keeps a ``.git`` file pointing at it, rewritten after every
checkout, so that a test's own ``git log`` or ``git describe`` still
works (read-only).  After each checkout the files git wrote are given to
the test user.

The repository is made afresh from the clone's ``origin`` (read from its
config as data, never through a hook or include of it), so no hook,
config or object of the old ``.git`` is used by the runner; only its
origin address is, which is why a clone in which tests already ran as
the test user must be made anew (README).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

from ci.runner.sandbox.ownership import Owner, chown_tree
from ci.config import ConfigError
from ci.files import create_fresh_at
from ci.git import GitError, run_git

log = logging.getLogger(__name__)

FOLDER = "git"
POINTER = ".git"
# A first fetch of a big repository can take a while.
FETCH_TIMEOUT = 3600.0
# Git enters a submodule's repository when its folder has a ``.git``, and
# runs what that repository's config says (``remote.origin.uploadpack``):
# a test can plant one in the tree, so the runner's git never recurses.
NO_SUBMODULES = (("fetch.recurseSubmodules", "false"), ("submodule.recurse", "false"))
# The upstream's hidden refs the runner fetches too (test_runner_script.sh
# adds it to every fetch; the first fetch here brings them at once).
CI_REFSPEC = "+refs/ci/*:refs/ci/*"


class PrivateRepository:
    def __init__(self, repo: str, state_dir: str, uid: int, gid: int):
        self.repo = os.path.abspath(repo)
        self.git_dir = os.path.join(os.path.abspath(state_dir), FOLDER)
        self.uid, self.gid = uid, gid

    # ---- once, at start ---------------------------------------------------
    def exists(self) -> bool:
        return os.path.isdir(os.path.join(self.git_dir, "objects"))

    def setup(self) -> None:
        """Make ``<state>/git`` the clone's repository, if it is not yet.
        Built beside and renamed into place, so a runner killed halfway
        starts over instead of using half a repository."""
        if self.exists():
            # The same state folder may now serve a clone moved elsewhere.
            try:
                run_git(self.repo, "config", "core.worktree", self.repo,
                                env=self.git_env(dict(os.environ)))
            except GitError as exc:
                raise ConfigError(f"--test-user: the runner's repository "
                                          f"{self.git_dir} is unusable: {exc}") from None
            # A runner stopped between take_tree and give_tree left it ours.
            self.give_tree()
            return
        url = self._origin_url()
        building = self.git_dir + ".new"
        shutil.rmtree(building, ignore_errors=True)
        env = self.git_env(dict(os.environ), building)
        try:
            for args in (["init", "--quiet"], ["config", "core.bare", "false"],
                         ["config", "core.worktree", self.repo],
                         ["remote", "add", "origin", url],
                         # Merge commits tested "as merged" are reachable
                         # only from the upstream's refs/ci/ (issue 22).
                         ["config", "--add", "remote.origin.fetch", CI_REFSPEC]):
                run_git(self.repo, *args, env=env)
            run_git(self.repo, "fetch", "--quiet", "origin", env=env,
                            timeout=FETCH_TIMEOUT)
        except GitError as exc:
            shutil.rmtree(building, ignore_errors=True)
            raise ConfigError(f"--test-user: cannot make the runner's own repository "
                                      f"from {url}: {exc}") from None
        os.chmod(building, 0o755)
        os.replace(building, self.git_dir)
        log.info("the clone's repository is now %s (the runner's; the test user's .git "
                 "in %s is not used)", self.git_dir, self.repo)
        self.reset_pointer()

    def _origin_url(self) -> str:
        """The upstream's address, from the clone's ``.git/config`` read as
        a file: ``git config --file`` runs nothing and follows no include."""
        config = os.path.join(self.repo, POINTER, "config")
        try:
            proc = subprocess.run(["git", "config", "--file", config, "--get",
                                   "remote.origin.url"], capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"--test-user: cannot read {config}: {exc}") from None
        url = proc.stdout.strip()
        if proc.returncode or not url:
            raise ConfigError(f"--test-user: {self.repo} has no origin to fetch from "
                                      "(clone the upstream, then chown the clone to the "
                                      "test user)")
        return url

    # ---- every run ----------------------------------------------------------
    def git_env(self, env: dict, git_dir: str | None = None) -> dict:
        """The environment of the runner's own git processes: this
        repository and work tree, whatever the tree's ``.git`` says, and
        no submodule repository entered (one in the tree is the test
        user's).  Settings given by ``GIT_CONFIG_COUNT`` are kept."""
        env = dict(env, GIT_DIR=git_dir or self.git_dir, GIT_WORK_TREE=self.repo)
        count = env.get("GIT_CONFIG_COUNT", "")
        count = int(count) if count.isdigit() else 0
        for i, (key, value) in enumerate(NO_SUBMODULES, count):
            env[f"GIT_CONFIG_KEY_{i}"], env[f"GIT_CONFIG_VALUE_{i}"] = key, value
        env["GIT_CONFIG_COUNT"] = str(count + len(NO_SUBMODULES))
        return env

    def take_tree(self) -> None:
        """Before the runner's git writes in the tree: the tree back to the
        runner's user, no folder in it writable by anyone else.  A process a
        test left behind (one that escaped its process group) could
        otherwise swap a folder for a symlink while git, as root, checks
        out or cleans there (git looks at a folder once, then writes all
        its files), and have root write a commit's files anywhere.  The
        tree's ``.git`` is left as it is: our git never reads it, and
        give_tree replaces it; one below the top (a test's repository) is
        removed before our git runs."""
        chown_tree(self.repo, Owner(os.getuid(), os.getgid(), strip=0o6022),
                   skip=(POINTER,), drop=(POINTER,))

    def give_tree(self) -> None:
        """After a checkout: the working tree (not the repository) to the
        test user, and the ``.git`` pointer made anew."""
        self.reset_pointer()
        # git checks out no path with a ``.git`` in it, and its clean leaves
        # every ``.git`` alone: one below the top is a test's, kept from one
        # commit to the next (a repository whose config a later test's git
        # would run, or a hard link to a file outside the tree).
        chown_tree(self.repo, Owner(self.uid, self.gid), skip=(POINTER,), drop=(POINTER,))

    def reset_pointer(self) -> None:
        """Replace whatever the tree's ``.git`` now is (a test may have
        put a repository of its own there) by a file naming ours."""
        path = os.path.join(self.repo, POINTER)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass
        # Through descriptors only: the test user owns the folder and could
        # swap a name for a symlink between a look and a chmod by path.
        folder = os.open(self.repo, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            tmp = f".git-{os.getpid()}.tmp"
            fd = create_fresh_at(folder, tmp, 0o644)
            try:
                os.write(fd, f"gitdir: {self.git_dir}\n".encode())
                os.fchmod(fd, 0o644)
            finally:
                os.close(fd)
            os.replace(tmp, POINTER, src_dir_fd=folder, dst_dir_fd=folder)
        finally:
            os.close(folder)
