"""Every git call the daemons make in Python goes through ``run_git``, and a
failure is a ``GitError`` carrying the command, folder, exit code and
stderr; the bash scripts that do the git work are found by ``script_path``."""

from __future__ import annotations

import os
import subprocess


class GitError(Exception):
    def __init__(self, args, cwd, code, stderr):
        self.args_ = args
        self.cwd = cwd
        self.code = code
        self.stderr = stderr.strip()
        super().__init__(f"git {' '.join(args)} in {cwd} exited {code}: {self.stderr[-500:]}")


def run_git(repo: str, *args: str, timeout: float = 120, env: dict | None = None) -> str:
    cmd = ["git", "-C", repo, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, env=env)
    except subprocess.TimeoutExpired:
        raise GitError(list(args), repo, -1, "timed out") from None
    if proc.returncode:
        raise GitError(list(args), repo, proc.returncode, proc.stderr)
    return proc.stdout


def script_path(name: str) -> str:
    # The scripts lie in the repository root, beside the daemons.
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name)
