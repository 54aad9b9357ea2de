"""The shortest path through the whole system: one commit, one verdict."""

import os
import subprocess

from support.cluster import FAILING_TEST, PY, ROOT


def test_passing_then_failing_commit(cluster, upstream):
    cluster.start_dispatcher()
    cluster.start_runner()
    cluster.start_observer()
    initial = upstream.commit({"README": "x\n"})
    assert cluster.result(initial)["verdict"] == "passed"
    broken = upstream.commit({"tests/test_broken.py": FAILING_TEST})
    fields = cluster.result(broken)
    assert fields["verdict"] == "failed"
    assert (fields["tests"], fields["failures"], fields["errors"]) == ("2", "1", "0")


def test_status_command_shows_the_counts(cluster, upstream):
    cluster.start_dispatcher()
    cluster.start_runner()
    cluster.start_observer()
    cluster.result(upstream.commit({"README": "x\n"}))
    proc = subprocess.run([PY, os.path.join(ROOT, "dispatcher.py"), "status",
                           "--dispatcher-server", cluster.dispatcher_address],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    fields = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert fields["runners"] == "1" and fields["queued"] == "0"
    assert int(fields["done"]) >= 1
