"""One git process of the merge repository: run in a process group of its
own, bounded in time (its whole group killed at the deadline: a push's
ssh or remote helper too), cancellable when the observer stops, and any
error it raises is redacted (a push URL may hold a password).

Output goes to temporary files, not pipes: ``procgroup.Child`` waits
without reading (see there), and a merge with many conflicts or a long
push report must never block the child on a full pipe."""

from __future__ import annotations

import subprocess
import tempfile
import threading
from typing import Callable, NamedTuple

from ci import procgroup
from ci.git import GitError

# Output read back at most (a merge's conflict list, a push's report).
MAX_OUTPUT = 8 * 1024 * 1024


class GitTimeout(GitError):
    """The process did not finish in time (its group was killed): for a
    push, whether the remote took it is unknown."""


class Completed(NamedTuple):
    code: int
    stdout: bytes
    stderr: str


class GitRunner:
    """Runs git in one environment, several processes at once if asked
    from several threads, all ended by ``cancel``."""

    def __init__(self, env: dict, cwd: str, redact: Callable[[str], str] = lambda s: s):
        self.env = env
        self.cwd = cwd
        self.redact = redact
        self._lock = threading.Lock()
        self._running: set[procgroup.Child] = set()
        self._cancelled = False

    def run(self, *args: str, timeout: float, ok: tuple[int, ...] = (0,),
            env: dict | None = None) -> Completed:
        """``git <args>``; GitError (redacted) if it exits with a code not in
        ``ok``, GitTimeout if it outlives ``timeout`` seconds."""
        child = procgroup.Child()
        with self._lock:
            if self._cancelled:
                raise GitError(self._shown(args), self.cwd, -1, "observer stopping")
            self._running.add(child)
        try:
            with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
                proc = child.start(["git", *args], stdout=out, stderr=err,
                                   stdin=subprocess.DEVNULL, cwd=self.cwd,
                                   env=dict(self.env, **(env or {})), close_fds=True)
                if proc is None:
                    raise GitError(self._shown(args), self.cwd, -1, "observer stopping")
                exited = child.finish(proc, timeout)
                out.seek(0)
                err.seek(0)
                stdout = out.read(MAX_OUTPUT)
                stderr = self.redact(err.read(65536).decode("utf-8", "replace"))
        finally:
            with self._lock:
                self._running.discard(child)
        if not exited:
            raise GitTimeout(self._shown(args), self.cwd, -1,
                             f"timed out after {timeout:g}s (killed)")
        if proc.returncode not in ok:
            raise GitError(self._shown(args), self.cwd, proc.returncode, stderr)
        return Completed(proc.returncode, stdout, stderr)

    def _shown(self, args) -> list[str]:
        return [self.redact(a) for a in args]

    def cancel(self) -> None:
        """Kill every running process and start no other (stopping)."""
        with self._lock:
            self._cancelled = True
            running = list(self._running)
        for child in running:
            child.cancel()
