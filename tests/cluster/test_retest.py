"""Testing a commit again ("rebuild"): the new verdict replaces the file,
and the request survives a dispatcher crash."""

import os
import subprocess

from support.cluster import PY, ROOT, wait_until

import helpers
from ci import results
from ci.wire import parse_address

FLAKY_TEST = '''import os
import unittest


class TestFlaky(unittest.TestCase):
    def test_passes_from_the_second_run_on(self):
        marker = os.path.join(os.environ["CI_FLAKY_DIR"], "ran-once")
        first = not os.path.exists(marker)
        open(marker, "a").close()
        self.assertFalse(first, "fails on its first run only")
'''


def retest(cluster, *commits) -> subprocess.CompletedProcess:
    return subprocess.run([PY, os.path.join(ROOT, "dispatcher.py"), "retest",
                           "--dispatcher-server", cluster.dispatcher_address, *commits],
                          capture_output=True, text=True, timeout=20)


def flaky_runner(cluster, tmp_path):
    folder = tmp_path / "flaky"
    folder.mkdir(exist_ok=True)
    return cluster.start_runner(env=dict(cluster.env, CI_FLAKY_DIR=str(folder)))


def verdict(cluster, commit) -> str:
    with open(cluster.result_path(commit), "rb") as handle:
        return results.parse_result(handle.read())[0]["verdict"]


def test_retest_replaces_the_verdict(cluster, upstream, tmp_path):
    cluster.start_dispatcher()
    flaky_runner(cluster, tmp_path)
    cluster.start_observer()
    commit = upstream.commit({"tests/test_flaky.py": FLAKY_TEST})
    assert cluster.result(commit)["verdict"] == "failed"
    proc = retest(cluster, commit)
    assert proc.returncode == 0 and "queued 1" in proc.stdout, proc.stderr
    wait_until(lambda: verdict(cluster, commit) == "passed", 20, what="the new verdict")
    assert commit in cluster.result_files()
    # A bad id is refused and changes nothing.
    proc = retest(cluster, "../etc")
    assert proc.returncode == 1 and "invalid commit id" in proc.stderr


def test_retest_request_survives_a_dispatcher_crash(cluster, upstream, tmp_path):
    dispatcher = cluster.start_dispatcher()
    runner = flaky_runner(cluster, tmp_path)
    cluster.start_observer()
    commit = upstream.commit({"tests/test_flaky.py": FLAKY_TEST})
    assert cluster.result(commit)["verdict"] == "failed"
    assert runner.stop() == 0
    assert "queued 1" in retest(cluster, commit).stdout
    dispatcher.kill()
    restarted = cluster.start_dispatcher()
    assert "recovered 1 commit(s)" in restarted.log()
    flaky_runner(cluster, tmp_path)
    wait_until(lambda: verdict(cluster, commit) == "passed", 20, what="the retest's verdict")


def test_retest_of_a_pending_commit_queues_nothing(cluster, upstream):
    cluster.start_dispatcher()  # no runner: dispatched commits stay queued
    commit = upstream.commit()
    reply = helpers.call(parse_address(cluster.dispatcher_address), "dispatch", commit)
    assert reply.argument == "queued 1"
    assert "queued 0" in retest(cluster, commit).stdout
