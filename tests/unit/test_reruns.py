"""Flaky tests caught by rerunning the failing ones, and quarantine: the
job pipeline on a real clone with real test processes (unittest through
the recorder, and pytest), then the pure pieces (ci/runner/reruns.py, the
verdict from records, the rerun command line)."""

from __future__ import annotations

import sys

import pytest

from ci import junit_xml
from ci import results, sharding
from ci.jobspec import JobSpec
from ci.results import TestRecord
from ci.runner import command_line, environments, junit_capture, recipe, reruns
from ci.runner.pipeline import JobPipeline, Settings, execute
from ci.runner.slot import ProcessSlot
from ci.runner.verdict import judge_records
from support import junit_schema

# Its tested pytest runs load no plugin of ours (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quiet_pytest")

PY = sys.executable


def flaky_unittest(counter) -> str:
    """A test that fails on odd runs (a counter file outside the clone),
    one that always fails, one that passes."""
    return f"""import unittest

class TestFlaky(unittest.TestCase):
    def test_sometimes(self):
        with open({str(counter)!r}, "a+") as f:
            f.seek(0)
            runs = len(f.read())
            f.write("x")
        self.assertEqual(runs % 2, 1, "fails every other run")

    def test_always(self):
        self.fail("broken for good")

    def test_fine(self):
        pass
"""


def flaky_pytest(counter) -> str:
    return f"""import pytest

def test_sometimes():
    with open({str(counter)!r}, "a+") as f:
        f.seek(0)
        runs = len(f.read())
        f.write("x")
    assert runs % 2 == 1, "fails every other run"

class TestGroup:
    @pytest.mark.parametrize("n", [1, 2])
    def test_param(self, n):
        pass

def test_always():
    assert False, "broken for good"
"""


def settings(clone: str, command=None) -> Settings:
    limits = recipe.Limits(test=tuple(command) if command else None, timeout=60)
    return Settings(clone, ProcessSlot(), environments.Preparer(limits), 1 << 20,
                    checkout_timeout=60)


def by_name(outcome) -> dict[str, TestRecord]:
    """The records the runner sends (what the dispatcher reads), by test
    name, checked against the XML beside them, which junit-10.xsd allows."""
    junit_schema.assert_valid(outcome.junit_xml)
    records = {r.name: r for r in outcome.records}
    from_xml = {r.name: (r.outcome, r.quarantined)
                for r in junit_xml.parse_junit(outcome.junit_xml)}
    assert from_xml == {name: (r.outcome, r.quarantined) for name, r in records.items()}
    return records


def recipe_text(**keys) -> str:
    return "[ci]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())


@pytest.mark.parametrize("runner", ["unittest", "pytest"])
def test_a_test_failing_every_other_run_is_flaky_and_one_failing_always_fails(
        upstream, tmp_path, runner):
    counter = tmp_path / "counter"
    clone = upstream.clone(tmp_path / "clone")
    if runner == "unittest":
        files = {"tests/test_flaky.py": flaky_unittest(counter)}
        test = None
    else:
        files = {"tests/test_flaky_p.py": flaky_pytest(counter)}
        test = f"{PY} -m pytest -q -p no:cacheprovider tests"
    keys = {"rerun_failures": 2, **({"test": test} if test else {})}
    failing = upstream.commit({**files, ".ci.ini": recipe_text(**keys)}, "flaky and broken")
    outcome = execute(settings(clone), failing)
    records = by_name(outcome)
    assert records["test_sometimes"].outcome == "flaky"
    assert "fails every other run" in records["test_sometimes"].message
    assert records["test_always"].outcome == "failed"
    assert outcome.verdict == "failed" and outcome.header["flaky"] == 1
    assert outcome.header["failures"] == 1
    # Only the failing tests ran again: twice the always-failing one, once the other.
    assert counter.read_text() == "xx"
    assert b"rerun of 2 failing tests: 1 passed (flaky), 1 failed again" in outcome.output
    assert b"rerun of 1 failing tests: 0 passed (flaky), 1 failed again" in outcome.output
    assert b"<flakyFailure" in outcome.junit_xml

    # Without the always-failing test the commit passes, its flaky test named.
    counter.unlink()
    source = files[next(iter(files))]
    cut = source.index("def test_always") if runner == "pytest" else \
        source.index("    def test_always")
    end = source.index("def test_fine") - 4 if runner == "unittest" else len(source)
    only_flaky = upstream.commit({next(iter(files)): source[:cut] + source[end:]},
                                 "only flaky")
    outcome = execute(settings(clone), only_flaky)
    assert outcome.verdict == "passed", outcome.output.decode()[-2000:]
    assert outcome.header["flaky"] == 1 and outcome.header["failures"] == 0
    assert outcome.header["exit_code"] != 0   # the first run failed; its records explain it
    assert by_name(outcome)["test_sometimes"].outcome == "flaky"


def test_without_reruns_a_flaky_test_fails_the_commit(upstream, tmp_path):
    counter = tmp_path / "counter"
    clone = upstream.clone(tmp_path / "clone")
    head = upstream.commit({"tests/test_flaky.py": flaky_unittest(counter)}, "no reruns")
    outcome = execute(settings(clone), head)
    assert outcome.verdict == "failed" and "flaky" not in outcome.header
    assert counter.read_text() == "x"


def test_quarantined_failures_do_not_decide_but_are_counted_and_named(upstream, tmp_path):
    clone = upstream.clone(tmp_path / "clone")
    head = upstream.commit({
        "tests/test_flaky.py": flaky_unittest(tmp_path / "counter"),
        ".ci.ini": recipe_text(quarantine="\n  test_flaky.TestFlaky.test_always\n"
                                          "  test_flaky.*.test_some*\n  no.such.test")},
        "quarantine both failing tests")
    outcome = execute(settings(clone), head)
    assert outcome.verdict == "passed", outcome.output.decode()[-2000:]
    header = outcome.header
    assert (header["failures"], header["quarantined"], header["quarantined_failed"]) == (0, 2, 2)
    assert sorted(results.named_failing(header["quarantined_failing"])) == [
        "test_flaky.TestFlaky.test_always", "test_flaky.TestFlaky.test_sometimes"]
    assert b"[ci] quarantine: 'no.such.test' matches no test" in outcome.output
    records = by_name(outcome)
    assert records["test_always"].quarantined and records["test_always"].outcome == "failed"
    assert not records["test_fine"].quarantined


def test_a_failed_command_without_records_explaining_it_is_not_passed(upstream, tmp_path):
    """Quarantine explains a failure only through a failing record: a test
    module that exits the process fails the commit as before."""
    clone = upstream.clone(tmp_path / "clone")
    head = upstream.commit({
        "tests/test_exit.py": "import unittest, os\n\nclass T(unittest.TestCase):\n"
                              "    def test_ok(self):\n        pass\n\n"
                              "    def test_zzz_exit(self):\n        os._exit(3)\n",
        ".ci.ini": recipe_text(rerun_failures=1, quarantine="test_exit.T.test_ok")},
        "the process dies")
    outcome = execute(settings(clone), head)
    assert outcome.verdict == "error" and outcome.header["exit_code"] == 3


def test_a_sharded_commit_reruns_within_its_shard(upstream, tmp_path):
    counter, other = tmp_path / "counter", tmp_path / "other"
    clone = upstream.clone(tmp_path / "clone")
    always_other = ("import unittest\n\nclass TestOther(unittest.TestCase):\n"
                    "    def test_other(self):\n"
                    f"        open({str(other)!r}, 'a').write('x')\n"
                    "        self.fail('other shard')\n")
    head = upstream.commit({"tests/test_flaky.py": flaky_unittest(counter),
                            "tests/test_other.py": always_other,
                            ".ci.ini": recipe_text(rerun_failures=1)}, "two modules")
    ran = {}
    for index in (1, 2):
        job = JobPipeline(settings(clone), head, JobSpec(sharding.ShardSpec(index, 2, {})))
        ran[index] = job.run()
    flaky_shard = next(i for i in ran if "test_sometimes" in by_name(ran[i]))
    other_shard = 3 - flaky_shard
    assert ran[flaky_shard].header["flaky"] == 1
    assert "test_other" not in by_name(ran[flaky_shard])
    assert "test_sometimes" not in by_name(ran[other_shard])
    assert other.read_text() == "xx"      # its own shard ran it twice
    assert counter.read_text() == "xx"    # the first run, then its one rerun
    merged = sharding.merge(2, ran)
    assert merged.header["flaky"] == 1 and merged.verdict == "failed"
    assert merged.header["failures"] == 2


# --------------------------------------------------------------------------
# The pure pieces.

def rec(name, outcome="failed", classname="m.C", **kw) -> TestRecord:
    return TestRecord(classname, name, outcome, **kw)


# The slow test's seconds: the named failing test must fail before it.
SLOW_SECONDS = 1.5
FIRST_FLAKY = """import os
import time

SLOW = {slow}

def _ran():
    # Each run of this test adds a line: the first folder on its PYTHONPATH.
    with open({counter!r}, "a+") as f:
        f.seek(0)
        runs = len(f.read().splitlines())
        first = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
        f.write(os.path.basename(first) + "\\n")
    return runs
"""
FIRST_FLAKY_UNITTEST = """
import unittest

class TestSlow(unittest.TestCase):
    def test_slow(self):
        time.sleep(SLOW)

class TestZ(unittest.TestCase):
    def test_sometimes(self):
        self.assertEqual(_ran() % 2, 1, "fails every other run")
"""
FIRST_FLAKY_PYTEST = """
def test_slow():
    time.sleep(SLOW)

def test_sometimes():
    assert _ran() % 2 == 1, "fails every other run"
"""


@pytest.mark.parametrize("runner", ["unittest", "pytest"])
def test_a_failing_first_run_with_reruns_is_ordered_then_rerun_with_its_environment(
        upstream, tmp_path, runner):
    """Both at once: the named test runs first (and fails at once), then
    only it is rerun, not reordered but with the run's PYTHONPATH (for
    pytest the ordering plugin's folder first); the verdict is flaky's."""
    counter = tmp_path / "counter"
    clone = upstream.clone(tmp_path / "clone")
    source = FIRST_FLAKY.format(counter=str(counter), slow=SLOW_SECONDS)
    if runner == "unittest":
        files = {"tests/test_first.py": source + FIRST_FLAKY_UNITTEST}
        keys, named = {}, "test_first.TestZ.test_sometimes"
    else:
        files = {"tests/test_first.py": source + FIRST_FLAKY_PYTEST}
        keys = {"test": f"{PY} -m pytest -q -p no:cacheprovider tests"}
        named = "tests.test_first.test_sometimes"
    head = upstream.commit({**files, "tests/test_sample.py": None,
                            ".ci.ini": recipe_text(rerun_failures=1, **keys)},
                           "flaky, named first")
    outcome = execute(settings(clone), head, JobSpec(failing_first=(named,)))
    records = by_name(outcome)
    assert [r.name for r in outcome.records] == ["test_sometimes", "test_slow"]
    assert records["test_sometimes"].outcome == "flaky"
    assert records["test_slow"].outcome == "passed"
    assert outcome.verdict == "passed", outcome.output.decode()[-2000:]
    assert outcome.header["flaky"] == 1 and outcome.header["failures"] == 0
    assert outcome.header["failing_first"] == "1 of 1 run first"
    # The first run's first failure, before the slow test: not the rerun's.
    # (Measured from the command's start: the interpreter's start-up on a
    # busy machine counts too, so the slow test is slow enough to tell.)
    assert float(outcome.header["first_failure_after"]) < SLOW_SECONDS
    assert b"rerun of 1 failing tests: 1 passed (flaky)" in outcome.output
    runs = counter.read_text().splitlines()
    assert len(runs) == 2 and runs[0] == runs[1]
    if runner == "pytest":
        assert runs[0] == "ci_support"


def test_only_tests_that_can_be_named_are_rerun_and_a_subtest_reruns_its_test():
    records = [rec("a"), rec("a", kind="subtest", subtest="(i=1)"), rec("b", "passed"),
               rec("setUpClass", kind="fixture"), rec("x", classname="unittest.loader._FailedTest"),
               rec("q", quarantined=True)]
    assert reruns.failing_keys(records) == [("m.C", "a")]
    plan = reruns.Reruns.start(records, 1)
    plan.took([rec("a", "passed", duration=0.5)])
    flaky = [r for r in plan.records if r.name == "a"]
    assert len(flaky) == 1 and flaky[0].outcome == "flaky" and flaky[0].kind == ""
    assert flaky[0].duration == 0.5 and not plan.wanted


def test_too_many_failures_are_not_rerun():
    records = [rec(f"t{i}") for i in range(reruns.MAX_RERUN_TESTS + 1)]
    plan = reruns.Reruns.start(records, 3)
    assert not plan.wanted and "none is run again" in plan.notes[0]


def test_the_verdict_comes_from_the_records_not_the_exit_status():
    assert judge_records(0, False, b"", [rec("a")]) == ("failed", "")
    assert judge_records(1, False, b"", [rec("a", "flaky")]) == ("passed", "")
    assert judge_records(1, False, b"", [rec("a", quarantined=True)]) == ("passed", "")
    verdict, reason = judge_records(1, False, b"", [rec("a", "passed")])
    assert verdict == "error" and "without reporting failing tests" in reason
    assert judge_records(0, True, b"", [])[0] == "timeout"


def test_header_counts_leave_quarantined_failures_to_their_own_fields():
    records = [rec("a", quarantined=True), rec("b", "error", quarantined=True),
               rec("c", "flaky"), rec("d", "passed", quarantined=True), rec("e")]
    fields = results.record_fields(records)
    assert (fields["failures"], fields["errors"], fields["flaky"]) == (1, 0, 1)
    assert (fields["quarantined"], fields["quarantined_failed"]) == (3, 2)
    assert results.named_failing(fields["quarantined_failing"]) == ["m.C.a", "m.C.b"]
    # The XML keeps every failure element, stays within junit-10.xsd (a
    # flakyFailure child, the quarantine as suite properties) and reads
    # back the same; so do the records in our own format.
    xml = junit_xml.format_junit(records)
    junit_schema.assert_valid(xml)
    assert b"<flakyFailure" in xml and b'name="ci.quarantined"' in xml
    back = junit_xml.parse_junit(xml)
    assert [(r.outcome, r.quarantined) for r in back] == [
        (r.outcome, r.quarantined) for r in records]
    assert results.parse_records(results.format_records(records)) == records
    # A record of before the quarantined field is not quarantined.
    assert results.parse_records(b'["m.C","a","failed",0]\n')[0].quarantined is False


def test_many_quarantined_failures_are_named_within_the_cap():
    records = [rec("t" * 400 + str(i), quarantined=True) for i in range(50)]
    names = results.named_failing(results.quarantined_failing(records))
    assert names[-1].startswith("+") and len(names) < 21
    assert len(results.quarantined_failing(records)) <= results.MAX_NAMED_CHARS


@pytest.mark.parametrize("value", ["[" * 1500, '["a", 1]', '{"a": 1}', "x" * 5000, None])
def test_a_damaged_or_hostile_quarantined_failing_value_names_nothing(value):
    """Read from a result file's header (a runner's); 1,500 brackets made
    json raise RecursionError, which nothing caught."""
    assert results.named_failing(value) is None


def test_rerun_command_lines(tmp_path):
    (tmp_path / "tests" / "sub").mkdir(parents=True)
    (tmp_path / "tests" / "sub" / "test_x.py").write_text("")
    with junit_capture.Capture(str(tmp_path)) as capture:
        line = command_line.CommandLine(["x"], ran=[PY, "-m", "pytest", "-q", "-k", "fast",
                                                    "tests", "-p", "no:cacheprovider"])
        argv = command_line.rerun(str(tmp_path), line, [("tests.sub.test_x.TestA", "t[1.5]"),
                                                        ("nowhere", "t")], capture)
        assert argv[:3] == [PY, "-m", "pytest"] and argv[3].startswith("--junitxml=")
        assert argv[4:] == ["-q", "-k", "fast", "-p", "no:cacheprovider",
                            "tests/sub/test_x.py::TestA::t[1.5]"]
        default = command_line.default_test_command(str(tmp_path), PY)
        argv = command_line.rerun(str(tmp_path), command_line.CommandLine(["x"], ran=default),
                                  [("test_x.T", "test_a")], capture)
        assert argv[1] == junit_capture.RECORDER
        assert argv[3:] == ["--path-first", "tests", "test_x.T.test_a"]
        other = command_line.CommandLine(["x"], ran=["make", "check"])
        assert command_line.rerun(str(tmp_path), other, [("a", "b")], capture) is None


def test_recipe_keys_are_checked_and_capped():
    limits = recipe.Limits(rerun_failures=1, max_rerun_failures=2)
    assert recipe.resolve(None, limits).rerun_failures == 1
    plan = recipe.resolve(recipe_text(rerun_failures=5, quarantine="a.b  c.*"), limits)
    assert plan.rerun_failures == 2 and "capped at 2" in plan.notes[0]
    assert plan.quarantine == ("a.b", "c.*")
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(recipe.RecipeError, match="whole number"):
            recipe.resolve(recipe_text(rerun_failures=bad), limits)
    with pytest.raises(recipe.RecipeError, match="not a test id"):
        recipe.resolve(recipe_text(quarantine="x" * 600), limits)
    matcher = recipe.QuarantineMatcher(("t.test_a[1]", "u.*"))
    assert matcher.matches(("t.test_a[1]",)) == ["t.test_a[1]"]
    assert matcher.matches(("t.test_a1",)) == [] and matcher.matches(("u.x",)) == ["u.*"]


def test_the_dispatcher_checks_the_flaky_counts_and_takes_them_from_the_records():
    from ci.outcome import Outcome
    from ci.wire import ProtocolError, encode_fields

    def body(fields, xml=b""):
        head = {"verdict": "passed", **fields}
        if xml:
            head["junit_bytes"] = len(xml)
        return encode_fields(head) + b"\n" + xml + b"out"

    with pytest.raises(ProtocolError, match="flaky must be a whole number"):
        Outcome.from_body(body({"flaky": "-1"}))
    plain = Outcome.from_body(body({"flaky": "2", "quarantined_failing": "not json"}))
    assert plain.header["flaky"] == 2 and "quarantined_failing" not in plain.header
    xml = junit_xml.format_junit([rec("a", "flaky"), rec("b", quarantined=True)])
    forged = Outcome.from_body(body({"flaky": "9", "quarantined": "0"}, xml))
    assert (forged.header["flaky"], forged.header["quarantined_failed"]) == (1, 1)
    assert forged.header["failures"] == 0
    # From a runner of now, the records part decides, not the XML beside it.
    records = results.format_records([rec("a", "flaky"), rec("b", quarantined=True),
                                      rec("c", quarantined=True)])
    head = encode_fields({"verdict": "passed", "quarantined": "0", "junit_bytes": len(xml),
                          "records_bytes": len(records)})
    sent = Outcome.from_body(head + b"\n" + xml + records + b"out")
    assert (sent.header["flaky"], sent.header["quarantined_failed"]) == (1, 2)
    assert sent.header["failures"] == 0 and sent.output == b"out"


def test_a_quarantine_mark_in_the_tested_commits_own_files_is_taken_off(tmp_path):
    """Only the recipe quarantines: the recorder's records file and a
    JUnit file come from the tested commit, whose failing test must not
    excuse itself by claiming the mark."""
    forged = [rec("a", quarantined=True), rec("b", "passed", quarantined=True)]
    with junit_capture.Capture(str(tmp_path)) as capture:
        path = capture.report_file()
        with open(path, "wb") as handle:
            handle.write(junit_xml.format_junit(forged))
        with open(path + junit_capture.RECORDS_SUFFIX, "wb") as handle:
            handle.write(results.format_records(forged))
        collected = capture.collect(False, 1 << 20)
    assert [(r.outcome, r.quarantined) for r in collected.records] == [
        ("failed", False), ("passed", False)]
    assert results.record_fields(collected.records)["failures"] == 1
    (tmp_path / "report.xml").write_bytes(junit_xml.format_junit(forged))
    with junit_capture.Capture(str(tmp_path), "report.xml") as capture:
        assert not any(r.quarantined for r in capture.collect(False, 1 << 20).records)


SUREFIRE_RETRIED = (
    "import sys\n"
    "with open('report.xml', 'w') as handle:\n"
    "    handle.write('<testsuite name=\"s\" tests=\"1\"><testcase classname=\"pkg.T\" '\n"
    "                 'name=\"retried\"><flakyFailure message=\"first try\" '\n"
    "                 'type=\"AssertionError\">trace</flakyFailure></testcase></testsuite>')\n"
    "print('lint: 3 problems')\n"
    "sys.exit(1)\n")


def test_a_flaky_outcome_in_the_commands_own_junit_file_explains_no_failure(upstream,
                                                                            tmp_path):
    """Only the runner's reruns make a test flaky: a retried test in the
    command's own XML (Surefire's flakyFailure) is a pass, so the exit
    status 1 of a failing step beside it (lint, say) fails the commit; it
    was taken as the flaky failure that explains the status, and passed."""
    clone = upstream.clone(tmp_path / "clone")
    head = upstream.commit({"check.py": SUREFIRE_RETRIED}, "lint fails, a test was retried")
    ready = settings(clone, [PY, "check.py"])
    ready.junit_pattern = "report.xml"
    outcome = execute(ready, head)
    assert outcome.verdict == "error", outcome.header
    assert [(r.name, r.outcome) for r in outcome.records] == [("retried", "passed")]
    assert outcome.header["reason"] == "test command exited 1 without reporting failing tests"
    assert "flaky" not in outcome.header


def test_quarantined_tests_are_not_rerun(upstream, tmp_path):
    """A quarantined test decides nothing, so running it again would only
    lengthen the run: only the other failing tests are rerun."""
    counter = tmp_path / "counter"
    clone = upstream.clone(tmp_path / "clone")
    head = upstream.commit({
        "tests/test_flaky.py": flaky_unittest(counter),
        ".ci.ini": recipe_text(rerun_failures=2,
                               quarantine="test_flaky.TestFlaky.test_sometimes")},
        "quarantine the flaky test, rerun the rest")
    outcome = execute(settings(clone), head)
    assert counter.read_text() == "x"     # ran once: never rerun
    records = by_name(outcome)
    assert records["test_sometimes"].outcome == "failed" and records["test_sometimes"].quarantined
    assert b"rerun of 1 failing tests: 0 passed (flaky), 1 failed again" in outcome.output
    assert outcome.verdict == "failed" and "flaky" not in outcome.header
    assert outcome.header["quarantined_failed"] == 1
