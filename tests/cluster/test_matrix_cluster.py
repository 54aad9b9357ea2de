"""Matrix builds end to end, with a real observer, dispatcher and runners
and real interpreters (pyenv's 3.9, 3.12, 3.13; a test skips, saying
which, where one is missing): a project using ``match`` fails its 3.9 cell
and passes on 3.12 and 3.13, so the commit fails and names the cell, and
a runner with only 3.12 never gets the 3.9 cell; an exclusive runner
ignores unlabelled work; a cell no runner can take is shown waiting, then
gets ``error`` with its reason; a dispatcher killed with cells half done
ends with every cell tested exactly once."""

from __future__ import annotations

import json
import os
import signal

import helpers
from support.cluster import wait_until
from support.pythons import pyenv_python

from ci import results

MATCH_CODE = """\
def kind(value):
    match value:
        case int():
            return "int"
        case _:
            return "other"
"""
# Imported inside the test: on 3.9 the SyntaxError fails the test (an
# import error at collection would be the runner's ``error`` verdict).
MATCH_TEST = """\
import importlib
import unittest


class TestKind(unittest.TestCase):
    def test_kind(self):
        self.assertEqual(importlib.import_module("shapes").kind(3), "int")
"""


def state_of(cluster) -> dict:
    reply = helpers.call(("127.0.0.1", cluster.dispatcher_port), "state", timeout=5)
    return json.loads(reply.body)


def cell_header(cluster, commit: str, cell: str) -> dict:
    return results.read_header(os.path.join(cluster.results, f"{commit}.cell.{cell}")) or {}


def test_match_fails_on_39_only_and_each_cell_runs_where_its_python_is(cluster, upstream):
    pythons = {v: pyenv_python(v) for v in ("3.9", "3.12", "3.13")}
    commit = upstream.commit({
        ".ci.ini": "[ci]\nmatrix_python = 3.9 3.12 3.13\n"
                   "test = python -m unittest discover -v\n",
        "shapes.py": MATCH_CODE, "test_shapes.py": MATCH_TEST})
    cluster.start_dispatcher()
    runners = {v: cluster.start_runner("--name", f"r{v}", "--python", f"{v}={path}")
               for v, path in pythons.items()}
    cluster.start_observer()
    result = cluster.result(commit, timeout=120)
    assert result["verdict"] == "failed"
    assert result["cells"] == "py3.9=failed py3.12=passed py3.13=passed"
    assert "py3.9" in result["reason"]
    for version in pythons:
        header = cell_header(cluster, commit, f"py{version}")
        assert header["cell"] == f"py{version}" and header["python"] == version
        assert header["runner"] == f"127.0.0.1:{runners[version].port}", header
    assert os.path.exists(os.path.join(cluster.results, f"{commit}.cell.py3.12.xml"))
    assert "py3.9" not in runners["3.12"].log()


def test_exclusive_runner_and_a_cell_no_runner_can_take(cluster, upstream):
    py312 = pyenv_python("3.12")
    plain = upstream.commit({"test_ok.py": "import unittest\n\n\nclass T(unittest.TestCase):\n"
                                           "    def test_ok(self):\n        pass\n"})
    # Long enough that both are still waiting when they are looked at below
    # on a loaded machine (after a commit, a poll and a dispatch).
    cluster.start_dispatcher("--unroutable-timeout", "10")
    big = cluster.start_runner("--name", "big", "--label", "big", "--exclusive",
                               "--python", f"3.12={py312}")
    cluster.start_observer()

    def waiting():
        queue = state_of(cluster)["queue"]
        return {(q["commit"], q.get("cell") or ""): q.get("waiting") for q in queue}
    # No labels asked for: the only runner, exclusive, will not take it.
    assert wait_until(lambda: waiting().get((plain, "")), 30, what="the plain commit waiting") \
        == "waiting for a runner"
    matrix_commit = upstream.commit({
        ".ci.ini": "[ci]\nmatrix_python = 3.9 3.12\nlabels = big\n"
                   "test = python -m unittest discover\n"})
    shown = wait_until(lambda: waiting().get((matrix_commit, "py3.9")), 30,
                       what="the 3.9 cell waiting")
    assert shown == "waiting for a runner with big python3.9"
    status = helpers.call(("127.0.0.1", cluster.dispatcher_port), "status", timeout=5)
    assert b"waiting_for: " in status.body
    reasons = [line for line in status.body.decode().splitlines()
               if line.startswith("waiting_reasons: ")]
    assert reasons and "waiting for a runner with big python3.9 (1)" in reasons[0] \
        and "waiting for a runner (1)" in reasons[0]

    result = cluster.result(matrix_commit, timeout=60)
    assert result["cells"] == "py3.9=error py3.12=passed" and result["verdict"] == "error"
    reason = cell_header(cluster, matrix_commit, "py3.9")["reason"]
    assert "waiting for a runner with big python3.9" in reason and "10s" in reason
    # The commit without labels timed out too, and the exclusive runner
    # never ran it.
    assert "(waiting for a runner)" in cluster.result(plain, timeout=30)["reason"]
    assert plain not in big.log()


def test_a_dispatcher_killed_with_cells_half_done_tests_each_once(cluster, upstream, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chmod(runs, 0o777)
    commit = upstream.commit({
        ".ci.ini": "[ci]\nmatrix_n = 1 2 3 4 5 6\ntest = python -m unittest discover\n",
        "test_slow.py": "import os, time, unittest\n\n\nclass T(unittest.TestCase):\n"
                        "    def test_slow(self):\n"
                        f"        with open({str(runs / 'log')!r}, 'a') as f:\n"
                        "            f.write(os.environ['CI_N'] + '\\n')\n"
                        "        time.sleep(1.0)\n"})
    dispatcher = cluster.start_dispatcher("--restart-grace", "10")
    for _ in range(2):
        cluster.start_runner()
    cluster.start_observer()
    wait_until(lambda: len([n for n in os.listdir(cluster.results) if ".cell." in n
                            and not n.endswith(".xml")]) >= 2 if os.path.isdir(cluster.results)
               else False, 60, what="two cells done")
    dispatcher.send_signal(signal.SIGKILL)
    dispatcher.stop()
    cluster.start_dispatcher("--restart-grace", "10")
    result = cluster.result(commit, timeout=90)
    assert result["verdict"] == "passed"
    assert result["cells"] == " ".join(f"n{i}=passed" for i in range(1, 7))
    ran = (runs / "log").read_text().split()
    assert sorted(ran) == [str(i) for i in range(1, 7)], ran
