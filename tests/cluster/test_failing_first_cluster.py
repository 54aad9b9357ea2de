"""Failing tests first and the first failure as it happens, through real
daemons: a branch's test that failed on one commit runs first on the next
(the dispatcher names it in the job, from the result it just had), its
failure is told while the run goes on, the early notification goes out
once per failing run, and broke stays one event."""

from __future__ import annotations

from support.cluster import git, wait_until
from support.notify import recorded, recorder

SLOW_FIRST = """import time
import unittest

class Slow(unittest.TestCase):
    def test_slow(self):
        time.sleep(1.5)
"""
BROKEN_LAST = """import time
import unittest

class Last(unittest.TestCase):
    def test_fine(self):
        pass

    def test_zz_still_running(self):
        time.sleep(1.0)   # the run goes on after the failure

    def test_broken(self):
        self.assertEqual(1 + 1, 3)
"""


def test_a_failing_test_runs_first_on_the_next_commit_and_is_told_early(cluster, upstream,
                                                                           tmp_path):
    command, out = recorder(tmp_path)
    cluster.start_dispatcher("--notify-on", "early", "--notify-command", command,
                             "--notify-retry-max", "0.2")
    cluster.start_runner("--progress-interval", "0.2")
    cluster.start_observer("--poll", "0.3")
    base = git(upstream.path, "rev-parse", "HEAD")
    assert cluster.result(base)["verdict"] == "passed"
    upstream.commit({"tests/test_a_slow.py": SLOW_FIRST}, "slow first")
    slow = git(upstream.path, "rev-parse", "HEAD")
    assert cluster.result(slow)["verdict"] == "passed"
    red = upstream.commit({"tests/test_z_last.py": BROKEN_LAST}, "Break the last test")
    first = cluster.result(red)
    assert first["verdict"] == "failed" and "failing_first" not in first
    red2 = upstream.commit(message="Still broken")
    second = cluster.result(red2)
    assert second["verdict"] == "failed"
    assert (second["tests"], second["failures"]) == (first["tests"], first["failures"])
    assert second["failing_first"] == "1 of 1 run first"
    # In file order the slow module ran before the failure; first, it did not.
    assert float(first["first_failure_after"]) >= 1.5
    # (compared with the first run, not a fixed bound: a loaded machine's
    # start-up counts in both)
    assert float(second["first_failure_after"]) < float(first["first_failure_after"]) - 1.0
    wait_until(lambda: sum(e["CI_EVENT"] == "first-failure" for e in recorded(out)) >= 2,
               30, what="an early notification for each failing run")
    events = [(e["CI_EVENT"], e["CI_COMMIT"]) for e in recorded(out)]
    assert events.count(("broken", red)) == 1
    assert [c for kind, c in events if kind == "first-failure"] == [red, red2]
    early = next(e for e in recorded(out) if e["CI_EVENT"] == "first-failure")
    assert "test_z_last.Last.test_broken" in early["CI_TEXT"]
