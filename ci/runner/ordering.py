"""Failing tests first, and the first failure as it happens: the runner's
side of ``ci_support/ci_order.py``.

Each test run gets a private order folder outside the clone: the runner
writes there the test ids the job names to run first (``first``); the
test process (the unittest recorder, or pytest with the ``ci_order``
plugin) reorders its tests, says what it did (``status``) and appends a
line per failing test as it fails (``events``).  The runner reads the
events while the tests run (the daemon's progress thread tells the
dispatcher of the first) and both files after the run, for the header:

* ``failing_first``: only when the job named tests: ``N of M run first``,
  ``none of M found``, or ``not reordered (why)``;
* ``first_failure_after``: seconds from the start of the test command to
  the first failing test, when one failed and the run could tell.

Why a folder and not the output: the output is the tests' own and anything
in it could be forged or interleaved; the folder is written only by the
process the runner started (and read as untrusted, bounded, all the same).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

from ci.files import read_inside, remove_quietly
from ci.wire import one_line

# The folder of the recorder and the pytest plugin (ci_support/).
SUPPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "ci_support")
PLUGIN = "ci_order"
# The most of ``events`` read (the first line is what matters).
EVENTS_LIMIT = 64 * 1024


def use_support(folder: str) -> None:
    """Load the plugin from ``folder`` from now on (with --test-user, the
    runner's copy in its state folder; see sandbox.access)."""
    global SUPPORT
    SUPPORT = folder


@dataclasses.dataclass(frozen=True)
class FirstFailure:
    """The first failing test of a run: when (``time.time()``) and which."""
    at: float
    test: str


class OrderFolder:
    """One run's order folder; a context manager that removes it."""

    def __init__(self, first: tuple[str, ...] = (), scratch: str | None = None):
        self.first = tuple(first)
        self.scratch = scratch      # where its folder goes (None: the system's temp)
        self.path: str | None = None
        self.started: float | None = None   # when the test command started
        self.unsupported = ""               # why the command cannot be reordered

    def __enter__(self) -> OrderFolder:
        self.path = tempfile.mkdtemp(prefix="ci-order-", dir=self.scratch)
        with open(os.path.join(self.path, "first"), "w", encoding="utf-8") as handle:
            handle.write("".join(f"{test_id}\n" for test_id in self.first))
        return self

    def __exit__(self, *exc) -> None:
        if self.path:
            remove_quietly(self.path)
            self.path = None

    def _read(self, name: str, limit: int) -> bytes:
        if self.path is None:
            return b""
        try:
            return read_inside(os.path.join(self.path, name), self.path, limit)
        except OSError:
            return b""

    def first_failure(self) -> FirstFailure | None:
        """The first failure the test process told of, if any yet."""
        line = self._read("events", EVENTS_LIMIT).split(b"\n", 1)
        if len(line) < 2:   # none, or not yet a whole line
            return None
        when, _, test = line[0].decode("utf-8", "replace").partition("\t")
        try:
            at = float(when)
        except ValueError:
            return None
        return FirstFailure(at, one_line(test, 500)) if test else None

    def fields(self) -> dict:
        """The header fields this run's order and failures give."""
        fields: dict = {}
        failure = self.first_failure()
        if failure is not None and self.started is not None:
            fields["first_failure_after"] = f"{max(failure.at - self.started, 0.0):.3f}"
        if self.first:
            fields["failing_first"] = self.note()
        return fields

    def stopped(self) -> str:
        """Why the run ended before its last test ("": it did not say so)."""
        return one_line(self._read("stopped", 300).decode("utf-8", "replace"), 200)

    def note(self) -> str:
        """What became of the tests to run first, for the header."""
        total = len(self.first)
        if self.unsupported:
            return f"not reordered ({self.unsupported})"
        status = self._read("status", 300).decode("utf-8", "replace").strip()
        if status.startswith("reordered "):
            found = status.split(" ", 1)[1]
            return f"{found if found.isdigit() else '?'} of {total} run first"
        if status == "none found":
            return f"none of {total} found"
        if status.startswith("not reordered"):
            return one_line(status, 200)
        return "not reordered (the test process never read the order)"
