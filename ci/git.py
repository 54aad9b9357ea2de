"""Every git call the daemons make in Python goes through ``run_git``, and a
failure is a ``GitError`` carrying the command, folder, exit code and
stderr; the bash scripts that do the git work are found by ``script_path``."""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class TooLarge:
    """A blob past the reader's limit, in place of its content: what a
    pushed commit holds is read only once its size is known (a 200 MB
    ``.ci.ini`` packs into some 224 KB)."""
    size: int


def read_blobs(repo: str, specs: list[str], max_size: int, timeout: float = 120,
               env: dict | None = None) -> dict[str, bytes | TooLarge | None]:
    """The content of each ``<rev>:<path>`` in ``specs`` (None where there
    is no such file, or it is no file; TooLarge past ``max_size`` bytes),
    from two ``git cat-file`` processes however many specs: a process per
    commit would add to every commit's time to its result.  The first says
    each object's size; the second reads each blob within the limit once,
    however many commits share it (read whole, a 200 MB recipe under a few
    commits took the observer past 2 GiB, then past its time limit at every
    poll)."""
    if not specs:
        return {}
    listed = _cat_file(repo, "--batch-check", [s.encode() for s in specs], timeout, env)
    objects = {}
    for spec, line in zip(specs, listed.split(b"\n")):
        head = line.split(b" ")
        # "<id> <type> <size>", else "<spec> missing" (or ambiguous)
        if len(head) == 3 and head[1] == b"blob" and head[2].isdigit():
            objects[spec] = (head[0], int(head[2]))
    wanted = list(dict.fromkeys(oid for oid, size in objects.values() if size <= max_size))
    contents = _contents(repo, _cat_file(repo, "--batch", wanted, timeout, env), wanted) \
        if wanted else {}
    found: dict[str, bytes | TooLarge | None] = {}
    for spec in specs:
        oid, size = objects.get(spec, (None, 0))
        found[spec] = None if oid is None else contents[oid] if size <= max_size \
            else TooLarge(size)
    return found


def _cat_file(repo: str, mode: str, names: list[bytes], timeout: float,
              env: dict | None) -> bytes:
    cmd = ["git", "-C", repo, "cat-file", mode]
    try:
        proc = subprocess.run(cmd, input=b"".join(n + b"\n" for n in names),
                              capture_output=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise GitError(cmd[3:], repo, -1, "timed out") from None
    if proc.returncode:
        raise GitError(cmd[3:], repo, proc.returncode, proc.stderr.decode(errors="replace"))
    return proc.stdout


def _contents(repo: str, out: bytes, oids: list[bytes]) -> dict[bytes, bytes]:
    """``cat-file --batch``'s answer for blobs it was just told exist."""
    found, at = {}, 0
    for oid in oids:
        end = out.index(b"\n", at)
        head = out[at:end].split(b" ")
        if len(head) != 3 or not head[2].isdigit():
            raise GitError(["cat-file", "--batch"], repo, 0,
                           f"unexpected answer {out[at:end][:120]!r}")
        at = end + 1
        size = int(head[2])
        found[oid] = out[at:at + size]
        at += size + 1   # the content and its newline
    return found


def script_path(name: str) -> str:
    # The scripts lie in the repository root, beside the daemons.
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name)
