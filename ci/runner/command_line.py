"""The command line a test run executes, built in one place.

From the test command (the recipe's or ``--test-command``; None: the
default unittest discovery), the job's shard and the run's JUnit capture:

* a shard runs its share of the tests (``sharding.shard_run`` picks it),
  or nothing; a pytest shard runs the command with ``-p ci_shard
  --ci-shard=FILE`` (FILE in the order folder), which keeps its share of
  what pytest collects; an unsharded ``{tests}`` command gets every test
  file;
* a unittest run goes through the runner's recorder
  (``python RECORDER REPORT [--order DIR] [--shard] [--path-first DIR]
  ARGS``), a pytest run gets ``--junitxml=REPORT``, unless ``--junit-xml``
  names the files the command writes by itself;
* a rerun of failing tests (``rerun``) runs the same command with only
  their ids: unittest ids importable with the run's top folder first on
  ``sys.path``, pytest node ids found from the records' classnames; it is
  not reordered, but runs with the run's environment (``CommandLine.env``);
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
    label (``whole``, ``skipped``, ``empty`` or "").  ``ran``: the command
    before the report and the ordering were added, and ``path_first``: the
    folder a shard's unittest modules are named from (what a rerun needs);
    ``pythonpath``: a folder the run needs first on PYTHONPATH (the
    ordering plugin's), which a rerun keeps too."""
    argv: list[str] | None
    shards: str | None = None
    label: str = ""
    ran: list[str] | None = None
    path_first: str | None = None
    pythonpath: str | None = None
    note: str = ""      # why shard 1 runs the whole suite (sharding.ShardRun.note)

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
        line = ordered_line(with_report(command, capture, order=order), order)
        return dataclasses.replace(line, ran=command)
    if custom is None and capture.pattern:
        # Only the recorder loads single modules as discovery does.
        run = sharding.whole_run(command, shard.index, "--junit-xml is set: only the recorder "
                                 "loads a shard's modules as discovery does")
    else:
        run = sharding.shard_run(repo, custom, command, shard, custom is None)
    if run.in_pytest and (order is None or order.path is None):
        run = sharding.whole_run(command, shard.index,
                                 "no order folder for the shard's plugin file")
    shards = f"{shard.index}/{shard.total}" + (f" {run.label}" if run.label else "")
    if run.command is None:
        return CommandLine(None, shards, run.label, note=run.note)
    shard_args: list[str] = []
    if custom is None:
        # The default command's modules, put on sys.path as discovery would.
        shard_args = ["--shard", *(["--path-first", run.path_first] if run.path_first
                                   else [])]
    argv = with_report(run.command, capture, shard_args, order)
    if run.in_pytest:
        argv = in_pytest_shard(argv, shard, order)
    # (For pytest, ordered_line puts the plugins' folder on PYTHONPATH.)
    return dataclasses.replace(ordered_line(argv, order), shards=shards, label=run.label,
                               ran=run.command, path_first=run.path_first, note=run.note)


def in_pytest_shard(argv: list[str], shard: sharding.ShardSpec,
                    order: ordering.OrderFolder) -> list[str]:
    """A pytest command that keeps the shard's share of what it collects
    (the ``ci_shard`` plugin, its file in the run's order folder); a rerun
    (``ran``) names its tests and goes without it."""
    path = os.path.join(order.path, "shard")
    with open(path, "wb") as handle:
        handle.write(sharding.plugin_file(shard))
    spot = commands.pytest_position(argv)
    return [*argv[:spot + 1], "-p", sharding.PYTEST_PLUGIN, f"--ci-shard={path}",
            *argv[spot + 1:]]


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


# pytest options whose value is the next argument (a rerun keeps both).
PYTEST_VALUE_OPTIONS = frozenset((
    "-k", "-m", "-p", "-c", "-o", "-W", "-r", "-n", "--deselect", "--ignore",
    "--ignore-glob", "--rootdir", "--confcutdir", "--basetemp", "--tb", "--maxfail",
    "--durations", "--import-mode", "--log-level", "--capture", "--override-ini",
    "--config-file", "--color", "--dist", "--cov", "--cov-report", "--timeout"))


def rerun(repo: str, line: CommandLine, keys: list[tuple[str, str]],
          capture: junit_capture.Capture) -> list[str] | None:
    """The command that runs only the tests ``keys`` (classname, name)
    again, the way ``line`` ran them, leaving its report where
    ``capture`` reads it; None when the command's tests cannot be named
    (neither a unittest nor a pytest run, or a ``--junit-xml`` command)."""
    command = line.ran
    if not command or capture.pattern or commands.report_kind(command) is None:
        return None
    if commands.report_kind(command) == "recorder":
        ids = [f"{classname}.{name}" if classname else name for classname, name in keys]
        top = line.path_first or unittest_top(command)
        return with_report([*command[:3], *ids], capture,
                           ["--path-first", top] if top else [])
    spot = commands.pytest_position(command)
    rest = command[spot + 1:]
    options, folders = pytest_split(rest)
    ids = [node for node in (node_id(repo, key, folders) for key in keys) if node]
    if not ids:
        return None
    return with_report([*command[:spot + 1], *options, *ids], capture)


def unittest_top(command: list[str]) -> str | None:
    """The folder a ``python -m unittest discover`` run's test ids are
    importable from (its ``-t``, else its start folder), which discovery
    puts first on ``sys.path``; None for other unittest runs, whose ids are
    importable from the clone's root."""
    args = command[3:]
    if "discover" not in args:
        return None
    args = args[args.index("discover") + 1:]
    named: dict[str, str] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-s", "--start-directory", "-t", "--top-level-directory", "-p",
                   "--pattern") and i + 1 < len(args):
            named[arg.lstrip("-")[:1]] = args[i + 1]
            i += 2
            continue
        if not arg.startswith("-"):
            positional.append(arg)
        i += 1
    top = named.get("t") or (positional[2] if len(positional) > 2 else None)
    return top or named.get("s") or (positional[0] if positional else ".")


def pytest_split(args: list[str]) -> tuple[list[str], list[str]]:
    """(options with their values, the paths) of a pytest command's
    arguments: a rerun keeps the options and names tests, not paths."""
    options: list[str] = []
    paths: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            options.append(arg)
            if arg in PYTEST_VALUE_OPTIONS and i + 1 < len(args):
                options.append(args[i + 1])
                i += 1
        else:
            paths.append(arg)
        i += 1
    return options, paths


def node_id(repo: str, key: tuple[str, str], paths: list[str]) -> str | None:
    """A pytest node id for a record's (classname, name): classname is the
    test file's path from pytest's root folder with ``/`` as ``.`` and no
    ``.py``, then its classes.  The file is looked for from the clone's
    root, then from the folders the command named (an older pytest's
    root); None if there is none."""
    classname, name = key
    parts = classname.split(".") if classname else []
    bases = [""] + [p if os.path.isdir(os.path.join(repo, p)) else os.path.dirname(p)
                    for p in paths]
    for end in range(len(parts), 0, -1):
        relative = "/".join(parts[:end]) + ".py"
        for base in dict.fromkeys(bases):
            path = os.path.normpath(os.path.join(base, relative))
            if path.startswith("..") or os.path.isabs(path):
                continue
            if os.path.isfile(os.path.join(repo, path)):
                return "::".join([path, *parts[end:], name])
    return None


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
