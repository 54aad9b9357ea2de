"""Shared by the dashboard's HTTP and browser tests: result files written
the way the dispatcher writes them, the real dashboard process on a free
port, and a stand-in dispatcher that answers ``state`` and ``log``."""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request


from support.cluster import PY, ROOT, Daemon, ThreadedServer, free_port, wait_for_port
from ci.files import atomic_write
from ci.wire import Message, encode_fields



def commit_id(n: int) -> str:
    """A made-up but realistic-looking full commit id."""
    return hashlib.sha1(str(n).encode()).hexdigest()


def write_result(folder, commit: str, verdict: str, output: bytes = b"ok\n", *,
                 branch: str | None = "main", previous: str | None = None,
                 subject: str = "", author: str = "Ann Author <ann@example.invalid>",
                 failures: int | None = None, mtime: float | None = None, **extra) -> str:
    """A result file as the dispatcher writes it (header, blank line,
    output), atomically; ``mtime`` sets its finish time."""
    fields = {"commit": commit, "verdict": verdict, "tests": "3",
              "failures": str(failures if failures is not None else
                              (1 if verdict == "failed" else 0)),
              "errors": "0", "skipped": "0", "runner": "127.0.0.1:8901",
              "started": "2026-11-23T10:00:00Z", "duration": "0.42", "exit_code":
              "0" if verdict == "passed" else "1"}
    if branch is not None:
        fields["branch"] = branch
    if previous:
        fields["previous"] = previous
    fields["subject"] = subject or f"commit {commit[:6]}"
    fields["author"] = author
    fields["committed"] = "2026-11-23T09:59:00Z"
    fields.update(extra)
    path = os.path.join(str(folder), commit)
    atomic_write(path, encode_fields(fields) + b"\n" + output, fsync=False)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def red_green_history(folder, base: float | None = None) -> list[str]:
    """main: pass, FAIL (broke), fail, pass (fixed), pass; in that order."""
    base = base or time.time() - 600
    verdicts = ["passed", "failed", "failed", "passed", "passed"]
    commits = [commit_id(0x1000 + i) for i in range(len(verdicts))]
    for i, (commit, verdict) in enumerate(zip(commits, verdicts)):
        output = (b"F.\n======================================================================\n"
                  b"FAIL: test_mean (tests.test_calc.TestCalc.test_mean)\n"
                  b"----------------------------------------------------------------------\n"
                  b"AssertionError: 2 != 3\n\nRan 2 tests in 0.001s\n\nFAILED (failures=1)\n"
                  if verdict == "failed" else b"..\nRan 2 tests in 0.001s\n\nOK\n")
        write_result(folder, commit, verdict, output, previous=commits[i - 1] if i else None,
                     subject=f"Step {i}: {verdict}", mtime=base + 10 * i)
    return commits


class Dashboard:
    """The real dashboard.py process on a free loopback port."""

    def __init__(self, tmp_path, results, dispatcher: str, *extra, name="dashboard"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("CI_SECRET", None)
        self.daemon = Daemon(name, [PY, os.path.join(ROOT, "dashboard.py"), "--host", "127.0.0.1",
                                    "--port", str(self.port), "--results-dir", str(results),
                                    "--dispatcher-server", dispatcher, "--scan-interval", "0.2",
                                    "--log-level", "DEBUG", *extra],
                             str(tmp_path / f"{name}-{self.port}.log"), str(tmp_path), env)
        wait_for_port(self.port, self.daemon)

    def get(self, path: str, headers: dict | None = None, method: str = "GET"):
        """(status, headers, body bytes), also for error statuses."""
        request = urllib.request.Request(self.url + path, headers=headers or {}, method=method)
        opener = urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(request, timeout=10) as reply:
                return reply.status, reply.headers, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()

    def json(self, path: str, headers: dict | None = None):
        status, _, body = self.get(path, headers)
        assert status == 200, (status, body[:300])
        return json.loads(body)

    def close(self) -> None:
        self.daemon.close()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class StandInDispatcher(ThreadedServer):
    """Answers ``state``, ``log:`` and ``queue`` with what the test sets;
    counts calls."""

    def __init__(self):
        self.state_reply: dict | None = {"queue": [], "running": [], "runners": [],
                                         "counts": {"queued": "0"}}
        self.logs: dict[str, bytes] = {}
        self.calls: list[str] = []
        # The land queue's snapshot (ci/queue_snapshot.py), as JSON bytes.
        self.queue_reply = b'{"updated": null, "targets": {}, "entries": [], "recent": []}'
        super().__init__({"state": self.state, "log": self.log, "queue": self.queue})

    def queue(self, message, peer):
        with self.lock:
            self.calls.append("queue")
            return Message("ok", "", self.queue_reply)

    def state(self, message, peer):
        with self.lock:
            self.calls.append("state")
            return Message("ok", "", json.dumps(self.state_reply).encode())

    def log(self, message, peer):
        with self.lock:
            self.calls.append("log:" + message.argument)
            tail = self.logs.get(message.argument)
        if tail is None:
            return Message("ok", "idle")
        return Message("ok", "running", tail)

    def count(self, what: str) -> int:
        with self.lock:
            return sum(1 for c in self.calls if c.startswith(what))


def dead_address() -> str:
    """A loopback address where nothing listens."""
    return f"127.0.0.1:{free_port()}"




# --------------------------------------------------------------------------
# A test history (ci/history) for the dashboard's test pages.

# A test id too long to link by name (each part at the records' cap, 500).
LONG_CLASS, LONG_NAME = "t." + "C" * 298, "long_" + "y" * 495
LONG_ID = f"{LONG_CLASS}.{LONG_NAME}"
EVIL = '<img src=x onerror="alert(1)">&"\'' + "é" * 3


def write_history(results) -> list[str]:
    """Eight results on main (result and JUnit files, oldest first) and
    their store where the dashboard looks by default (dispatcher_state
    beside the results folder), built by the dispatcher's writer.
    ``t.T.test_flaky`` fails on the 2nd and 6th; the EVIL test always errs.
    For the tests page's lists: ``t.T.test_rerun`` is flaky (failed, then
    passed on a rerun) on the 3rd, 6th and 7th; ``t.T.test_quarantined``
    is quarantined from the 5th on and fails there; ``t.Q.<EVIL>`` is
    quarantined from the 7th on and passes; ``t.T.test_lifted`` was
    quarantined on the first three only."""
    from ci.history import store
    from ci.history.writer import HistoryWriter
    from ci.outcome import Outcome
    from ci.results import ERROR, FAILED, FLAKY, PASSED, TestRecord
    base = time.time() - 600
    commits = []
    for n in range(8):
        commit = commit_id(0x3000 + n)
        outcome = FAILED if n % 4 == 1 else PASSED
        Outcome({"commit": commit, "verdict": "failed", "branch": "main",
                 "runner": "runner-a", "subject": f"Step {n}"}, b"out\n",
                (TestRecord("t.T", "test_flaky", outcome, 0.1 * (n + 1)),
                 TestRecord("t.T", EVIL, ERROR, 0.01),
                 TestRecord(LONG_CLASS, LONG_NAME, PASSED, 3.0),
                 TestRecord("t.T", "test_rerun", FLAKY if n in (2, 5, 6) else PASSED, 0.05),
                 TestRecord("t.T", "test_quarantined", FAILED if n >= 4 else PASSED, 0.05,
                            message="boom" if n >= 4 else "", quarantined=n >= 4),
                 TestRecord("t.Q", EVIL, PASSED, 0.02, quarantined=n >= 6),
                 TestRecord("t.T", "test_lifted", PASSED, 0.02, quarantined=n < 3))
                ).write(str(results), commit)
        os.utime(os.path.join(results, commit), (base + n, base + n))
        commits.append(commit)
    state = os.path.join(os.path.dirname(str(results)), "dispatcher_state")
    os.makedirs(state, exist_ok=True)
    writer = HistoryWriter(os.path.join(state, store.FILE_NAME), str(results))
    writer.start()
    assert writer.ready.wait(10), "the history was not built"
    writer.stop()
    return commits


MATCH_FAILURE = (b"E\n======================================================================\n"
                 b"ERROR: test_match (tests.test_calc.TestCalc.test_match)\n"
                 b"----------------------------------------------------------------------\n"
                 b"SyntaxError: invalid syntax (calc.py, line 3)\n\nRan 1 test in 0.001s\n\n"
                 b"FAILED (errors=1)\n")


def write_matrix_result(folder, commit: str, previous: str | None = None) -> dict:
    """A matrix commit as the dispatcher writes it: the commit's file with
    the worst verdict and ``cells:``, and one file per cell beside it
    (``<commit>.cell.<name>``); returns {cell: verdict}."""
    cells = {"py3.9": "failed", "py3.12": "passed", "py3.13": "passed"}
    write_result(folder, commit, "failed", b"py3.9: failed\npy3.12: passed\npy3.13: passed\n",
                 previous=previous, subject="Use a match statement",
                 cells=" ".join(f"{name}={verdict}" for name, verdict in cells.items()))
    for name, verdict in cells.items():
        fields = {"commit": commit, "verdict": verdict, "cell": name, "tests": "1",
                  "failures": "0", "errors": "1" if verdict == "failed" else "0",
                  "skipped": "0", "runner": f"runner-{name}", "duration": "0.31"}
        if name == "py3.12":
            fields["flaky"] = "1"
        output = MATCH_FAILURE if verdict == "failed" else b".\nRan 1 test in 0.001s\n\nOK\n"
        atomic_write(os.path.join(str(folder), f"{commit}.cell.{name}"),
                     encode_fields(fields) + b"\n" + output, fsync=False)
    return cells
