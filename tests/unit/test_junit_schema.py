"""The schema checker (tests/support/junit_schema.py) itself: it accepts what
junit-10.xsd accepts and names each rule a document breaks; and every JUnit
document the project writes by itself passes it."""

from __future__ import annotations

import pytest

from ci import junit_xml
from ci import results
from ci.results import TestRecord
from support.junit_schema import assert_valid, problems

GOOD = b"""<?xml version='1.0' encoding='utf-8'?>
<testsuites name="all" tests="3" failures="1" errors="0" time="1.250">
  <testsuite name="s" tests="3" failures="1" errors="0" skipped="1" time="1.25"
             timestamp="2024-01-01T00:00:00" hostname="h">
    <properties><property name="k" value="v"/></properties>
    <testcase classname="m.C" name="test_a" time="0.5"/>
    <testcase classname="m.C" name="test_b" time="0.001234">
      <failure message="boom" type="AssertionError">Traceback</failure>
      <system-out>out</system-out><system-err>err</system-err>
    </testcase>
    <testcase classname="m.C" name="test_c">
      <flakyFailure message="once" type="AssertionError"><stackTrace>t</stackTrace>
        <system-out>o</system-out></flakyFailure>
      <skipped message="later"/>
    </testcase>
    <testsuite name="nested" tests="0" failures="0" errors="0"/>
    <system-out>suite output</system-out>
  </testsuite>
</testsuites>
"""


def test_a_document_within_every_rule_passes():
    assert problems(GOOD) == []
    assert problems(b'<testsuite name="x" tests="0" failures="0" errors="0"/>') == []


@pytest.mark.parametrize("old, new, why", [
    (b'<testsuites name="all"', b'<testsuites skipped="1" name="all"', "'skipped' is not"),
    (b'name="test_a"', b'name="test_a" outcome="xfail"', "'outcome' is not"),
    (b'name="test_a"', b'name="test_a" kind="subtest"', "'kind' is not"),
    (b'name="test_a"', b'name="test_a" subtest="(i=1)"', "'subtest' is not"),
    (b'classname="m.C" name="test_a"', b'classname="m.C"', "'name' is missing"),
    (b'tests="3" failures="1" errors="0" skipped', b'tests="3" failures="1" skipped',
     "'errors' is missing"),
    (b'type="AssertionError"><stackTrace>', b'><stackTrace>', "'type' is missing"),
    (b'<system-out>o</system-out></flakyFailure>',
     b'<system-out>o</system-out><stackTrace>t</stackTrace></flakyFailure>', "in the order"),
    (b'time="1.25"', b'time="1.2345"', "time format"),
    (b'<properties>', b'<properties>loose text', "text is not allowed"),
    (b'<property name="k" value="v"/>', b'<property name="k" value="v"/><k/>',
     "<k> may not be inside <properties>"),
    (b'<system-out>suite output', b'<testcase name="x"><properties/></testcase>'
     b'<system-out>suite output', "<properties> may not be inside <testcase>"),
    (b'<testsuites name="all" tests="3" failures="1" errors="0" time="1.250">',
     b'<testsuites><testcase name="t"/>', "<testcase> may not be inside <testsuites>"),
])
def test_each_broken_rule_is_named(old, new, why):
    assert GOOD.count(old) == 1
    found = problems(GOOD.replace(old, new))
    assert any(why in line for line in found), found


def test_a_root_of_another_kind_and_garbage_are_refused():
    assert "root <testcase>" in problems(b'<testcase name="t"/>')[0]
    assert problems(b"<testsuite")[0].startswith("not well-formed")
    with pytest.raises(AssertionError, match="junit-10.xsd"):
        assert_valid(b'<testsuite name="x"/>')


EVERY_OUTCOME = [
    TestRecord("m.C", "test_pass", duration=0.25),
    TestRecord("m.C", "test_fail", results.FAILED, 0.5, "AssertionError: no", "Traceback"),
    TestRecord("m.C", "test_error", results.ERROR, 0.0, "KeyError", "Traceback"),
    TestRecord("m.C", "test_skip", results.SKIPPED, message="not today"),
    TestRecord("m.C", "test_xfail", results.XFAIL, message="known", traceback="tb"),
    TestRecord("m.C", "test_xpass", results.XPASS, message="unexpected success"),
    TestRecord("m.C", "test_sub", results.FAILED, message="i=2", kind=results.SUBTEST,
               subtest="(i=2)"),
    TestRecord("", "setUpClass (m.D)", results.ERROR, message="no class",
               kind=results.FIXTURE),
]


def test_format_junit_writes_documents_within_the_schema():
    assert_valid(junit_xml.format_junit(EVERY_OUTCOME, name="a" * 40))
    assert_valid(junit_xml.format_junit([]))
