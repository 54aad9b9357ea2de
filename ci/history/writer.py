"""The dispatcher's side of the test history's writer: a child process
(ci/history/child.py) that owns the store, fed one short line per result.

Why a process: a writer thread in the dispatcher took a few milliseconds of
CPU per result (encoding records, SQLite) from the request handlers under
the GIL, and the result path slowed by a fifth in a burst.  Now the result
listener (``result_written``) only writes ``result <commit>`` to the
child's stdin, a non-blocking pipe: the child reads the result's files
itself.  When the pipe is full (a stalled or slow child) the line is
dropped and the store marked behind: ``catchup`` is sent as soon as the
pipe has room, and the child catches up from the result files, as it does
at every start.  The result path never waits, not for the disk, not for
SQLite's lock, not for the child.

A supervisor thread watches the child: it reads its ``ready`` lines, sends
a pending ``catchup``, and restarts a child that died, with backoff (the
new one catches up from the files).  The child runs in its own process
group, is ended at ``stop`` (stdin closed, then SIGTERM), and exits by
itself when its stdin closes, so it never outlives a SIGKILLed dispatcher.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import threading
import time

from ci.children import module_command
from ci.backoff import Backoff

log = logging.getLogger(__name__)

# A non-blocking write to a pipe of at most this many bytes is all or nothing.
PIPE_BUF = getattr(select, "PIPE_BUF", 512)
# The supervisor's tick: how soon a pending ``catchup`` is sent again.
TICK = 0.5
# A child that lived this long before dying restarts without delay growth.
STEADY_SECONDS = 60.0
# Seconds between restarts of a child that keeps dying, at most.
RESTART_CAP = 30.0


def pipe_chunks(lines: list[bytes]) -> list[bytes]:
    """The lines joined into as few writes as fit PIPE_BUF each: a pass
    forgets 25 commits a batch, and a write (and a wake-up of the child)
    per line took the cores from the result path 25 times as often."""
    chunks: list[bytes] = []
    for line in lines:
        if chunks and len(chunks[-1]) + len(line) <= PIPE_BUF:
            chunks[-1] += line
        else:
            chunks.append(line)
    return chunks


class HistoryWriter:
    """Starts, feeds and supervises the writer process.  ``_send_lock``
    guards the pipe and ``dropped`` (held only around non-blocking writes);
    the rest belongs to the supervisor thread."""

    def __init__(self, path: str, results_dir: str, log_level: str = "INFO",
                 stderr=None, max_pending: int | None = None, gate=None):
        self.path = os.path.abspath(path)
        self.results_dir = os.path.abspath(results_dir)
        self.log_level = log_level
        self.stderr = stderr                # None: the dispatcher's own
        self.max_pending = max_pending      # the child's queue limit (tests)
        # The dispatcher's ResultGate, shared with the child (its writes
        # wait while a result is being stored); None: not shared.
        self.gate = gate
        # Set once a child has finished its first catch-up (tests, the benchmark).
        self.ready = threading.Event()
        # A line was dropped and ``catchup`` not yet sent.
        self.dropped = False
        self.restarts = 0
        self.proc: subprocess.Popen | None = None
        self._send_lock = threading.Lock()
        self.stop_event = threading.Event()
        self.backoff = Backoff(first=0.5, cap=RESTART_CAP)
        self.thread = threading.Thread(target=self._supervise, name="history", daemon=True)

    # ---- the dispatcher's side --------------------------------------------
    def result_written(self, commit: str, outcome) -> None:
        """A result listener: the commit's files hold the rest (branch and
        records; a retest replaced them, and the child replaces its run)."""
        self._send(f"result {commit}\n".encode())

    def forget(self, commits: list[str]) -> None:
        """Drop the runs of pruned commits (--keep-results); never blocks.
        In order with the results, so a retest written after the prune
        keeps its new run; a dropped line is left to the catch-up, which
        forgets runs whose result files are gone."""
        for chunk in pipe_chunks([f"forget {commit}\n".encode() for commit in commits]):
            self._send(chunk)

    def _send(self, line: bytes) -> None:
        """Never blocks: written whole (``line``, one line or a few, is at
        most PIPE_BUF long, so a non-blocking write takes it all or
        nothing), or dropped."""
        with self._send_lock:
            if self.dropped:
                self.dropped = not self._write(b"catchup\n")
            if not self._write(line) and not self.dropped:
                self.dropped = True
                log.info("test history writer busy or down: results are left to its "
                         "catch-up from the result files")

    def _write(self, data: bytes) -> bool:
        proc = self.proc
        if proc is None or proc.stdin is None or proc.stdin.closed:
            return False
        try:
            return os.write(proc.stdin.fileno(), data) == len(data)
        except OSError:             # full (EAGAIN), or the child is gone (EPIPE)
            return False

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the child's stdin (it ends its batch and exits), then
        SIGTERM it if it has not gone within ``timeout``."""
        self.stop_event.set()
        self._close_stdin()
        if self.thread.is_alive():
            self.thread.join(timeout)
        proc = self.proc
        if proc is not None and proc.poll() is None:
            log.warning("test history writer (pid %d) did not stop: terminating it", proc.pid)
            proc.terminate()
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.thread.is_alive():
            self.thread.join(1)

    def _close_stdin(self) -> None:
        with self._send_lock:
            if self.proc is not None and self.proc.stdin is not None:
                self.proc.stdin.close()

    # ---- the supervisor thread --------------------------------------------
    def _supervise(self) -> None:
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                self._spawn()
            except OSError as exc:
                log.error("cannot start the test history writer: %s", exc)
            else:
                self._watch()
                code = self.proc.wait()
                if self.stop_event.is_set():
                    break
                log.error("test history writer (pid %d) exited with status %s; restarting "
                          "it (it catches up from the result files)", self.proc.pid, code)
            if time.monotonic() - started > STEADY_SECONDS:
                self.backoff.reset()
            self.stop_event.wait(self.backoff.next())
            self.restarts += 1

    def _spawn(self) -> None:
        """The child, in a process group of its own (a signal to the
        dispatcher's group is not its), its stdin non-blocking here."""
        cmd, env = module_command("ci.history.child", "--store", self.path,
                                  "--results-dir", self.results_dir,
                                  "--log-level", self.log_level)
        if self.max_pending is not None:
            cmd += ["--max-pending", str(self.max_pending)]
        fd = self.gate.share() if self.gate is not None else -1
        if fd >= 0:
            cmd += ["--gate-fd", str(fd)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=self.stderr, env=env, start_new_session=True,
                                pass_fds=(fd,) if fd >= 0 else ())
        os.set_blocking(proc.stdin.fileno(), False)
        with self._send_lock:
            self.proc = proc
            # The new child catches up at start: nothing dropped is missed.
            self.dropped = False
        if self.stop_event.is_set():
            self._close_stdin()
        log.debug("test history writer started (pid %d)", proc.pid)

    def _watch(self) -> None:
        """Until the child's stdout closes (it exited): note its ``ready``
        lines, and send a pending ``catchup`` once the pipe has room."""
        fd = self.proc.stdout.fileno()
        buf = b""
        while True:
            readable, _, _ = select.select([fd], [], [], TICK)
            if readable:
                data = os.read(fd, 4096)
                if not data:
                    self.proc.stdout.close()
                    return
                *lines, buf = (buf + data)[-4096:].split(b"\n")
                if b"ready" in lines:
                    self.ready.set()
            with self._send_lock:
                if self.dropped and not self.stop_event.is_set():
                    self.dropped = not self._write(b"catchup\n")
