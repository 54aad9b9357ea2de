"""Per-test results through the real daemons: the runner records each test,
the records travel with ``results``, and the dispatcher writes
``test_results/<commit>.xml`` whose counts are the text header's, which are
a hand run's."""

from __future__ import annotations

import os
import shlex
import subprocess
import xml.etree.ElementTree as ET

from ci.runner.verdict import parse_counts
from support.cluster import PY, git
from support.junit_projects import PYTEST_TESTS, SHADOW_TEST, SHADOWS, TRICKY_UNITTESTS
from support.junit_schema import assert_valid

COUNTS = ("tests", "failures", "errors", "skipped")


def header_counts(fields: dict) -> dict[str, int]:
    return {k: int(fields[k]) for k in COUNTS}


def xml_of(cluster, commit: str) -> ET.Element:
    """The commit's JUnit file, read by a plain XML parser as a CI tool
    would, once checked against junit-10.xsd's rules."""
    path = os.path.join(cluster.results, commit + ".xml")
    assert os.path.exists(path), os.listdir(cluster.results)
    with open(path, "rb") as handle:
        assert_valid(handle.read())
    return ET.parse(path).getroot()


def suite_counts(root: ET.Element) -> dict[str, int]:
    suite = root.find("testsuite")
    # junit-10.xsd allows no skipped count on testsuites.
    assert {k: root.get(k) for k in COUNTS[:3]} == {k: suite.get(k) for k in COUNTS[:3]}
    return {k: int(suite.get(k)) for k in COUNTS}


# Our own environment's pytest plugins (hypothesis) only slow the tested
# project's pytest down; the tested project's runs load none.
QUIET_PYTEST = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


def hand_run(upstream, commit: str, dest, command: list[str]) -> tuple[int, bytes]:
    """The suite run in a fresh checkout, as a developer would."""
    subprocess.run(["git", "clone", "-q", upstream.path, str(dest)], check=True,
                   capture_output=True, timeout=60)
    git(dest, "checkout", "-q", "--detach", commit)
    proc = subprocess.run(command, cwd=dest, capture_output=True, timeout=120,
                          env=dict(os.environ, **QUIET_PYTEST))
    return proc.returncode, proc.stdout + proc.stderr


def test_unittest_project_with_its_own_helpers_gets_per_test_records(cluster, upstream,
                                                                      tmp_path):
    cluster.start_dispatcher()
    cluster.start_runner()
    cluster.start_observer()
    commit = upstream.commit({"tests/test_mix.py": TRICKY_UNITTESTS,
                              "tests/test_shadow.py": SHADOW_TEST,
                              **{f"{n}.py": t for n, t in SHADOWS.items()}})
    fields = cluster.result(commit)
    root = xml_of(cluster, commit)  # written before the text file
    code, output = hand_run(upstream, commit, tmp_path / "by-hand",
                            [PY, "-m", "unittest", "discover", "-s", "tests"])
    by_hand = parse_counts(output)
    assert code == 1 and fields["verdict"] == "failed" and fields["exit_code"] == "1"
    assert header_counts(fields) == suite_counts(root) == {
        "tests": by_hand.tests, "failures": by_hand.failures, "errors": by_hand.errors,
        "skipped": by_hand.skipped} == {"tests": 10, "failures": 5, "errors": 3,
                                         "skipped": 1}
    assert "junit" not in fields
    cases = {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}
    # The project's own helpers.py (and modules named like ours) were imported.
    assert len(cases[("test_shadow.TestOwnModules", "test_project_modules_come_first")]) == 0
    assert len(cases[("test_sample.TestSample", "test_ok")]) == 0
    failure = cases[("test_mix.TestMix", "test_fail")].find("failure")
    assert failure.get("message").startswith("AssertionError: 'left' != 'right'")
    assert "Traceback" in failure.text
    assert cases[("test_mix.TestMix", "test_skip")].find("skipped").get("message") == \
        "not today"
    assert cases[("test_mix.TestMix", "test_subtests (i=3)")].find("failure") is not None
    # The output is unittest's own, as before.
    assert b"Ran 10 tests in " in fields["output"]
    assert b"FAILED (failures=4, errors=3, skipped=1, expected failures=1, " \
           b"unexpected successes=1)" in fields["output"]
    assert b"<testsuite" not in fields["output"]


def test_pytest_command_records_every_test(cluster, upstream, tmp_path):
    command = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]
    cluster.start_dispatcher()
    cluster.start_runner("--test-command", shlex.join(command),
                         env=dict(cluster.env, **QUIET_PYTEST))
    cluster.start_observer()
    commit = upstream.commit({"tests/test_p.py": PYTEST_TESTS,
                              "helpers.py": SHADOWS["helpers"]})
    fields = cluster.result(commit)
    root = xml_of(cluster, commit)
    code, output = hand_run(upstream, commit, tmp_path / "by-hand", command)
    by_hand = parse_counts(output)
    assert code == 1 and fields["verdict"] == "failed"
    assert header_counts(fields) == suite_counts(root) == {
        "tests": by_hand.tests, "failures": by_hand.failures, "errors": by_hand.errors,
        "skipped": by_hand.skipped} == {"tests": 10, "failures": 2, "errors": 1,
                                         "skipped": 1}
    names = sorted(c.get("name") for c in root.iter("testcase"))
    assert names == sorted(["test_ok", "test_a", "test_wrong", "test_later", "test_known",
                            "test_lucky", "test_uses_broken", "test_param[1]",
                            "test_param[2]", "test_param[3]"])
    assert b"2 failed" in fields["output"] and b"<testsuite" not in fields["output"]


REPORT_TOOL = '''import sys
import xml.etree.ElementTree as ET

# A tool of its own: no unittest or pytest summary, a JUnit file instead.
MODE = {mode!r}
if MODE == "garbage":
    open("reports/junit.xml", "wb").write(b"<testsuite><testcase name=")
else:
    suite = ET.Element("testsuite")
    for index in range(3):
        case = ET.SubElement(suite, "testcase", classname="tool", name=f"check_{{index}}")
        if index == 2:
            ET.SubElement(case, "failure", message="check 2 is off").text = "details"
    ET.ElementTree(suite).write("reports/junit.xml")
print("tool done")
sys.exit(1)
'''


def test_custom_command_with_junit_xml_pattern(cluster, upstream):
    cluster.start_dispatcher()
    cluster.start_runner("--test-command", f"{PY} tools/report.py",
                         "--junit-xml", "reports/*.xml")
    cluster.start_observer()
    good = upstream.commit({"tools/report.py": REPORT_TOOL.format(mode="good"),
                            "reports/.keep": ""})
    fields = cluster.result(good)
    # No summary in the output: the records alone give the counts and verdict.
    assert fields["verdict"] == "failed" and "reason" not in fields
    assert header_counts(fields) == suite_counts(xml_of(cluster, good)) == {
        "tests": 3, "failures": 1, "errors": 0, "skipped": 0}
    bad = upstream.commit({"tools/report.py": REPORT_TOOL.format(mode="garbage")})
    fields = cluster.result(bad)
    assert fields["junit"] == "unreadable"
    assert fields["verdict"] == "error" and header_counts(fields)["tests"] == 0
    assert not os.path.exists(os.path.join(cluster.results, bad + ".xml"))
    # Anything that lists results sees the text files only.
    listed = cluster.result_files()
    assert good in listed and bad in listed and not any(n.endswith(".xml") for n in listed)
