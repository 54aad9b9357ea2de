"""The pruner's end of its file worker (ci/retention/worker.py): starts the
process on first use, and again on the next pass after it died; passes it
the result gate's shared page."""

from __future__ import annotations

import logging
import subprocess
import threading

from ci import results
from ci.children import module_command
from ci.retention import policy as keep
from ci.retention import worker
from ci.retention.gate import REST

log = logging.getLogger(__name__)


class WorkerGone(OSError):
    """The worker could not be started, or stopped answering as it should:
    the pass ends (nothing is removed that was not answered for), and the
    next one starts a new worker."""


class WorkerLink:
    """``proc`` is only used by the pruner's thread; ``stop`` (another
    thread) closes its pipes under ``_lock`` so the thread's read ends."""

    def __init__(self, folder: str, gate, stop_event: threading.Event,
                 rules: keep.KeepPolicy, tombstones: str, log_level: str = "INFO",
                 rest: float = REST, index: str | None = None):
        self.folder = folder
        self.index = index
        self.rules, self.tombstones = rules, tombstones
        self.gate = gate
        self.stop_event = stop_event
        self.log_level = log_level
        self.rest = rest
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.started = 0          # workers started so far (for tests)

    def plan(self, pending: set[str]) -> tuple[int, int]:
        """The worker plans a pass (reading every new header); (commits to
        prune, complete results)."""
        proc = self._process()
        self._send(proc, f"plan {len(pending)}\n".encode() +
                   "".join(c + "\n" for c in pending).encode())
        words = self._line(proc).split()
        if len(words) != 4 or words[0] != b"planned" or not (words[1] + words[3]).isdigit():
            self._fail(f"an answer it cannot read: {b' '.join(words)[:80]!r}")
        return int(words[1]), int(words[3])

    def take(self, count: int) -> list[keep.Entry]:
        """The plan's next ``count`` commits at most ([]: it is done)."""
        proc = self._running()
        self._send(proc, f"take {count}\n".encode())
        taken = []
        while True:
            line = self._line(proc)
            if line == b"end\n":
                return taken
            try:
                taken.append(worker.decode_entry(line))
            except (ValueError, TypeError) as exc:
                self._fail(f"an entry it cannot read ({exc})")

    def remove(self, batch: list[list[str]]) -> list[OSError | None]:
        """Each commit's files (names, the result file last) removed; per
        commit None or the error that stopped it."""
        return self._moves("remove", batch)

    def leftovers(self, count: int) -> dict[str, list[str]]:
        """The next ``count`` (at most) commits -> their XML files that the
        moves since the plan left (worker.FileWorker.leftovers), in the
        folder's order ({}: none left)."""
        proc = self._running()
        self._send(proc, f"leftovers {count}\n".encode())
        found = {}
        while (line := self._line(proc)) != b"end\n":
            names = line.decode("utf-8", "replace").rstrip("\n").split("\t")
            commits = {results.xml_commit(n) for n in names}
            if len(commits) != 1 or None in commits:
                self._fail(f"an answer it cannot read: {line[:80]!r}")
            found[commits.pop()] = names
        return found

    def drop(self, batch: list[list[str]]) -> list[OSError | None]:
        """Each commit's XML files removed (the second sweep); per commit
        None or the error that stopped it."""
        return self._moves("drop", batch)

    def _moves(self, command: str, batch: list[list[str]]) -> list[OSError | None]:
        if not batch:
            return []
        proc = self._running()
        self._send(proc, f"{command} {len(batch)}\n".encode() +
                   "".join("\t".join(names) + "\n" for names in batch).encode())
        errors: list[OSError | None] = []
        for _ in batch:
            reply = self._line(proc).decode("utf-8", "replace").rstrip("\n")
            if reply != "ok" and not reply.startswith("error "):
                self._fail(f"an answer it cannot read: {reply[:80]!r}")
            errors.append(None if reply == "ok" else OSError(reply[len("error "):]))
        return errors

    def stop(self, timeout: float = 2.0) -> None:
        """Close its stdin (it exits after the request under way); killed
        if it has not gone within ``timeout`` (a plan reading every header
        may take seconds, and nothing it does needs finishing: tombstones
        come first, and a commit half removed is removed again)."""
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("pruner's worker (pid %d) did not stop: killing it", proc.pid)
            proc.kill()
            proc.wait()
        proc.stdout.close()

    # ---- the process --------------------------------------------------------
    def _running(self) -> subprocess.Popen:
        """The worker that made the plan being taken: a new one has none."""
        with self._lock:
            proc = self.proc
        if proc is None or proc.poll() is not None:
            self._fail("it exited")
        return proc

    def _process(self) -> subprocess.Popen:
        """The worker, started now if none runs (a plan starts a pass)."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                return self.proc
        self.stop()
        if self.stop_event.is_set():
            raise WorkerGone("stopping")
        fd = self.gate.share()
        cmd, env = module_command(
            "ci.retention.worker", "--results-dir", self.folder,
            "--keep-results", self.rules.text(), "--tombstones", self.tombstones,
            "--gate-fd", str(fd), "--gate-wait", repr(self.gate.longest),
            "--rest", repr(self.rest),
            *(("--index", self.index) if self.index else ()),
            "--log-level", self.log_level)
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                    pass_fds=(fd,) if fd >= 0 else (), start_new_session=True)
        except OSError as exc:
            raise WorkerGone(f"cannot start the pruner's worker: {exc}") from exc
        with self._lock:
            self.proc = proc
            self.started += 1
        if self.stop_event.is_set():           # stopped while it started
            self._fail("stopping")
        log.debug("pruner's worker started (pid %d)", proc.pid)
        return proc

    def _send(self, proc: subprocess.Popen, data: bytes) -> None:
        try:
            proc.stdin.write(data)
            proc.stdin.flush()
        except (OSError, ValueError) as exc:
            self._fail(f"it does not listen ({exc})")

    def _line(self, proc: subprocess.Popen) -> bytes:
        try:
            line = proc.stdout.readline()
        except (OSError, ValueError) as exc:
            self._fail(f"it cannot be read ({exc})")
        if not line.endswith(b"\n"):
            self._fail("it exited")
        return line

    def _fail(self, why: str) -> None:
        self.stop(timeout=1.0)
        raise WorkerGone(f"the pruner's worker failed: {why}")
