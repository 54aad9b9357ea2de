"""Sharding through the real daemons: a commit split over runners gets the
verdict and counts of a hand run of the whole suite in a fresh checkout
(a failing test, an import error in one module, a removed test file), and
a runner SIGKILLed in the middle of its shard costs that shard alone."""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET

import helpers
from ci.runner.verdict import judge
from support.cluster import PY, dispatch, git, wait_until
from support.junit_schema import assert_valid

COUNTS = ("tests", "failures", "errors", "skipped")


def module(name: str, tests: int, sleep: float, broken: str = "") -> str:
    """A test module of ``tests`` tests, the first sleeping ``sleep`` s;
    ``broken``: "fail" makes its last test fail, "import" its import."""
    lines = ["import time", "import unittest"]
    if broken == "import":
        lines.append("import no_such_module_for_sharding")
    lines += ["", f"class Test{name.title()}(unittest.TestCase):"]
    for i in range(tests):
        lines.append(f"    def test_{i}(self):")
        lines.append(f"        time.sleep({sleep if i == 0 else 0})")
        wrong = broken == "fail" and i == tests - 1
        lines.append(f"        self.assertEqual(1, {2 if wrong else 1})")
    lines.append("    @unittest.skip('not today')")
    lines.append("    def test_skipped(self):")
    lines.append("        pass")
    return "\n".join(lines) + "\n"


SUITE = {f"tests/test_{n}.py": module(n, t, s) for n, t, s in [
    ("alpha", 3, 0.3), ("beta", 2, 0.3), ("gamma", 4, 0.2), ("delta", 1, 0.3),
    ("epsilon", 2, 0.2), ("zeta", 3, 0.2), ("eta", 2, 0.2)]}


def state(cluster) -> dict:
    reply = helpers.call(("127.0.0.1", cluster.dispatcher_port), "state")
    return json.loads(reply.body)


def hand_run(upstream, commit: str, dest) -> tuple[str, dict]:
    """The whole suite in a fresh checkout, as a developer would run it."""
    subprocess.run(["git", "clone", "-q", upstream.path, str(dest)], check=True,
                   capture_output=True, timeout=60)
    git(dest, "checkout", "-q", "--detach", commit)
    proc = subprocess.run([PY, "-m", "unittest", "discover", "-s", "tests"], cwd=dest,
                          capture_output=True, timeout=120)
    verdict, counts, _ = judge(proc.returncode, False,
                                              proc.stdout + proc.stderr)
    return verdict, {k: getattr(counts, k) for k in COUNTS}


def start(cluster, runners: int, shards: int) -> list:
    # Tiny tests: every commit is split, however short its suite.
    cluster.start_dispatcher("--max-shards", str(shards), "--min-shard-seconds", "0")
    started = [cluster.start_runner() for _ in range(runners)]
    wait_until(lambda: cluster.status().get("idle_runners") == str(runners), 20,
               what="runners registered")
    return started


def test_sharded_verdicts_and_counts_equal_a_hand_run(cluster, upstream, tmp_path):
    start(cluster, runners=3, shards=3)
    commits = [upstream.commit(dict(SUITE), "whole suite")]
    commits.append(upstream.commit({"tests/test_gamma.py": module("gamma", 4, 0.2, "fail")},
                                   "a failing test"))
    commits.append(upstream.commit({"tests/test_gamma.py": SUITE["tests/test_gamma.py"],
                                    "tests/test_zeta.py": module("zeta", 3, 0.2, "import")},
                                   "an import error"))
    commits.append(upstream.commit({"tests/test_zeta.py": SUITE["tests/test_zeta.py"],
                                    "tests/test_alpha.py": None}, "a test file removed"))
    expected_verdicts = ["passed", "failed", "error", "passed"]
    for n, commit in enumerate(commits):
        # One at a time: three runners free, one commit queued, so it is split.
        dispatch(cluster, commit)
        fields = cluster.result(commit, timeout=60)
        verdict, counts = hand_run(upstream, commit, tmp_path / f"hand-{n}")
        assert verdict == expected_verdicts[n]
        assert fields["verdict"] == verdict, fields
        assert {k: int(fields[k]) for k in COUNTS} == counts, (n, fields)
        assert fields["shards"] == "3"
        output = fields["output"].decode()
        assert all(f"===== shard {i}/3 on 127.0.0.1:" in output for i in (1, 2, 3)), output
        with open(os.path.join(cluster.results, commit + ".xml"), "rb") as handle:
            data = handle.read()
        assert_valid(data)  # also for the error and skipped cases
        suite = ET.fromstring(data).find("testsuite")
        assert {k: int(suite.get(k)) for k in COUNTS} == counts
        if verdict == "error":
            # The shard with the broken module says so; the others passed.
            assert "test modules could not be imported" in fields["reason"]
            assert output.count(": error (") == 1 and output.count(": passed (") == 2
    log = cluster.daemons[0].log()
    assert all(log.count(f"commit {c[:12]} split into 3 shards") == 1 for c in commits)


def test_a_runner_killed_mid_shard_costs_that_shard_alone(cluster, upstream, tmp_path):
    runners = start(cluster, runners=4, shards=3)
    slow = {f"tests/test_{n}.py": module(n, 2, 0.8) for n in
            ("one", "two", "three", "four", "five", "six")}
    commit = upstream.commit(slow, "slow suite")
    dispatch(cluster, commit)

    def running_shards():
        jobs = [j for j in state(cluster)["running"] if j.get("shard")]
        return jobs if len(jobs) == 3 and all(j["elapsed"] > 0.6 for j in jobs) else None
    jobs = wait_until(running_shards, 30, interval=0.1, what="three shards running")
    victim_job = next(j for j in jobs if j["shard"] == "2/3")
    victim = next(r for r in runners if f"127.0.0.1:{r.port}" == victim_job["runner"])
    victim.kill()

    fields = cluster.result(commit, timeout=60)
    verdict, counts = hand_run(upstream, commit, tmp_path / "hand")
    assert (fields["verdict"], {k: int(fields[k]) for k in COUNTS}) == (verdict, counts)
    assert verdict == "passed" and counts["tests"] == 6 * 3 + 1  # + the fixture's test_sample
    log = cluster.daemons[0].log()
    short = commit[:12]
    assert log.count(f"shard 2/3 of {short} runs again") == 1
    sent = [line for line in log.splitlines() if f"commit {short} shard " in line
            and "-> runner" in line]
    assert sorted(line.split(" shard ")[1].split(" ")[0] for line in sent) == [
        "1/3", "2/3", "2/3", "3/3"], sent
    assert log.count(f"result for {short}: passed") == 1
    # Written once: the file's shard headers name the rerun's runner, not the dead one.
    output = fields["output"].decode()
    assert output.count("===== shard 2/3 on ") == 1
    assert f"===== shard 2/3 on {victim_job['runner']}" not in output


PYTEST_PROJECT = {
    "tests/test_sample.py": None,
    **{f"tests/test_{n}.py": f"def test_{n}():\n    assert True\n" for n in ("a", "b", "c", "d")},
    # What pytest collects beyond test_*.py files, and what it leaves out.
    "pytest.ini": "[pytest]\naddopts = --doctest-modules\n",
    "tests/helpers.py": 'def double(x):\n    """\n    >>> double(2)\n    4\n    """\n'
                        '    return 2 * x\n',
    "tests/conftest.py": "collect_ignore = ['test_old.py']\n",
    "tests/test_old.py": "def test_old():\n    assert False\n"}


def hand_run_pytest(upstream, commit: str, dest) -> tuple[str, dict]:
    subprocess.run(["git", "clone", "-q", upstream.path, str(dest)], check=True,
                   capture_output=True, timeout=60)
    git(dest, "checkout", "-q", "--detach", commit)
    proc = subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=dest, capture_output=True, timeout=120)
    verdict, counts, _ = judge(proc.returncode, False, proc.stdout + proc.stderr)
    return verdict, {k: getattr(counts, k) for k in COUNTS}


def test_a_sharded_pytest_run_keeps_what_pytest_collects(cluster, upstream, tmp_path):
    """Each shard runs the pytest command as it is and keeps its share of
    what pytest collects: the doctest --doctest-modules adds and the file
    collect_ignore leaves out count as in a hand run (passing named files,
    the shards ran the ignored failing file and never the doctest)."""
    cluster.start_dispatcher("--max-shards", "3", "--min-shard-seconds", "0")
    quiet = dict(cluster.env, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")   # see quiet_pytest
    for _ in range(3):
        cluster.start_runner("--test-command", f"{PY} -m pytest -q tests", env=quiet)
    wait_until(lambda: cluster.status().get("idle_runners") == "3", 20,
               what="runners registered")
    passing = upstream.commit(dict(PYTEST_PROJECT), "a pytest project")
    failing = upstream.commit({"tests/helpers.py": PYTEST_PROJECT["tests/helpers.py"].replace(
        "    4\n", "    5\n")}, "a doctest fails")
    for n, (commit, expected) in enumerate([(passing, "passed"), (failing, "failed")]):
        dispatch(cluster, commit)
        fields = cluster.result(commit, timeout=60)
        verdict, counts = hand_run_pytest(upstream, commit, tmp_path / f"hand-{n}")
        assert (verdict, counts["tests"]) == (expected, 5)
        assert fields["verdict"] == verdict, fields
        assert {k: int(fields[k]) for k in COUNTS} == counts, fields
        assert fields["shards"] == "3"
        output = fields["output"].decode()
        assert all(f"ci_shard: shard {i}/3 runs " in output for i in (1, 2, 3)), output
