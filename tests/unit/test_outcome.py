"""The one value a run's result travels as (ci/outcome.py): built by the
runner, carried by the ``results`` body, checked and written by the
dispatcher."""

from __future__ import annotations

import dataclasses
import os

import pytest

from ci import junit_xml
from ci.dispatch import server
from ci import results
from ci.outcome import BodyParts, Outcome, RESULT_INT_FIELDS, split_body
from ci.results import FAILED, SKIPPED, TestRecord
from ci.wire import Message, ProtocolError, Reply

COMMIT = "d" * 40
TOKEN = "e" * 32
RECORDS = (TestRecord("t.T", "test_ok", duration=0.25),
           TestRecord("t.T", "test_bad", FAILED, message="AssertionError"),
           TestRecord("t.T", "test_later", SKIPPED, message="not today"))
# Output that looks like a header and a body's separator: it must stay output.
OUTPUT = b"junit_bytes: 5\n\nverdict: passed\n\nRan 3 tests\n"


def message(body: bytes) -> Message:
    return Message("results", f"{COMMIT} {TOKEN}", body)


def test_body_round_trip_keeps_the_wire_bytes_and_takes_counts_from_the_records():
    xml = junit_xml.format_junit(list(RECORDS))
    sent = Outcome({"tests": 99, "verdict": "failed", "failures": 0, "exit_code": 1,
                    "duration": "1.5", "runner": "r1", "junit": ""}, OUTPUT, junit_xml=xml)
    body = sent.to_body()
    # The same bytes older runners sent: header in the result file's order,
    # then junit_bytes, the blank line, the XML, the output.
    assert body == (b"verdict: failed\ntests: 99\nfailures: 0\nrunner: r1\n"
                    b"duration: 1.5\nexit_code: 1\njunit: \n"
                    + f"junit_bytes: {len(xml)}\n\n".encode() + xml + OUTPUT)
    got = Outcome.from_body(body)
    assert got.records == RECORDS and got.output == OUTPUT and got.junit_xml == b""
    assert dict(got.header) == {"verdict": "failed", "tests": 3, "failures": 1, "errors": 0,
                                "skipped": 1, "runner": "r1", "exit_code": 1,
                                "duration": "1.500"}
    assert list(got.header) == [k for k in results.RESULT_FIELDS if k in got.header]
    assert server.parse_results_message(message(body)) == (COMMIT, TOKEN, got)


def test_old_style_body_without_junit_bytes_means_the_same():
    old = results.format_result({"verdict": "passed", "tests": 2}, OUTPUT)
    got = Outcome.from_body(old)
    assert got.records is None and got.output == OUTPUT
    assert got.header["tests"] == 2 and "junit" not in got.header
    # And an outcome without XML sends exactly that: old dispatchers read it.
    assert Outcome({"verdict": "passed", "tests": 2}, OUTPUT).to_body() == old
    assert split_body(old) == ({"verdict": "passed", "tests": "2"}, BodyParts(), OUTPUT)


@pytest.mark.parametrize("body, reason", [
    (b"verdict: passed", "fields, a blank line"),
    (b"verdict: maybe\n\n", "verdict must be one of"),
    (b"tests: 1\n\n", "verdict must be one of"),
    (b"verdict: passed\ntests: \xc2\xb2\n\n", "field tests must be an integer"),
    (b"verdict: passed\nexit_code: --1\n\n", "field exit_code must be an integer"),
    (b"verdict: passed\nerrors: 1234567890123\n\n", "field errors must be an integer"),
    (b"verdict: passed\nduration: soon\n\n", "field duration must be a number"),
    (b"verdict: passed\nduration: nan\n\n", "field duration must be a finite number"),
    (b"verdict: passed\njunit_bytes: 99\n\nshort", "junit_bytes must be the length"),
    (b"verdict: passed\njunit_bytes: -1\n\n<a/>", "junit_bytes must be the length"),
    (b"verdict: passed\nbad key: x\n\n", "malformed field line"),
])
def test_what_the_dispatcher_refuses_and_says_why(body, reason):
    with pytest.raises(ProtocolError, match=reason):
        Outcome.from_body(body)
    with pytest.raises(Reply, match=reason):
        server.parse_results_message(message(body))


def test_forged_and_unknown_fields_are_dropped_not_stored():
    body = (b"verdict: passed\ncommit: " + b"a" * 40 + b"\nbranch: main\nprevious: "
            + b"b" * 40 + b"\nrecords: x\njunit_xml: y\nsetup: hacked\nsetup_scope: root\n"
            b"setup_duration: 1e9\nshards: 0/3\nreason: " + b"r" * 400 + b"\n\nout")
    got = Outcome.from_body(body)
    assert set(got.header) == {"verdict", "reason", "duration", *RESULT_INT_FIELDS}
    assert len(got.header["reason"]) <= 300 and got.records is None
    kept = Outcome.from_body(b"verdict: passed\nsetup: reused\nsetup_scope: branch\n"
                             b"setup_duration: 0.250\nshards: 2/3 empty\n\n")
    assert (kept.header["setup"], kept.header["setup_scope"], kept.header["setup_duration"],
            kept.header["shards"]) == ("reused", "branch", "0.250", "2/3 empty")


def test_unreadable_xml_is_a_note_and_no_records():
    got = Outcome.from_body(Outcome({"verdict": "failed", "tests": 4}, b"out",
                                    junit_xml=b"<!DOCTYPE x><testsuite/>").to_body())
    assert got.header["junit"] == "unreadable" and got.header["tests"] == 4
    assert got.records is None and got.output == b"out"


def test_only_header_fields_fit_in_the_header_and_the_value_is_frozen():
    for hidden in ("records", "junit_xml", "junit_bytes"):
        with pytest.raises(ValueError, match=hidden):
            Outcome({"verdict": "passed", hidden: "x"})
    outcome = Outcome({"runner": "r", "verdict": "passed"}, b"o")
    assert list(outcome.header) == ["verdict", "runner"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        outcome.output = b"changed"
    with pytest.raises(TypeError):
        outcome.header["verdict"] = "failed"
    changed = outcome.with_header(commit=COMMIT, verdict="failed")
    assert list(changed.header) == ["commit", "verdict", "runner"]
    assert outcome.verdict == "passed" and changed.verdict == "failed"
    assert changed.output == b"o"


def test_write_puts_the_xml_first_and_removes_a_stale_one(tmp_path):
    folder = str(tmp_path)
    xml_path = tmp_path / f"{COMMIT}.xml"
    done = Outcome({"commit": COMMIT, "verdict": "failed", "tests": 3}, OUTPUT, RECORDS)
    done.write(folder, COMMIT)
    assert (tmp_path / COMMIT).read_bytes() == done.result_file() == \
        results.format_result({"commit": COMMIT, "verdict": "failed", "tests": 3}, OUTPUT)
    assert len(junit_xml.parse_junit(xml_path.read_bytes())) == 3
    Outcome({"commit": COMMIT, "verdict": "passed"}, b"", ()).write(folder, COMMIT)
    assert junit_xml.parse_junit(xml_path.read_bytes()) == []   # a document with no tests
    Outcome({"commit": COMMIT, "verdict": "passed"}, b"").write(folder, COMMIT)
    assert not xml_path.exists()   # a retest without records keeps no old XML
    assert not [n for n in os.listdir(folder) if n.startswith(".tmp")]
