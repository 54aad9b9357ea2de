"""Fault-injection commits and the notes their tests leave.

The commits under test carry ``tests/test_fault.py`` (``FAULT_TEST``),
whose behaviour (sleep, fail, kill its runner, start a grandchild) is fixed
per commit.  It leaves notes in ``$CI_FAULT_DIR`` so a test can tell when a
run really is in progress, on which runner, and which processes it made,
instead of guessing with sleeps."""

from __future__ import annotations

import os

from support.procs import cmdline

FAULT_TEST = '''"""Fault-injection test {name}; its behaviour is fixed by the CI suite."""
import os
import signal
import subprocess
import sys
import time
import unittest

NAME = {name!r}
SECONDS = {seconds!r}
ONCE = {once!r}
FAIL = {fail!r}
KILL_RUNNER = {kill_runner!r}
GRANDCHILD = {grandchild!r}
FAULT_DIR = os.environ.get("CI_FAULT_DIR", "")


def note(kind, text=""):
    if FAULT_DIR:
        path = os.path.join(FAULT_DIR, "%s.%s.%d" % (NAME, kind, os.getpid()))
        with open(path + ".tmp", "w") as handle:
            handle.write(text)
        os.replace(path + ".tmp", path)


class TestFault(unittest.TestCase):
    def test_fault(self):
        runner = os.environ.get("CI_RUNNER_NAME", "")
        parent = os.getppid()
        slow = True
        if ONCE and FAULT_DIR:
            try:
                os.close(os.open(os.path.join(FAULT_DIR, NAME + ".once"),
                                 os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                slow = False
        if GRANDCHILD:
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            note("grandchild", str(child.pid))
        note("started", "%s %d" % (runner, parent))
        if KILL_RUNNER:
            os.kill(parent, signal.SIGKILL)
            os._exit(3)
        deadline = time.monotonic() + (SECONDS if slow else 0)
        while time.monotonic() < deadline:
            if os.getppid() != parent:
                os._exit(4)  # our runner is gone: do not linger as an orphan
            time.sleep(0.02)
        note("finished", runner)
        self.assertFalse(FAIL, "this commit is meant to fail")
'''

class Notes:
    """The notes left by the fault tests of the commits under test."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder)

    def find(self, name: str = "*", kind: str = "started") -> list[tuple[int, str]]:
        """(pid, text) of every note of ``kind`` from test ``name``."""
        found = []
        for entry in sorted(os.listdir(self.folder)):
            parts = entry.split(".")
            if len(parts) != 3 or parts[1] != kind or name not in ("*", parts[0]):
                continue
            with open(os.path.join(self.folder, entry)) as handle:
                found.append((int(parts[2]), handle.read()))
        return found

    def started_on(self, runner_name: str, name: str = "*") -> list[int]:
        return [pid for pid, text in self.find(name) if text.split(" ")[0] == runner_name]

    def pids(self) -> list[int]:
        """Every process a fault test reported: test, grandchild, hung git."""
        pids = []
        for entry in os.listdir(self.folder):
            parts = entry.split(".")
            if len(parts) == 3 and parts[2].isdigit():
                pids.append(int(parts[2]))
                if parts[1] == "grandchild":
                    with open(os.path.join(self.folder, entry)) as handle:
                        text = handle.read().strip()
                    if text.isdigit():
                        pids.append(int(text))
        return sorted(set(pids))


def is_fault_process(pid: int) -> bool:
    """A process a fault test started (the test, its grandchild, a hung
    git or sleep): what a finaliser may kill by PID."""
    args = cmdline(pid) or b""
    return any(word in args for word in (b"unittest", b"time.sleep(60)", b"sleep\x0020"))


def commit_fault(upstream, name: str, seconds: float = 0.0, fail: bool = False,
                 once: bool = False, kill_runner: bool = False,
                 grandchild: bool = False) -> str:
    """Commit a ``tests/test_fault.py`` with the given behaviour; the id."""
    text = FAULT_TEST.format(name=name, seconds=seconds, fail=fail, once=once,
                             kill_runner=kill_runner, grandchild=grandchild)
    return upstream.commit({"tests/test_fault.py": text}, f"fault {name}")
