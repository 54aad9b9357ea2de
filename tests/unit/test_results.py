"""The text result file (ci/results.py): header in its order, raw output
byte for byte, nothing but result fields in a header, and a file without
the header/output separator refused."""

from __future__ import annotations

import pytest

from ci import results
from ci.wire import ProtocolError


COMMIT = "0123456789abcdef0123456789abcdef01234567"
NOT_UTF8 = b"\xff\xfe\xc3\x28\xa0\xa1\xe2\x28\xa1\xf0\x28\x8c\xbc\x80\x00"


def test_result_round_trip_keeps_raw_output_byte_for_byte():
    output = (b"Ran 3 tests in 0.1s\n\nverdict: passed\n\nresults:" + COMMIT.encode()
              + b" 1\n" + NOT_UTF8 + b"\n") * 1000
    fields = {"verdict": "failed", "tests": 3, "failures": 1, "errors": 0, "skipped": 0,
              "commit": COMMIT, "reason": "two\nlines"}
    # Nothing but header fields may ride in a header: another key is refused.
    with pytest.raises(ValueError, match="not_a_result_field"):
        results.format_result(dict(fields, not_a_result_field="x"), output)
    data = results.format_result(fields, output)
    header = data.partition(b"\n\n")[0].decode().splitlines()
    assert [line.partition(":")[0] for line in header] == \
        ["commit", "verdict", "tests", "failures", "errors", "skipped", "reason"]
    parsed, got = results.parse_result(data)
    assert got == output
    assert parsed["verdict"] == "failed" and parsed["tests"] == "3"
    assert parsed["reason"] == "two lines"
    assert "not_a_result_field" not in parsed
    assert results.parse_result(results.format_result({"verdict": "passed"}, b"")) == \
        ({"verdict": "passed"}, b"")


def test_parse_result_refuses_a_file_without_separator():
    with pytest.raises(ProtocolError):
        results.parse_result(b"verdict: passed\n")


def test_read_header_reads_only_the_head_of_a_huge_file(tmp_path):
    header = {"verdict": "failed", "tests": 3, "failures": 1, "errors": 0, "skipped": 0,
              "runner": "r"}
    huge = tmp_path / ("a" * 40)
    huge.write_bytes(results.format_result(header, b"x" * 5_000_000))
    assert results.read_header(str(huge), 4096, keep_atime=True)["verdict"] == "failed"
    assert results.read_header(str(huge))["tests"] == "3"
    # A header longer than what is read is no header; a missing file neither.
    long = tmp_path / ("b" * 40)
    long.write_bytes(results.format_result({**header, "runner": "r" * 900}, b"out\n"))
    assert results.read_header(str(long), 256) is None
    assert results.read_header(str(tmp_path / ("c" * 40))) is None
