"""The shortest path through the whole system: one commit, one verdict."""

from conftest import FAILING_TEST


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
