"""Failing tests first on the runner (ci/runner/ordering.py, ci_support/
ci_order.py): a pytest and a unittest suite run on a real clone, the
tests the job names run first and the counts equal a run in file order;
``first_failure_after`` is recorded; a command that cannot be reordered
runs as it is and says so; the reorder itself keeps every test once and
fixtures' groups together; the ids travel in the ``runtest`` body and
pin their files to shard 1."""

from __future__ import annotations

import sys

import pytest

from ci import junit_xml
from ci import jobspec, sharding
from ci.runner import environments, recipe
from ci.runner.pipeline import Settings, execute
from ci.runner.slot import ProcessSlot

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[2] / "ci_support"))
import ci_order  # noqa: E402

# Its tested pytest runs load no plugin of ours (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quiet_pytest")

PY = sys.executable

UNITTEST_A = """import time
import unittest

class A(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        print("setUpClass A")

    def test_one(self):
        time.sleep(0.6)

    def test_two(self):
        pass
"""
UNITTEST_Z = """import time
import unittest

def setUpModule():
    print("setUpModule Z")

class Z(unittest.TestCase):
    def test_early(self):
        pass

    def test_broken(self):
        self.fail("broken")

    def test_skipped(self):
        self.skipTest("not today")
"""
PYTEST_A = """import time

def test_one():
    time.sleep(0.6)

def test_two():
    pass
"""
PYTEST_Z = """import time
import pytest

@pytest.fixture(scope="module")
def once():
    print("module fixture Z")

def test_early(once):
    pass

@pytest.mark.parametrize("n", [1, 2])
def test_broken(once, n):
    assert n == 1

def test_skipped():
    pytest.skip("not today")
"""


def settings(clone: str, command=None) -> Settings:
    limits = recipe.Limits(test=tuple(command) if command else None, timeout=60)
    return Settings(clone, ProcessSlot(), environments.Preparer(limits, read_recipe=False),
                    1 << 20, checkout_timeout=60)


def run_order(outcome) -> list[str]:
    return [record.id for record in junit_xml.parse_junit(outcome.junit_xml)]


def counts(outcome) -> tuple:
    return tuple(outcome.header[k] for k in ("verdict", "tests", "failures", "errors",
                                              "skipped"))


@pytest.mark.parametrize("kind", ["unittest", "pytest"])
def test_the_failing_test_runs_first_and_the_counts_are_unchanged(kind, upstream, tmp_path):
    if kind == "unittest":
        files = {"tests/test_a.py": UNITTEST_A, "tests/test_z.py": UNITTEST_Z}
        command, broken = None, "test_z.Z.test_broken"
    else:
        pytest.importorskip("pytest")
        files = {"tests/test_a.py": PYTEST_A, "tests/test_z.py": PYTEST_Z}
        command, broken = [PY, "-m", "pytest", "-q", "tests"], "tests.test_z.test_broken[2]"
    commit = upstream.commit({**files, "tests/test_sample.py": None}, "a suite")
    clone = upstream.clone(tmp_path / "clone")
    plain = execute(settings(clone, command), commit)
    first = execute(settings(clone, command), commit,
                    jobspec.JobSpec(failing_first=(broken, "gone.test")))
    assert counts(first) == counts(plain) and counts(plain)[0] == "failed"
    assert sorted(run_order(first)) == sorted(run_order(plain))
    assert run_order(plain)[0] != broken and run_order(first)[0] == broken
    # Its module's fixtures ran once, in both runs.
    for outcome in (plain, first):
        assert outcome.output.count(b"setUpModule Z" if kind == "unittest"
                                    else b"module fixture Z") <= 1
    assert first.header["failing_first"] == "1 of 2 run first"
    assert "failing_first" not in plain.header
    # The failure came before the slow module ran, in the reordered run only.
    assert float(first.header["first_failure_after"]) < \
        float(plain.header["first_failure_after"])


def test_a_command_that_cannot_be_reordered_runs_as_today_and_says_so(upstream, tmp_path):
    commit = upstream.commit({"tests/test_z.py": UNITTEST_Z}, "a suite")
    clone = upstream.clone(tmp_path / "clone")
    command = ["sh", "-c", f"{PY} -m unittest discover -s tests"]
    outcome = execute(settings(clone, command), commit,
                      jobspec.JobSpec(failing_first=("test_z.Z.test_broken",)))
    assert outcome.verdict == "failed" and outcome.header["tests"] == 4
    assert outcome.header["failing_first"].startswith("not reordered (the test command is")
    assert "first_failure_after" not in outcome.header


def test_reorder_moves_whole_groups_and_keeps_every_item_once():
    items = [("m1", "m1.A", "m1.A.t1"), ("m1", "m1.A", "m1.A.t2"), ("m1", "m1.B", "m1.B.t3"),
             ("m2", "m2.C", "m2.C.t4"), ("m2", "m2.D", "m2.D.t5"), ("m3", "m3.E", "m3.E.t6")]
    ordered, found = ci_order.reorder(items, lambda i: i, ["m2.D.t5 (i=1)", "m1.A.t2", "x"])
    assert found == 2 and sorted(ordered) == sorted(items)
    assert [i[2] for i in ordered] == ["m2.D.t5", "m2.C.t4", "m1.A.t2", "m1.A.t1",
                                       "m1.B.t3", "m3.E.t6"]
    assert ci_order.reorder(items, lambda i: i, ["nothing"]) == (items, 0)
    assert ci_order.junit_id_of("tests/sub/test_x.py::TestK::test_y[a::b]") == \
        "tests.sub.test_x.TestK.test_y[a::b]"


def test_the_ids_travel_in_the_runtest_body_and_pin_their_files_to_shard_1(tmp_path):
    ids = ("tests.test_b.B.test_x", "tests.test_c.test_y[a b]")
    shard = sharding.parse_shard("2/3", b"1.000 tests.test_a\n", ids)
    body = jobspec.encode(jobspec.JobSpec(shard, "main", True, failing_first=ids))
    spec = jobspec.parse(body)
    assert spec.failing_first == ids and spec.shard.first == ids
    assert spec.shard.durations == {"tests.test_a": 1.0}
    spec = jobspec.JobSpec(branch="main", failing_first=ids)
    assert jobspec.parse(jobspec.encode(spec)).failing_first == ids
    with pytest.raises(ValueError, match="failing_first says 3"):
        jobspec.parse(b"branch: main\ntrusted: no\nfailing_first: 3\n\na\nb\n")
    files = [(f"tests/test_{n}.py", f"tests.test_{n}") for n in "abcdef"]
    for name, _ in files:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x = 1\n" * 10)
    shares = [sharding.my_share(str(tmp_path), files, sharding.ShardSpec(i, 3, {}, ids))
              for i in (1, 2, 3)]
    assert {"tests/test_b.py", "tests/test_c.py"} <= set(shares[0])
    assert sorted(p for share in shares for p in share) == [p for p, _ in files]




def test_a_unittest_run_with_an_order_does_not_import_pytest(upstream, tmp_path):
    """The ordering plugin is loaded by the unittest recorder too: it must
    not import pytest there (60 ms on every run, and a project's tests
    would find it imported)."""
    probe = ("import sys, unittest\n"
             "class P(unittest.TestCase):\n"
             "    def test_no_pytest(self):\n"
             "        self.assertNotIn('pytest', sys.modules)\n")
    commit = upstream.commit({"tests/test_probe.py": probe, "tests/test_sample.py": None},
                             "probe")
    clone = upstream.clone(tmp_path / "clone")
    outcome = execute(settings(clone, None), commit,
                      jobspec.JobSpec(failing_first=("test_probe.P.test_x",)))
    assert outcome.header["verdict"] == "passed", outcome.output[-2000:]
    assert "failing_first" in outcome.header
