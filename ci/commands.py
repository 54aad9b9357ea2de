"""What kind of test command a command line is.

Sharding splits a command's tests and the runner's command line adds its
report flag; both must agree on which lines are pytest or unittest runs, so the
recognising lives here once.
"""

from __future__ import annotations

import os

PYTEST_NAMES = ("pytest", "py.test")


def pytest_position(command: list[str]) -> int | None:
    """The index of the ``pytest`` word in ``command`` (a path to it counts), or None."""
    return next((i for i, arg in enumerate(command)
                 if os.path.basename(arg) in PYTEST_NAMES), None)


def is_unittest(command: list[str]) -> bool:
    """``<python> -m unittest ...``: the default command's shape."""
    return len(command) >= 3 and command[1:3] == ["-m", "unittest"]


def report_kind(command: list[str]) -> str | None:
    """How ``command`` can be made to leave a JUnit report: ``"recorder"``
    (a unittest run, through the runner's recorder), ``"pytest"`` (its
    ``--junitxml``, unless the command gives one itself), or None."""
    if is_unittest(command):
        return "recorder"
    if pytest_position(command) is not None and not any(
            arg.startswith(("--junitxml", "--junit-xml")) for arg in command):
        return "pytest"
    return None
