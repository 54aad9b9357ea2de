"""The command line a test run executes, built in one place.

From the test command (the recipe's or ``--test-command``; None: the
default unittest discovery), the job's shard and the run's JUnit capture:

* a shard runs its share of the tests (``sharding.shard_run`` picks it),
  or nothing; an unsharded ``{tests}`` command gets every test file;
* a unittest run goes through the runner's recorder
  (``python RECORDER REPORT [--shard [--path-first DIR]] ARGS``), a pytest
  run gets ``--junitxml=REPORT``, unless ``--junit-xml`` names the files
  the command writes by itself;
* with an order folder (``ordering.OrderFolder``): the recorder gets
  ``--order DIR``, a pytest run ``-p ci_order --ci-order-dir=DIR`` (the
  plugin's folder on PYTHONPATH, in ``CommandLine.pythonpath``); any other
  command runs as it is, and the folder says why it was not reordered.

``ci.commands`` says which commands are unittest or pytest runs; only
this module knows the recorder's argument layout.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from ci import commands, sharding
from ci.runner import junit_capture, ordering


@dataclasses.dataclass(frozen=True)
class CommandLine:
    """What a run executes: ``argv`` (None: this shard has nothing to
    run), the ``shards`` result field of a sharded job and the shard's
    label (``whole``, ``skipped``, ``empty`` or ""); ``pythonpath``: a
    folder the run needs first on PYTHONPATH (the ordering plugin's)."""
    argv: list[str] | None
    shards: str | None = None
    label: str = ""
    pythonpath: str | None = None

    def env(self, base: dict) -> dict:
        """The run's environment: ``base`` with ``pythonpath`` first."""
        if not self.pythonpath:
            return base
        rest = base.get("PYTHONPATH")
        return {**base, "PYTHONPATH": self.pythonpath + (os.pathsep + rest if rest else "")}


def default_test_command(repo: str, python: str | None = None) -> list[str]:
    """``python -m unittest discover -s tests``; ``-t .`` when tests/ is a
    package, so that tests importing the project from the root work."""
    command = [python or sys.executable, "-m", "unittest", "discover", "-s", "tests"]
    if os.path.exists(os.path.join(repo, "tests", "__init__.py")):
        command += ["-t", "."]
    return command


def build(repo: str, custom: list[str] | None, python: str | None,
          shard: sharding.ShardSpec | None, capture: junit_capture.Capture,
          order: ordering.OrderFolder | None = None) -> CommandLine:
    """The final command line of a run in the clone ``repo``.  ``custom``:
    the configured test command (None: the default, run by ``python``);
    ``order``: the run's order folder (None: no ordering at all)."""
    command = custom or default_test_command(repo, python)
    if shard is None:
        if custom and sharding.PLACEHOLDER in custom:
            command = sharding.expand_placeholder(repo, command)
        return ordered_line(with_report(command, capture, order=order), order)
    if custom is None and capture.pattern:
        # Only the recorder loads single modules as discovery does.
        first = shard.index == 1
        run = sharding.ShardRun(command if first else None, "whole" if first else "skipped")
    else:
        run = sharding.shard_run(repo, custom, command, shard, custom is None)
    shards = f"{shard.index}/{shard.total}" + (f" {run.label}" if run.label else "")
    if run.command is None:
        return CommandLine(None, shards, run.label)
    shard_args: list[str] = []
    if custom is None:
        # The default command's modules, put on sys.path as discovery would.
        shard_args = ["--shard", *(["--path-first", run.path_first] if run.path_first
                                   else [])]
    argv = with_report(run.command, capture, shard_args, order)
    return dataclasses.replace(ordered_line(argv, order), shards=shards, label=run.label)


def with_report(command: list[str], capture: junit_capture.Capture,
                recorder_args: list[str] = (),
                order: ordering.OrderFolder | None = None) -> list[str]:
    """``command`` made to leave its JUnit report where ``capture`` reads
    it; ``recorder_args`` go to the recorder, if it runs the command, and
    so does the order folder."""
    if capture.pattern:
        return list(command)
    kind = commands.report_kind(command)
    if kind == "recorder":
        order_args = ["--order", order.path] if order is not None else []
        return [command[0], junit_capture.RECORDER, capture.report_file(),
                *order_args, *recorder_args, *command[3:]]
    if kind == "pytest":
        spot = commands.pytest_position(command)
        return [*command[:spot + 1], f"--junitxml={capture.report_file()}",
                *command[spot + 1:]]
    return list(command)


def ordered_line(argv: list[str], order: ordering.OrderFolder | None) -> CommandLine:
    """``argv`` with the ordering plugin for a pytest run; a command that
    is neither pytest nor the recorder runs as it is, and ``order`` notes
    why it was not reordered."""
    if order is None or junit_capture.RECORDER in argv[1:2]:
        return CommandLine(argv)
    spot = commands.pytest_position(argv)
    if spot is None:
        order.unsupported = "the test command is neither pytest nor unittest's default run"
        return CommandLine(argv)
    return CommandLine([*argv[:spot + 1], "-p", ordering.PLUGIN,
                        f"--ci-order-dir={order.path}", *argv[spot + 1:]],
                       pythonpath=ordering.SUPPORT)
