"""Per-test records as pure functions and small real runs: the JUnit
writer and the untrusted-input parser, the ``results`` body that carries
them, the unittest recorder and the pytest capture (real subprocesses,
no daemons), and the recorder never shadowing a project's own modules."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings, strategies as st

from ci import junit_xml
from ci.dashboard import index
from ci.dispatch import server
from ci.runner import daemon
from ci import wire as server_limits
from ci.runner import command_line, junit_capture
from ci import outcome, results
from ci.outcome import Outcome
from support.junit_projects import PYTEST_TESTS, SHADOW_TEST, SHADOWS, TRICKY_UNITTESTS
from ci.runner.command_line import default_test_command
from ci.runner.slot import child_env
from ci.runner.verdict import judge, parse_counts
from support.cluster import PY
from support.junit_schema import assert_valid
from ci.results import TestRecord
from ci.wire import Message, ProtocolError, Reply

ALL_KINDS = [
    TestRecord("pkg.test_a.TestA", "test_ok", "passed", 0.5),
    TestRecord("pkg.test_a.TestA", "test_bad", "failed", 0.25, "AssertionError: 1 != 2",
               "Traceback (most recent call last):\n  ...\nAssertionError: 1 != 2\n"),
    TestRecord("pkg.test_a.TestA", "test_boom", "error", 0.001, "RuntimeError: boom",
               "Traceback\nRuntimeError: boom\n"),
    TestRecord("pkg.test_a.TestA", "test_later", "skipped", 0.0, "not today"),
    TestRecord("pkg.test_a.TestA", "test_known", "xfail", 0.002, "AssertionError: known",
               "Traceback\nAssertionError: known\n"),
    TestRecord("pkg.test_a.TestA", "test_lucky", "xpass", 0.003, "unexpected success"),
    TestRecord("pkg.test_a.TestA", "test_parts", "failed", 0.01, "AssertionError: 2",
               "tb", kind="subtest", subtest="(i=2)"),
    TestRecord("pkg.test_a.TestA", "test_parts", "error", 0.01, "KeyError: 3",
               "tb", kind="subtest", subtest="(i=3)"),
    TestRecord("", "setUpClass (pkg.test_a.TestB)", "error", 0.0, "RuntimeError: setup",
               "tb", kind="fixture"),
]


def suite_counts(xml: bytes) -> dict[str, int]:
    root = ET.fromstring(xml)
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}


# --------------------------------------------------------------------------
# Writer and parser.

def flattened(record: TestRecord) -> TestRecord:
    """A record as JUnit XML alone keeps it: a subtest's description in
    its name, no kind (junit-10.xsd has no attribute for it)."""
    return dataclasses.replace(record, name=record.id[len(record.classname) + 1:]
                               if record.classname else record.id, kind="", subtest="")


def test_round_trip_keeps_every_outcome_and_kind():
    # Our own records format keeps everything; the XML every outcome and id.
    assert results.parse_records(results.format_records(ALL_KINDS)) == ALL_KINDS
    xml = junit_xml.format_junit(ALL_KINDS)
    assert_valid(xml)
    assert junit_xml.parse_junit(xml) == [flattened(r) for r in ALL_KINDS]
    assert [r.id for r in junit_xml.parse_junit(xml)] == [r.id for r in ALL_KINDS]
    # As unittest counts them: the subtests' test once, the fixture not at
    # all, an unexpected success as a failure, an expected failure as none.
    assert results.count_records(ALL_KINDS) == {"tests": 7, "failures": 3, "errors": 3,
                                                "skipped": 1}


def test_xml_is_what_jenkins_and_gitlab_read_and_its_counts_are_the_text_headers():
    xml = junit_xml.format_junit(ALL_KINDS, name="abc")
    root = ET.fromstring(xml)
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    assert float(suite.get("time")) == pytest.approx(0.776)
    cases = suite.findall("testcase")
    assert len(cases) == len(ALL_KINDS)
    by_name = {c.get("name"): c for c in cases}
    assert by_name["test_ok"].get("classname") == "pkg.test_a.TestA"
    assert float(by_name["test_ok"].get("time")) == 0.5 and len(by_name["test_ok"]) == 0
    failure = by_name["test_bad"].find("failure")
    assert failure.get("message") == "AssertionError: 1 != 2"
    assert "Traceback" in failure.text
    assert by_name["test_boom"].find("error") is not None
    assert by_name["test_later"].find("skipped").get("message") == "not today"
    assert by_name["test_parts (i=2)"].find("failure") is not None
    # What the schema has no attribute for is left out; xfail and xpass
    # are said the way the schema can (pytest writes an xfail so too).
    assert by_name["test_known"].find("skipped").get("type") == "xfail"
    assert by_name["test_lucky"].find("failure").get("type") == "unexpected success"
    assert not any({"outcome", "kind", "subtest"} & set(c.attrib) for c in cases)
    assert "skipped" not in root.attrib and suite.get("skipped") == "1"
    # The text header holds exactly the XML's counts.
    fields = dict(results.count_records(ALL_KINDS), verdict="failed")
    header, _ = results.parse_result(results.format_result(fields, b"out"))
    assert {k: int(header[k]) for k in ("tests", "failures", "errors", "skipped")} \
        == suite_counts(xml)
    assert {k: int(root.get(k)) for k in ("tests", "failures", "errors")} == \
        {k: v for k, v in suite_counts(xml).items() if k != "skipped"}


def test_pytest_xfail_and_namespaced_documents_are_read():
    xml = (b'<?xml version="1.0" encoding="utf-8"?><testsuites xmlns="urn:x"><testsuite>'
           b'<testcase classname="t.m" name="test_x" time="1.5">'
           b'<skipped type="pytest.xfail" message="known bug"/></testcase>'
           b'<testcase classname="t.m" name="test_y" time="nan"><system-out>hi</system-out>'
           b'</testcase></testsuite></testsuites>')
    records = junit_xml.parse_junit(xml)
    assert [(r.name, r.outcome, r.message, r.duration) for r in records] == [
        ("test_x", "xfail", "known bug", 1.5), ("test_y", "passed", "", 0.0)]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.builds(
    TestRecord, classname=st.text(max_size=40), name=st.text(max_size=40),
    outcome=st.sampled_from(results.OUTCOMES),
    duration=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    message=st.text(max_size=60), traceback=st.text(max_size=200),
    kind=st.sampled_from(results.KINDS), subtest=st.text(min_size=1, max_size=10)),
    max_size=8))
def test_round_trip_of_hostile_text(records):
    xml = junit_xml.format_junit(records)
    assert_valid(xml)
    parsed = junit_xml.parse_junit(xml)
    cleaned = [results.clean_record(r) for r in records]
    assert [r.outcome for r in parsed] == [r.outcome for r in cleaned]
    assert [r.id for r in parsed] == [r.id for r in cleaned]
    assert results.parse_records(results.format_records(records)) == cleaned
    assert results.count_records(cleaned) == suite_counts(xml)
    for got in parsed:
        for value in (got.classname, got.name, got.message, got.subtest):
            assert value.isprintable() and len(value) <= results.MESSAGE_LIMIT


def test_names_and_messages_are_flattened_and_capped():
    long = "x" * 5000
    xml = (f'<testsuite><testcase classname="a&#10;b" name="{long}">'
           f'<failure message="verdict: passed&#10;tests: 0&#13;{long}">{long * 3}</failure>'
           f'</testcase></testsuite>').encode()
    [record] = junit_xml.parse_junit(xml)
    assert record.classname == "a b"
    assert len(record.name) == results.NAME_LIMIT
    assert "\n" not in record.message and len(record.message) == results.MESSAGE_LIMIT
    assert len(record.traceback) < results.TRACEBACK_LIMIT + 100
    assert record.traceback.startswith("[... ") and record.traceback.endswith("x")


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<testsuite><testcase classname="a" name="&lol9;"><failure message="&lol9;"/></testcase></testsuite>
"""


def test_billion_laughs_is_refused_at_once():
    started = time.monotonic()
    with pytest.raises(results.JunitError, match="DOCTYPE"):
        junit_xml.parse_junit(BILLION_LAUGHS)
    assert time.monotonic() - started < 0.5


def test_external_entities_are_refused_and_read_nothing(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-VALUE")
    documents = [
        f'<?xml version="1.0"?><!DOCTYPE t [<!ENTITY x SYSTEM "file://{secret}">]>'
        f'<testsuite><testcase classname="a" name="&x;"/></testsuite>',
        # A parameter entity, and one hidden behind an encoding a byte search misses.
        f'<!DOCTYPE t [<!ENTITY % p SYSTEM "file://{secret}"> %p;]><testsuite/>',
    ]
    for document in documents:
        with pytest.raises(results.JunitError):
            junit_xml.parse_junit(document.encode())
    hidden = ('<?xml version="1.0" encoding="utf-16"?><!DOCTYPE t [<!ENTITY x SYSTEM '
              f'"file://{secret}">]><testsuite><testcase name="&x;"/></testsuite>')
    for encoded in (hidden.encode("utf-16"), hidden.encode("utf-16-le")):
        with pytest.raises(results.JunitError):
            junit_xml.parse_junit(encoded)
    # Via the dispatcher's path: the note says so, nothing of the file appears.
    added, records = outcome.records_part({}, outcome.BodyParts(documents[0].encode()))
    assert added == {"junit": "unreadable"} and records is None
    assert "TOP-SECRET" not in repr(added)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                 st.sampled_from([b"", b"<", b"<testsuite>", b"<a><testcase name='x'>",
                                  b"<?xml version='1.0' encoding='latin-1'?><a/>",
                                  b"\xef\xbb\xbf<testsuite/>", b"<!-- c --><testsuite/>"])))
def test_garbage_raises_only_junit_error(data):
    try:
        records = junit_xml.parse_junit(data)
    except results.JunitError:
        return
    assert all(isinstance(r, TestRecord) and r.outcome in results.OUTCOMES for r in records)


def test_huge_documents_and_too_many_records_are_refused():
    with pytest.raises(results.JunitError, match="exceeds"):
        junit_xml.parse_junit(b"<testsuite>" + b" " * results.MAX_JUNIT_BYTES + b"</testsuite>")
    many = b"<testsuite>" + b'<testcase name="t"/>' * 11 + b"</testsuite>"
    assert len(junit_xml.parse_junit(many, max_records=11)) == 11
    with pytest.raises(results.JunitError, match="more than 10 test cases"):
        junit_xml.parse_junit(many, max_records=10)
    elements = b"<a>" + b"<b/>" * (results.MAX_ELEMENTS + 1) + b"</a>"
    with pytest.raises(results.JunitError, match="elements"):
        junit_xml.parse_junit(elements)


def test_merge_of_shards_adds_counts():
    shards = [ALL_KINDS[:4], ALL_KINDS[4:8], ALL_KINDS[8:]]
    merged = results.merge_records(shards)
    assert merged == ALL_KINDS
    totals = [results.count_records(s) for s in shards]
    assert results.count_records(merged) == {k: sum(t[k] for t in totals) for k in totals[0]}


def test_write_junit_writes_beside_the_result_and_removes_a_stale_file(tmp_path):
    commit = "a" * 40
    junit_xml.write_junit(str(tmp_path), commit, ALL_KINDS[:2])
    path = tmp_path / f"{commit}.xml"
    assert suite_counts(path.read_bytes())["tests"] == 2
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    junit_xml.write_junit(str(tmp_path), commit, None)  # a retest without records
    assert not path.exists()
    with pytest.raises(ValueError):
        junit_xml.write_junit(str(tmp_path), "../" + "a" * 37, [])


# --------------------------------------------------------------------------
# The ``results`` body and the dispatcher's check of it.

COMMIT = "b" * 40
TOKEN = "c" * 32


def results_message(sent: Outcome) -> Message:
    return Message("results", f"{COMMIT} {TOKEN}", sent.to_body())


def test_old_style_body_is_still_valid():
    body = results.format_result({"verdict": "passed", "tests": 2}, b"Ran 2 tests\n\nOK\n")
    fields, parts, output = outcome.split_body(body)
    assert fields["verdict"] == "passed" and parts == outcome.BodyParts()
    assert output == b"Ran 2 tests\n\nOK\n"
    commit, _, stored = server.parse_results_message(
        Message("results", f"{COMMIT} {TOKEN}", body))
    assert stored.records is None and "junit" not in stored.header
    assert stored.header["tests"] == 2


# What format_junit wrote before the records left the XML: our own
# attributes on testcase, ``skipped`` on testsuites.  Older runners send it,
# and result folders hold it.
LEGACY_XML = b"""<?xml version='1.0' encoding='utf-8'?>
<testsuites name="tests" tests="4" failures="2" errors="1" skipped="0" time="0.020">
  <testsuite name="tests" tests="4" failures="2" errors="1" skipped="0" time="0.020">
    <testcase classname="pkg.T" name="test_ok" time="0.000" />
    <testcase classname="pkg.T" name="test_known" time="0.000" outcome="xfail">
      <system-out>AssertionError: known
tb</system-out>
    </testcase>
    <testcase classname="pkg.T" name="test_parts (i=2)" time="0.010" outcome="failed"
              kind="subtest" subtest="(i=2)"><failure message="AssertionError: 2">tb</failure>
    </testcase>
    <testcase classname="pkg.T" name="test_lucky" time="0.010" outcome="xpass">
      <failure message="unexpected success" type="unexpected success" />
    </testcase>
    <testcase classname="" name="setUpClass (pkg.U)" time="0.000" outcome="error"
              kind="fixture"><error message="RuntimeError: setup">tb</error></testcase>
  </testsuite>
</testsuites>
"""
LEGACY_RECORDS = [
    TestRecord("pkg.T", "test_ok"),
    TestRecord("pkg.T", "test_known", "xfail", 0.0, "AssertionError: known", "tb"),
    TestRecord("pkg.T", "test_parts", "failed", 0.01, "AssertionError: 2", "tb",
               kind="subtest", subtest="(i=2)"),
    TestRecord("pkg.T", "test_lucky", "xpass", 0.01, "unexpected success"),
    TestRecord("", "setUpClass (pkg.U)", "error", 0.0, "RuntimeError: setup", "tb",
               kind="fixture"),
]


def test_legacy_xml_is_still_read_with_its_kinds():
    assert junit_xml.parse_junit(LEGACY_XML) == LEGACY_RECORDS


def test_an_older_runners_body_carries_the_xml_between_the_blank_line_and_the_output():
    output = b"junit_bytes: 5\n\nlooks like a header but is output\n"
    sent = Outcome({"verdict": "failed", "tests": 7, "failures": 3, "errors": 3, "skipped": 1},
                   output, junit_xml=LEGACY_XML)
    body = sent.to_body()
    assert body.startswith(b"verdict: failed\n")
    assert f"\njunit_bytes: {len(LEGACY_XML)}\n\n".encode() + LEGACY_XML + output in body
    raw, parts, got = outcome.split_body(body)
    assert parts == outcome.BodyParts(LEGACY_XML) and got == output
    assert "junit_bytes" not in raw
    _, _, stored = server.parse_results_message(results_message(sent))
    assert list(stored.records) == LEGACY_RECORDS and stored.output == output
    assert stored.header["tests"] == 4 and stored.header["failures"] == 2


def test_body_carries_records_beside_the_xml_and_the_dispatcher_reads_the_records():
    xml = junit_xml.format_junit(ALL_KINDS)
    output = b"records_bytes: 5\n\nlooks like a header but is output\n"
    sent = Outcome({"verdict": "failed", "tests": 99}, output, records=ALL_KINDS,
                   junit_xml=xml)
    body = sent.to_body()
    part = results.format_records(ALL_KINDS)
    assert f"\njunit_bytes: {len(xml)}\nrecords_bytes: {len(part)}\n\n".encode() \
        + xml + part + output in body
    raw, parts, got = outcome.split_body(body)
    assert parts == outcome.BodyParts(xml, part) and got == output
    assert "records_bytes" not in raw
    _, _, stored = server.parse_results_message(results_message(sent))
    # The kinds come from the records (the XML has none): unittest's counts.
    assert list(stored.records) == ALL_KINDS and stored.output == output
    assert stored.header["tests"] == 7 and stored.header["errors"] == 3
    # The XML beside the records is not read: garbage there changes nothing.
    garbage = dataclasses.replace(sent, junit_xml=b"<testsuite><testcase")
    _, _, stored = server.parse_results_message(results_message(garbage))
    assert list(stored.records) == ALL_KINDS and "junit" not in stored.header
    # An empty records part is a run of no tests, not an older runner.
    empty = Outcome({"verdict": "passed"}, b"ok", records=())
    _, _, stored = server.parse_results_message(results_message(empty))
    assert stored.records == () and stored.header["tests"] == 0


@pytest.mark.parametrize("field", ["junit_bytes", "records_bytes"])
@pytest.mark.parametrize("size", ["x", "-1", "99999", "1" * 11, ""])
def test_bad_junit_bytes_is_refused(size, field):
    body = f"verdict: passed\n{field}: {size}\n\nshort".encode()
    with pytest.raises(ProtocolError):
        outcome.split_body(body)
    with pytest.raises(Reply):
        server.parse_results_message(Message("results", f"{COMMIT} {TOKEN}", body))


@pytest.mark.parametrize("parts", [{"records": ALL_KINDS}, {"junit_xml": LEGACY_XML}])
def test_dispatcher_takes_counts_from_the_records_not_a_forged_header(parts):
    sent = Outcome({"verdict": "passed", "tests": 100, "failures": 0, "errors": 0, "skipped": 0},
                   b"x", **parts)
    _, _, stored = server.parse_results_message(results_message(sent))
    assert {k: stored.header[k] for k in ("tests", "failures", "errors", "skipped")} == \
        results.count_records(stored.records) == \
        results.count_records(parts.get("records") or LEGACY_RECORDS)


@pytest.mark.parametrize("part", [b"not json\n", b"{}\n", b'["a"]\n', b'["a","b",7]\n',
                                  b"[" * 100_000 + b"\n", b'["a","b","passed","slow"]\n'])
def test_a_forged_records_part_is_unreadable_and_keeps_the_summary_counts(part):
    body = b"verdict: failed\ntests: 4\nrecords_bytes: %d\n\n" % len(part) + part + b"out"
    _, _, stored = server.parse_results_message(Message("results", f"{COMMIT} {TOKEN}", body))
    assert stored.header["junit"] == "unreadable" and stored.records is None
    assert stored.header["tests"] == 4 and stored.output == b"out"


def test_unreadable_xml_keeps_the_summary_counts_with_a_note():
    sent = Outcome({"verdict": "failed", "tests": 4, "failures": 1}, b"out",
                   junit_xml=b"<testsuite><testcase")
    _, _, stored = server.parse_results_message(results_message(sent))
    assert stored.header["tests"] == 4 and stored.header["failures"] == 1
    assert stored.header["junit"] == "unreadable" and stored.records is None
    assert stored.output == b"out"
    header, _ = results.parse_result(stored.result_file())
    assert header["junit"] == "unreadable" and "records" not in header


# --------------------------------------------------------------------------
# The runner side, with real processes.


# Modules named like ours, in the tested project: they must be the ones the
# project's tests import.


def make_project(root, files: dict[str, str]) -> str:
    for name, text in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(text)
    return str(root)


def run_captured(repo: str, command: list[str], pattern=None, budget=1 << 22):
    with junit_capture.Capture(repo, pattern) as capture:
        # Our own pytest plugins (hypothesis) would only slow a project's run.
        env = dict(child_env(), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
        argv = command_line.with_report(command, capture)
        proc = subprocess.run(argv, cwd=repo, capture_output=True, timeout=60,
                              env=env)
        collected = capture.collect(False, budget)
        tmp = capture.tmp
    assert tmp is None or not os.path.exists(tmp)
    return proc, collected


def summary_counts(output: bytes) -> dict[str, int]:
    counts = parse_counts(output)
    assert counts.found, output
    return {"tests": counts.tests, "failures": counts.failures, "errors": counts.errors,
            "skipped": counts.skipped}


def without_timing(text: bytes) -> bytes:
    return re.sub(rb"Ran (\d+) tests? in [\d.]+s", rb"Ran \1 tests", text)


@pytest.mark.parametrize("package", [False, True])
def test_recorder_counts_output_and_exit_equal_plain_unittest(tmp_path, package):
    files = {"tests/test_mix.py": TRICKY_UNITTESTS, "tests/test_shadow.py": SHADOW_TEST,
             "tests/test_broken.py": "import no_such_module_here\n",
             **{f"{n}.py": t for n, t in SHADOWS.items()}}
    if package:
        files["tests/__init__.py"] = ""
    repo = make_project(tmp_path / "project", files)
    command = default_test_command(repo)
    by_hand = subprocess.run(command, cwd=repo, capture_output=True, timeout=60)
    proc, collected = run_captured(repo, command)
    assert proc.returncode == by_hand.returncode == 1
    assert without_timing(proc.stdout + proc.stderr) == \
        without_timing(by_hand.stdout + by_hand.stderr)
    assert collected.note == "" and collected.counts == summary_counts(by_hand.stderr)
    assert collected.counts == {"tests": 10, "failures": 5, "errors": 4, "skipped": 1}
    # The records come from the recorder's records file: kinds included.
    records = collected.records
    assert results.count_records(records) == collected.counts
    outcomes = {r.id.rpartition(".")[2]: r.outcome for r in records}
    assert outcomes["test_project_modules_come_first"] == "passed"  # no shadowing
    assert outcomes["test_ok"] == "passed" and outcomes["test_fail"] == "failed"
    assert outcomes["test_xfail"] == "xfail" and outcomes["test_xpass"] == "xpass"
    assert outcomes["test_subtests (i=3)"] == "failed"
    assert outcomes["test_broken"] == "error"  # the module that cannot be imported
    failure = next(r for r in records if r.name == "test_fail")
    assert failure.message.startswith("AssertionError: 'left' != 'right'")
    assert "Traceback" in failure.traceback and failure.duration >= 0
    assert suite_counts(collected.xml) == collected.counts
    assert_valid(collected.xml)
    assert [r.id for r in junit_xml.parse_junit(collected.xml)] == [r.id for r in records]


def test_recorder_folder_holds_nothing_importable_but_what_runs_in_the_tests():
    """The folder is put on a pytest run's path (for the ordering plugin):
    nothing else of ours may be importable by the tested project."""
    folder = os.path.dirname(junit_capture.RECORDER)
    assert sorted(n for n in os.listdir(folder) if n != "__pycache__") == \
        ["ci_order.py", "ci_shard.py", "unittest_recorder.py"]


def test_pytest_command_gets_junitxml_and_counts_equal_its_summary(tmp_path):
    repo = make_project(tmp_path / "project", {"tests/test_p.py": PYTEST_TESTS,
                                               "helpers.py": SHADOWS["helpers"]})
    command = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]
    proc, collected = run_captured(repo, command)
    assert proc.returncode == 1
    assert collected.note == "" and collected.counts == summary_counts(proc.stdout)
    assert collected.counts == {"tests": 9, "failures": 2, "errors": 1, "skipped": 1}
    outcomes = {r.name: r.outcome for r in junit_xml.parse_junit(collected.xml)}
    assert outcomes == {"test_a": "passed", "test_wrong": "failed", "test_later": "skipped",
                        "test_known": "xfail", "test_lucky": "passed",
                        "test_uses_broken": "error", "test_param[1]": "passed",
                        "test_param[2]": "failed", "test_param[3]": "passed"}


def test_custom_command_files_missing_unreadable_and_escaping(tmp_path):
    repo = make_project(tmp_path / "project", {"reports/.keep": ""})
    secret = tmp_path / "outside.xml"
    secret.write_bytes(junit_xml.format_junit(ALL_KINDS))
    write = [PY, "-c", "import sys; open(sys.argv[1], 'wb').write(sys.argv[2].encode())"]
    # Two files: merged, in name order.
    for name, records in (("reports/a.xml", ALL_KINDS[:3]), ("reports/b.xml", ALL_KINDS[3:])):
        with open(os.path.join(repo, name), "wb") as handle:
            handle.write(junit_xml.format_junit(records))
    _, collected = run_captured(repo, [PY, "-c", "pass"], "reports/*.xml")
    # JUnit files have no kinds: each record is a test of its own.
    assert collected.records == [flattened(r) for r in ALL_KINDS]
    assert junit_xml.parse_junit(collected.xml) == collected.records
    _, collected = run_captured(repo, [*write, "reports/a.xml", "<not xml"], "reports/*.xml")
    assert collected == junit_capture.Collected(note="unreadable")
    _, collected = run_captured(repo, [PY, "-c", "pass"], "nothing/*.xml")
    assert collected == junit_capture.Collected(note="missing")
    os.symlink(secret, os.path.join(repo, "reports", "c.xml"))
    _, collected = run_captured(repo, [PY, "-c", "pass"], "reports/c.xml")
    assert collected.note == "unreadable"
    os.mkfifo(os.path.join(repo, "reports", "d.xml"))
    _, collected = run_captured(repo, [PY, "-c", "pass"], "reports/d.xml")
    assert collected.note == "unreadable"
    # Too big for the message: tracebacks are shortened first, then it is dropped.
    many = [TestRecord("c", f"t{i}", "failed", 0, "m", "x" * 3000) for i in range(50)]
    with open(os.path.join(repo, "reports", "a.xml"), "wb") as handle:
        handle.write(junit_xml.format_junit(many))
    _, collected = run_captured(repo, [PY, "-c", "pass"], "reports/a.xml", budget=30_000)
    assert 0 < collected.size <= 30_000 and collected.counts["failures"] == 50
    sent = len(results.format_records(collected.records)) + len(collected.xml)
    assert sent == collected.size and len(collected.records[0].traceback) <= 200
    _, collected = run_captured(repo, [PY, "-c", "pass"], "reports/a.xml", budget=1000)
    assert collected == junit_capture.Collected(note="too large")
    for bad in ("/etc/*.xml", "../x.xml", "a/../../x.xml", ""):
        with pytest.raises(ValueError):
            junit_capture.check_pattern(bad)


def test_timed_out_run_and_plain_commands_collect_nothing(tmp_path):
    with junit_capture.Capture(str(tmp_path)) as capture:
        command_line.with_report([PY, "-m", "unittest"], capture)
        assert capture.collect(True, 1 << 20) == junit_capture.Collected()
    with junit_capture.Capture(str(tmp_path)) as capture:
        assert command_line.with_report(["make", "test"], capture) == ["make", "test"]
        assert capture.collect(False, 1 << 20) == junit_capture.Collected()
    with junit_capture.Capture(str(tmp_path)) as capture:
        assert command_line.with_report(["pytest", "--junitxml=mine.xml"], capture) == \
            ["pytest", "--junitxml=mine.xml"]


def test_counts_from_records_decide_a_custom_commands_verdict():
    verdict, counts, _ = judge(
        1, False, b"no summary here\n", {"tests": 3, "failures": 1, "errors": 0,
                                         "skipped": 0})
    assert verdict == "failed" and counts.tests == 3 and counts.failures == 1
    assert judge(1, False, b"no summary here\n")[0] == "error"


def test_recorder_script_alone_explains_its_usage():
    proc = subprocess.run([sys.executable, junit_capture.RECORDER], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "Usage" in proc.stderr


@given(st.lists(st.tuples(st.text(max_size=40), st.text(max_size=40), st.text(max_size=80),
                          st.sampled_from(["passed", "failed", "error", "skipped", "xfail",
                                           "xpass"])), max_size=8))
@settings(max_examples=60, deadline=None)
def test_recorder_xml_written_by_hand_parses_back(tmp_path_factory, cases):
    """The recorder writes its XML without ElementTree (its import is slow):
    whatever the names and messages, the file parses, with the same tests
    and outcomes (text flattened as the parser flattens it)."""
    sys.path.insert(0, os.path.dirname(junit_capture.RECORDER))
    try:
        import unittest_recorder
    finally:
        sys.path.pop(0)
    records = [{"classname": c, "name": n, "subtest": "", "duration": 0.5, "outcome": o,
                "kind": "", "message": m, "traceback": m + "\n  line"}
               for c, n, m, o in cases]
    path = str(tmp_path_factory.mktemp("rec") / "r.xml")
    unittest_recorder.write_junit(path, records)
    with open(path, "rb") as handle:
        data = handle.read()
    assert_valid(data)
    parsed = junit_xml.parse_junit(data)
    assert [r.outcome for r in parsed] == [o for _, _, _, o in cases]
    unittest_recorder.write_records(path + ".records", records)
    with open(path + ".records", "rb") as handle:
        # The same records as the XML (the recorder cleans text its own way).
        again = results.parse_records(handle.read())
    assert [(r.id, r.outcome) for r in again] == [(r.id, r.outcome) for r in parsed]
    assert [c.get("name") for c in ET.fromstring(data).iter("testcase")] == \
        [unittest_recorder._clean(n) for _, n, _, _ in cases]


# --------------------------------------------------------------------------
# Bad input at scale: ids of any characters and length, 100,000 tests.

def test_ids_of_any_characters_and_length_are_capped_and_escaped(tmp_path):
    nasty = "a\x00b\nc\r\td\"e'<f>&g]]>h\ud800i\U0001f600\u202ej\x1b[31m\x85k\u2028l" \
        + "x" * 1_000_000
    record = TestRecord(nasty, nasty, "failed", float("inf"), nasty, nasty, "subtest", nasty)
    for parsed in (results.parse_records(results.format_records([record]))[0],
                   junit_xml.parse_junit(junit_xml.format_junit([record]))[0]):
        assert len(parsed.classname) == results.NAME_LIMIT
        assert parsed.classname.isprintable() and parsed.name.isprintable()
        assert len(parsed.id) <= 3 * results.NAME_LIMIT + 2
        assert len(parsed.traceback) <= results.TRACEBACK_LIMIT
        assert parsed.outcome == "failed" and parsed.duration == 0.0
    # Unescaped as the recorder writes them, U+0085 and U+2028 split no line.
    [raw] = results.parse_records('["a\x85b","c\u2028d"]\n'.encode())
    assert raw.classname == "a b" and raw.name == "c d"
    # Exactly as many records as lines, however many: the cap is on records.
    part = results.format_records([record] * 3)
    assert len(results.parse_records(part, max_records=3)) == 3
    with pytest.raises(results.JunitError, match="more than 2"):
        results.parse_records(part, max_records=2)
    commit = "d" * 40
    junit_xml.write_junit(str(tmp_path), commit, [record])
    data = (tmp_path / f"{commit}.xml").read_bytes()
    assert_valid(data)
    assert len(data) < 10_000 and b"\x00" not in data and b"]]>" not in data


def test_a_hundred_thousand_tests_are_kept_from_runner_to_dashboard(tmp_path):
    """Generated records of 100,000 tests (one in a thousand failing with a
    traceback) fit the runner's default budget, reach the dispatcher whole,
    and the file it writes is read back by the dashboard's parser."""
    records = [TestRecord(f"tests.test_m{i // 1000:03d}.TestBig", f"test_{i:06d}",
                          duration=0.001) for i in range(100_000)]
    for i in range(0, 100_000, 1000):
        records[i] = TestRecord(records[i].classname, records[i].name, "failed", 0.5,
                                "AssertionError: no", "Traceback\n" * 30)
    budget = (server_limits.DEFAULT_MAX_MESSAGE - daemon.MESSAGE_OVERHEAD) // 2
    collected = junit_capture.fit(records, budget)
    assert collected is not None and collected.size <= budget
    sent = Outcome({"verdict": "failed", "tests": 1}, b"out", records=collected.records,
                   junit_xml=collected.xml)
    body = sent.to_body()
    assert len(body) < server_limits.DEFAULT_MAX_MESSAGE
    _, _, stored = server.parse_results_message(Message("results", f"{COMMIT} {TOKEN}", body))
    assert len(stored.records) == 100_000 and stored.records[1000].outcome == "failed"
    assert {k: stored.header[k] for k in ("tests", "failures", "errors")} == \
        {"tests": 100_000, "failures": 100, "errors": 0}
    stored.write(str(tmp_path), COMMIT)
    with open(results.junit_path(str(tmp_path), COMMIT), "rb") as handle:
        statuses = index.junit_statuses(handle.read(results.MAX_JUNIT_BYTES + 1))
    assert len(statuses) == 100_000
    assert statuses["tests.test_m001.TestBig.test_001000"] == "failure"
