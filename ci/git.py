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


def read_blobs(repo: str, specs: list[str], timeout: float = 120,
               env: dict | None = None) -> dict[str, bytes | None]:
    """The content of each ``<rev>:<path>`` in ``specs`` (None where there
    is no such file, or it is no file), from ONE ``git cat-file --batch``:
    a process per commit would add to every commit's time to its result."""
    if not specs:
        return {}
    cmd = ["git", "-C", repo, "cat-file", "--batch"]
    try:
        proc = subprocess.run(cmd, input="".join(f"{s}\n" for s in specs).encode(),
                              capture_output=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise GitError(cmd[3:], repo, -1, "timed out") from None
    if proc.returncode:
        raise GitError(cmd[3:], repo, proc.returncode, proc.stderr.decode(errors="replace"))
    out, found, at = proc.stdout, {}, 0
    for spec in specs:
        end = out.index(b"\n", at)
        head = out[at:end].split(b" ")
        at = end + 1
        if len(head) == 3 and head[2].isdigit():
            size = int(head[2])
            found[spec] = out[at:at + size] if head[1] == b"blob" else None
            at += size + 1   # the content and its newline
        else:
            found[spec] = None   # "<spec> missing" (or ambiguous)
    return found


def script_path(name: str) -> str:
    # The scripts lie in the repository root, beside the daemons.
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name)
