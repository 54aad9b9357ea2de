"""ci/runner/command_line.py: the one place a run's command line is
built from the test command, the shard and the JUnit capture."""

from __future__ import annotations

import os
import sys

from ci import sharding
from ci.runner import command_line, junit_capture

PY = sys.executable


def project(tmp_path, package: bool = False) -> str:
    tests = tmp_path / "tests"
    tests.mkdir()
    for name in ("test_a.py", "test_b.py", "test_c.py"):
        (tests / name).write_text("import unittest\n")
    if package:
        (tests / "__init__.py").write_text("")
    return str(tmp_path)


def build(repo, custom=None, shard=None, pattern=None):
    with junit_capture.Capture(repo, pattern) as capture:
        line = command_line.build(repo, custom, PY, shard, capture)
        return line, capture.paths[:]


def test_the_default_command_runs_through_the_recorder(tmp_path):
    repo = project(tmp_path, package=True)
    line, paths = build(repo)
    assert line.argv == [PY, junit_capture.RECORDER, paths[0], "discover", "-s", "tests",
                         "-t", "."]
    assert line.shards is None and os.path.basename(paths[0]) == "results.xml"


def test_pytest_gets_a_report_flag_unless_it_names_one(tmp_path):
    repo = project(tmp_path)
    line, paths = build(repo, ["python", "-m", "pytest", "-q", "tests"])
    assert line.argv == ["python", "-m", "pytest", f"--junitxml={paths[0]}", "-q", "tests"]
    line, paths = build(repo, ["pytest", "--junitxml=mine.xml"])
    assert line.argv == ["pytest", "--junitxml=mine.xml"] and paths == []


def test_a_junit_pattern_leaves_the_command_alone(tmp_path):
    repo = project(tmp_path)
    for command in ([PY, "-m", "unittest"], ["pytest", "tests"], ["make", "test"]):
        line, paths = build(repo, command, pattern="reports/*.xml")
        assert line.argv == command and paths == []


def test_a_default_shard_tells_the_recorder_and_lists_its_modules(tmp_path):
    repo = project(tmp_path)
    got = []
    for index in (1, 2, 3):
        line, paths = build(repo, shard=sharding.ShardSpec(index, 3, {}))
        assert line.shards == f"{index}/3"
        assert line.argv[:6] == [PY, junit_capture.RECORDER, paths[0], "--shard",
                                 "--path-first", "tests"]
        got += line.argv[6:]
    assert sorted(got) == ["test_a", "test_b", "test_c"]


def test_a_default_shard_with_a_pattern_runs_whole_on_shard_one(tmp_path):
    repo = project(tmp_path)
    first, _ = build(repo, shard=sharding.ShardSpec(1, 2, {}), pattern="r/*.xml")
    assert first.argv[:3] == [PY, "-m", "unittest"] and first.shards == "1/2 whole"
    second, _ = build(repo, shard=sharding.ShardSpec(2, 2, {}), pattern="r/*.xml")
    assert second.argv is None and second.shards == "2/2 skipped"
    assert second.label == "skipped"


def test_a_tests_placeholder_gets_every_file_or_the_shards_share(tmp_path):
    repo = project(tmp_path)
    line, paths = build(repo, ["runtests", "-v", "{tests}"])
    assert line.argv == ["runtests", "-v", "tests/test_a.py", "tests/test_b.py",
                         "tests/test_c.py"] and paths == []
    shares = [build(repo, ["runtests", "{tests}"], sharding.ShardSpec(i, 3, {}))[0].argv[1:]
              for i in (1, 2, 3)]
    assert sorted(sum(shares, [])) == ["tests/test_a.py", "tests/test_b.py",
                                       "tests/test_c.py"]


def test_a_pytest_shard_runs_the_command_with_the_shard_plugin(tmp_path):
    """pytest keeps the shard's share of what it collects: the command
    runs unchanged but for the plugin, whose file says the shard, the
    tests to run first and the durations; a rerun goes without it."""
    from ci.runner import ordering
    repo = project(tmp_path)
    command = ["python", "-m", "pytest", "-q", "tests"]
    spec = sharding.ShardSpec(2, 3, {"tests.test_a": 1.5}, first=("tests.test_b.test_x",))
    with junit_capture.Capture(repo) as capture, ordering.OrderFolder() as order:
        line = command_line.build(repo, command, PY, spec, capture, order)
        plugin_file = os.path.join(order.path, "shard")
        assert line.argv[3:6] == ["-p", "ci_order", f"--ci-order-dir={order.path}"]
        assert line.argv[6:] == ["-p", "ci_shard", f"--ci-shard={plugin_file}",
                                 f"--junitxml={capture.paths[0]}", "-q", "tests"]
        with open(plugin_file, "rb") as handle:
            assert handle.read() == (b"shard 2/3\nfirst tests.test_b.test_x\n"
                                     b"seconds 1.500 tests.test_a\n")
    assert (line.shards, line.ran, line.pythonpath) == ("2/3", command, ordering.SUPPORT)
    # Without an order folder for its file, shard 1 runs the command whole.
    first, _ = build(repo, command, sharding.ShardSpec(1, 2, {}))
    assert first.shards == "1/2 whole" and "ci_shard" not in first.argv
