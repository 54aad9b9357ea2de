"""A bare upstream, a work clone to make commits in, and the observer's
clone with its merge repository: what the merging tests share."""

from __future__ import annotations

import os
import subprocess

from support.cluster import GIT_ENV, git, write_files

from ci.merging import MergeRepo, url


class Upstreams:
    """``up.git`` (bare, branch main), ``work`` (a clone to commit and push
    from) and ``clone`` (the observer's), all under ``root``."""

    def __init__(self, root):
        self.root = str(root)
        self.bare = os.path.join(self.root, "up.git")
        self.work = os.path.join(self.root, "work")
        self.clone = os.path.join(self.root, "clone")
        os.makedirs(self.root, exist_ok=True)
        git(self.root, "init", "-q", "--bare", "-b", "main", self.bare)
        git(self.root, "clone", "-q", self.bare, self.work)
        git(self.work, "checkout", "-q", "-b", "main")
        self.commit({"README": "base\n"}, "base")
        self.push("main")
        git(self.root, "clone", "-q", self.bare, self.clone)

    def commit(self, files: dict[str, str | bytes | None], message: str = "c",
               branch: str | None = None) -> str:
        if branch:
            if git(self.work, "branch", "--list", branch):
                git(self.work, "checkout", "-q", branch)
            else:
                git(self.work, "checkout", "-q", "-b", branch)
        write_files(self.work, files)
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "--allow-empty", "-m", message)
        return git(self.work, "rev-parse", "HEAD")

    def push(self, *branches: str) -> None:
        git(self.work, "push", "-q", "--force", "origin", *branches)

    def fetch(self) -> None:
        git(self.clone, "fetch", "-q", "--prune", "origin")

    def remote(self, ref: str) -> str | None:
        proc = subprocess.run(["git", "-C", self.bare, "rev-parse", "--verify", "--quiet", ref],
                              capture_output=True, text=True)
        return proc.stdout.strip() or None

    def head(self, branch: str) -> str:
        return git(self.clone, "rev-parse", f"origin/{branch}")

    def hook(self, name: str, script: str) -> None:
        path = os.path.join(self.bare, "hooks", name)
        with open(path, "w") as handle:
            handle.write("#!/bin/sh\n" + script)
        os.chmod(path, 0o755)

    def merge_repo(self, push_url: str | None = None, **kwargs) -> MergeRepo:
        return MergeRepo(self.clone, os.path.join(self.root, "state"),
                         url.from_flag(push_url or self.bare), **kwargs)


def commit_info(repo: str, commit: str) -> dict:
    """Parents, author/committer and message of a commit."""
    out = subprocess.run(["git", "-C", repo, "show", "-s", "--format=%P%n%an <%ae>%n%cn <%ce>%n%s",
                          commit], capture_output=True, text=True, check=True,
                         env=dict(os.environ, **GIT_ENV)).stdout.splitlines()
    return {"parents": out[0].split(), "author": out[1], "committer": out[2], "subject": out[3]}
