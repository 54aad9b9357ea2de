"""Pure functions of the protocol and of the runner's judging, tested
without sockets: if framing, parsing or counting is wrong, every daemon is
wrong, so these round trips carry the awkward inputs (colons, newlines,
megabytes, bytes that are not UTF-8, output that mimics our commands)."""

from __future__ import annotations

import io
import os
import time
import sys

import pytest
from hypothesis import given, settings, strategies as st

import ci.security
from ci import results
from ci.runner.command_line import default_test_command
from ci.runner.pipeline import read_bounded
from ci.runner.slot import child_env
from ci.runner.verdict import judge, parse_counts
from ci.results import VERDICTS
from ci.security import NonceCache, boot_id
from ci.wire import (Busy, FrameHeader, Message, ProtocolError, decode_fields, decode_header,
    decode_message, encode_fields, encode_frame, encode_message, format_address, parse_address,
    valid_commit, valid_full_commit, verify_frame)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SECRET = b"correct horse battery staple"
NOT_UTF8 = b"\xff\xfe\xc3\x28\xa0\xa1\xe2\x28\xa1\xf0\x28\x8c\xbc\x80\x00"


def split_frame(frame: bytes) -> tuple[FrameHeader, bytes]:
    """What ``read_frame`` does on a socket, done on bytes."""
    line, sep, payload = frame.partition(b"\n")
    assert sep, "a frame has a header line"
    header = decode_header(line)
    assert header.length == len(payload)
    return header, payload


# --------------------------------------------------------------------------
# Messages.

@pytest.mark.parametrize("command, argument, body", [
    ("status", "", b""),
    ("ok", "pong", b""),
    ("register", "[::1]:8901", b"instance: abc\nbusy: \n"),
    ("results", f"{COMMIT} 7", b"verdict: passed\n\nresults:deadbeef 1\nok:x\n"),
    ("error", "unknown command 'x': try status", b""),
    ("dispatch", " ".join([COMMIT] * 3), b""),
    ("results", f"{COMMIT} 1", b"\n\n\nleading and trailing newlines\n\n"),
    ("results", f"{COMMIT} 1", NOT_UTF8 * 10),
    ("results", f"{COMMIT} 1", b"line\r\nwith\rcarriage returns and a NUL \0 byte"),
])
def test_message_round_trip(command, argument, body):
    assert decode_message(encode_message(command, argument, body)) == \
        Message(command, argument, body)


def test_message_round_trip_several_megabytes():
    body = (b"results:" + COMMIT.encode() + b" 1\n" + NOT_UTF8 + b"\n\n") * 200_000
    assert len(body) > 5_000_000
    message = decode_message(encode_message("results", f"{COMMIT} 3", body))
    assert message.command == "results"
    assert message.argument == f"{COMMIT} 3"
    assert message.body == body


@settings(max_examples=200, deadline=None, database=None)
@given(command=st.from_regex(r"[a-z_]{1,32}", fullmatch=True),
       argument=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200),
       body=st.binary(max_size=2000))
def test_message_round_trip_any_input(command, argument, body):
    decoded = decode_message(encode_message(command, argument, body))
    assert (decoded.command, decoded.argument, decoded.body) == (command, argument, body)


@pytest.mark.parametrize("command, argument", [
    ("Status", ""), ("", ""), ("a" * 33, ""), ("stat us", ""), ("ok!", ""),
    ("ok", "two\nlines"), ("ok", "nul\0"), ("ok", "cr\r"), ("ok", "caf\u00e9"),
])
def test_encode_message_refuses_bad_command_lines(command, argument):
    with pytest.raises(ProtocolError):
        encode_message(command, argument)


@pytest.mark.parametrize("payload", [
    b"", b"\n", b":arg", b"STATUS", b"stat us", b"status\t:x", b"ok:\x1b[31m",
    b"ok:\xff\xfe", b"caf\xc3\xa9", b"x" * 5000, b"a" * 33 + b":x",
])
def test_decode_message_refuses_malformed_payloads(payload):
    with pytest.raises(ProtocolError):
        decode_message(payload)


def test_decode_message_splits_on_first_colon_and_first_newline_only():
    message = decode_message(b"register:[::1]:80\nkey: a:b\n\nrest:of\nit")
    assert message == Message("register", "[::1]:80", b"key: a:b\n\nrest:of\nit")


# --------------------------------------------------------------------------
# Frames.

FRAME_PAYLOADS = {
    "command": b"status",
    "frame-inside-body": b"results:" + COMMIT.encode()
    + b" 1\nverdict: failed\n\nCI1 5 1.0 abcdefgh -\nhello",
    "not-utf8": NOT_UTF8 + b"\n\n\n" + NOT_UTF8,
    "6MB": (b"x: y\n" + NOT_UTF8) * 300_000,
}


@pytest.mark.parametrize("secret", [None, SECRET], ids=["unsigned", "signed"])
@pytest.mark.parametrize("name", list(FRAME_PAYLOADS))
def test_frame_round_trip(secret, name):
    payload = FRAME_PAYLOADS[name]
    frame = encode_frame(payload, secret)
    header, got = split_frame(frame)
    assert got == payload
    verify_frame(header, got, secret, nonces=NonceCache())
    assert (header.tag == "-") == (secret is None)


def test_reply_is_bound_to_its_request_nonce():
    frame = encode_frame(b"ok", SECRET, reply_to="aaaaaaaaaaaa")
    header, payload = split_frame(frame)
    verify_frame(header, payload, SECRET, reply_to="aaaaaaaaaaaa")
    with pytest.raises(ProtocolError, match="signature"):
        verify_frame(header, payload, SECRET, reply_to="bbbbbbbbbbbb")
    with pytest.raises(ProtocolError, match="signature"):
        verify_frame(header, payload, SECRET)


def test_verify_frame_refuses_tampering_and_wrong_keys():
    header, payload = split_frame(encode_frame(b"dispatch:" + COMMIT.encode(), SECRET))
    with pytest.raises(ProtocolError, match="signature"):
        verify_frame(header, payload.replace(b"0", b"1", 1), SECRET)
    with pytest.raises(ProtocolError, match="signature"):
        verify_frame(header, payload, b"another secret")
    unsigned_header, unsigned = split_frame(encode_frame(payload, None))
    with pytest.raises(ProtocolError, match="unsigned"):
        verify_frame(unsigned_header, unsigned, SECRET)
    # Without a secret configured nothing is checked at all.
    verify_frame(header, payload.replace(b"0", b"1", 1), None)


def test_verify_frame_refuses_stale_and_replayed_messages():
    frame = encode_frame(b"status", SECRET, now=1_000_000.0)
    header, payload = split_frame(frame)
    verify_frame(header, payload, SECRET, window=30, now=1_000_029.0)
    with pytest.raises(ProtocolError, match="stale"):
        verify_frame(header, payload, SECRET, window=30, now=1_000_031.0)
    with pytest.raises(ProtocolError, match="stale"):
        verify_frame(header, payload, SECRET, window=30, now=999_969.0)
    nonces = NonceCache(window=30)
    verify_frame(header, payload, SECRET, nonces=nonces, now=1_000_001.0)
    with pytest.raises(ProtocolError, match="replayed"):
        verify_frame(header, payload, SECRET, nonces=nonces, now=1_000_002.0)


def test_nonce_cache_forgets_only_what_the_window_already_refuses():
    cache = NonceCache(window=10, limit=1000)
    assert cache.add("a" * 24, now=100.0)
    assert not cache.add("a" * 24, now=115.0)  # still remembered within 2 windows
    assert cache.add("b" * 24, now=200.0)  # old entries dropped, new one kept
    assert cache.add("a" * 24, now=200.5)
    small = NonceCache(window=10, limit=3)
    for i in range(10):
        assert small.add(f"{i:024x}", now=100.0)
    assert len(small._seen) <= 3


def test_persisted_nonces_outlive_the_cache_and_stay_bounded(tmp_path, monkeypatch):
    """Issue 17: a nonce seen before a restart is still refused after it;
    only the last two windows are kept, a torn last line is skipped, and
    the file is compacted once it is mostly dead entries."""
    path = str(tmp_path / "dispatcher-nonces")
    now = time.time()
    with open(path, "wb") as handle:  # an earlier run's file, killed mid-line
        handle.write(b"%.3f %s\n%.3f %s\n%.3f %s" % (
            now - 200, b"a" * 24, now - 5, b"b" * 24, now - 1, b"c" * 3))
    cache = NonceCache(window=30)
    cache.persist(path)
    assert not cache.add("b" * 24, now)  # seen before the "restart"
    assert cache.add("a" * 24, now)  # older than two windows: dropped (stale anyway)
    assert cache.add("d" * 24, now)
    cache.close()
    again = NonceCache(window=30)
    again.persist(path)
    assert not again.add("d" * 24, now + 1) and not again.add("a" * 24, now + 1)
    assert b"c" * 3 not in open(path, "rb").read()
    monkeypatch.setattr(ci.security, "NONCE_COMPACT_LINES", 100)
    for i in range(1000):  # each outlives the window by the next one
        assert again.add(f"{i:024x}", now + 100 * i)
    lines = open(path, "rb").read().count(b"\n")
    assert lines <= 200, lines
    again.close()


@pytest.mark.skipif(boot_id() is None, reason="no boot id on this system")
def test_after_a_machine_restart_frames_sent_before_it_wait_one_window(tmp_path):
    """Nonces are written without fsync, so a machine crash may lose the
    last ones: after a restart (a new boot id) frames stamped before the
    start are refused, as busy, for one window; later ones are served."""
    path = tmp_path / "dispatcher-nonces"
    path.write_bytes(b"boot 00000000-0000-0000-0000-000000000000\n")
    cache = NonceCache(window=30)
    cache.persist(str(path))
    now = time.time()
    with pytest.raises(Busy, match="restarted"):
        cache.add("f" * 24, now, sent=now - 10)
    assert cache.add("f" * 24, now, sent=now + 1)  # a clock a little ahead
    assert cache.add("e" * 24, now + 31, sent=now - 1)  # a window later: stale anyway
    cache.close()
    again = NonceCache(window=30)
    again.persist(str(path))  # the same boot: no restart, no refusal
    assert again.add("d" * 24, now, sent=now - 20)
    again.close()


def test_a_nonce_that_cannot_be_written_is_refused_for_now(tmp_path):
    """Accepting a nonce the file does not hold would let its frame be
    replayed after a restart: the sender is told busy instead."""
    cache = NonceCache(window=30)
    cache.persist(str(tmp_path / "runner-nonces"))
    os.close(cache._fd)
    cache._fd = os.open(os.devnull, os.O_RDONLY)
    with pytest.raises(Busy):
        cache.add("e" * 24, time.time())
    cache.close()


@pytest.mark.parametrize("line", [
    b"", b"CI1", b"CI2 5 1.0 abcdefgh -", b"CI1 5 1.0 abcdefgh", b"CI1 5 1.0 abcdefgh - x",
    b"CI1 -5 1.0 abcdefgh -", b"CI1 five 1.0 abcdefgh -", b"CI1 1234567890123 1.0 abcdefgh -",
    b"CI1 5 now abcdefgh -", b"CI1 5 1.0 ABCDEFGH -", b"CI1 5 1.0 abc -",
    b"CI1 5 1.0 abcdefgh xyz", b"CI1 5 1.0 abcdefgh " + b"a" * 63,
    b"CI1  5 1.0 abcdefgh -", b"CI1 5 1.0 abcdefgh -\r",
])
def test_decode_header_refuses_malformed_lines(line):
    with pytest.raises(ProtocolError):
        decode_header(line)


def test_decode_header_enforces_the_size_limit():
    line = encode_frame(b"x" * 1001, None).partition(b"\n")[0]
    assert decode_header(line, max_message=1001).length == 1001
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_header(line, max_message=1000)


# --------------------------------------------------------------------------
# Addresses and commit ids.

@pytest.mark.parametrize("text, expected", [
    ("localhost:8888", ("localhost", 8888)),
    ("127.0.0.1:1", ("127.0.0.1", 1)),
    ("ci.example.org:65535", ("ci.example.org", 65535)),
    ("[::1]:8000", ("::1", 8000)),
    ("[fe80::1%eth0]:9", ("fe80::1%eth0", 9)),
    (":8900", ("localhost", 8900)),
])
def test_parse_address_accepts(text, expected):
    assert parse_address(text) == expected
    assert parse_address(format_address(expected)) == expected


@pytest.mark.parametrize("text", [
    "", "localhost", "localhost:", "localhost:0", "localhost:65536", "localhost:http",
    "localhost:-1", "local host:80", "a;rm -rf:80", "host:80\n", "h\u00f6st:80",
    "x" * 400 + ":80", None, 8080,
])
def test_parse_address_refuses(text):
    with pytest.raises(ValueError):
        parse_address(text)


@pytest.mark.parametrize("text, short_ok, full_ok", [
    (COMMIT, True, True),
    ("a" * 64, True, True),
    ("abcd", True, False),
    ("abc", False, False),
    ("a" * 65, False, False),
    (COMMIT.upper(), False, False),
    (COMMIT[:-1] + "g", False, False),
    (COMMIT + "\n", False, False),
    ("-" + COMMIT[1:], False, False),
    ("../" + COMMIT, False, False),
    ("", False, False),
    (None, False, False),
])
def test_valid_commit(text, short_ok, full_ok):
    assert valid_commit(text) is short_ok
    assert valid_full_commit(text) is full_ok


# --------------------------------------------------------------------------
# Fields and result files.

def test_fields_round_trip_and_flatten_to_one_line():
    fields = {"verdict": "error", "reason": "a: b: c", "runner": "[::1]:8901",
              "tests": 3, "unicode": "caf\u00e9 \u2713", "empty": ""}
    decoded = decode_fields(encode_fields(fields))
    assert decoded == {k: str(v) for k, v in fields.items()}
    injected = decode_fields(encode_fields(
        {"reason": "first\nverdict: passed\r\n\x00\x1b[0m"}))
    assert list(injected) == ["reason"]
    assert "\n" not in injected["reason"] and "verdict: passed" in injected["reason"]


def test_decode_fields_accepts_numbered_keys():
    # The observer's status lists its branches as branch_0, branch_1, ...
    data = encode_fields({"polls": 3, "branch_0": f"main {COMMIT}", "branch_1": "x -"})
    assert decode_fields(data) == {"polls": "3", "branch_0": f"main {COMMIT}",
                                           "branch_1": "x -"}


@pytest.mark.parametrize("data", [
    b"no separator", b"Key: x", b"key:x", b"k-ey: x", b": x", b"0key: x", b"a" * 33 + b": x",
    NOT_UTF8 + b": x", b"k: " + NOT_UTF8,
])
def test_decode_fields_refuses_malformed(data):
    with pytest.raises(ProtocolError):
        decode_fields(data)


def test_decode_fields_caps_the_number_of_fields():
    data = b"".join(b"k%s: v\n" % bytes([97 + i]) for i in range(9))
    assert len(decode_fields(data)) == 9
    with pytest.raises(ProtocolError, match="too many"):
        decode_fields(data, max_fields=8)


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


# --------------------------------------------------------------------------
# The runner's judging, on output captured from real unittest and pytest runs
# (Python 3.11, pytest 9), trimmed of nothing that matters to the parser.

UNITTEST_MIXED = b"""EF.s
======================================================================
ERROR: test_err (test_a.T.test_err)
----------------------------------------------------------------------
Traceback (most recent call last):
  File "/home/dev/project/tests/test_a.py", line 9, in test_err
    raise RuntimeError("boom")
RuntimeError: boom

======================================================================
FAIL: test_fail (test_a.T.test_fail)
----------------------------------------------------------------------
Traceback (most recent call last):
  File "/home/dev/project/tests/test_a.py", line 7, in test_fail
    self.assertEqual(1, 2)
AssertionError: 1 != 2

----------------------------------------------------------------------
Ran 4 tests in 0.001s

FAILED (failures=1, errors=1, skipped=1)
"""

UNITTEST_OK_SKIPPED = b""".s
----------------------------------------------------------------------
Ran 2 tests in 0.000s

OK (skipped=1)
"""

UNITTEST_ONE_TEST_OK = b""".
----------------------------------------------------------------------
Ran 1 test in 0.000s

OK
"""

UNITTEST_IMPORT_FAILURE = b"""E
======================================================================
ERROR: test_b (unittest.loader._FailedTest.test_b)
----------------------------------------------------------------------
ImportError: Failed to import test module: test_b
Traceback (most recent call last):
  File "/usr/lib/python3.11/unittest/loader.py", line 419, in _find_test_path
    module = self._get_module_from_name(name)
  File "/usr/lib/python3.11/unittest/loader.py", line 362, in _get_module_from_name
    __import__(name)
  File "/home/dev/project/tests/test_b.py", line 1, in <module>
    import nosuchmodule_xyz
ModuleNotFoundError: No module named 'nosuchmodule_xyz'


----------------------------------------------------------------------
Ran 1 test in 0.000s

FAILED (errors=1)
"""

UNITTEST_NO_TESTS = b"""
----------------------------------------------------------------------
Ran 0 tests in 0.000s

OK
"""

PYTEST_Q_MIXED = b"""FF.s                                                                     [100%]
=================================== FAILURES ===================================
__________________________________ T.test_err __________________________________
E       RuntimeError: boom
tests/test_a.py:9: RuntimeError
=========================== short test summary info ============================
FAILED tests/test_a.py::T::test_err - RuntimeError: boom
FAILED tests/test_a.py::T::test_fail - AssertionError: 1 != 2
2 failed, 1 passed, 1 skipped in 0.78s
"""

PYTEST_FULL_WITH_ERROR = b"""============================= test session starts ==============================
collected 5 items

tests/test_p.py .FEsx                                                    [100%]

==================================== ERRORS ====================================
______________________ ERROR at setup of test_uses_broken ______________________
E       RuntimeError: fixture boom
=========================== short test summary info ============================
FAILED tests/test_p.py::test_fail - assert 1 == 2
ERROR tests/test_p.py::test_uses_broken - RuntimeError: fixture boom
========== 1 failed, 1 passed, 1 skipped, 1 xfailed, 1 error in 0.83s ==========
"""

PYTEST_OK_WARNINGS = b""".s..                                                     [100%]
=============================== warnings summary ===============================
tests/test_w.py::test_w
  DeprecationWarning: old
3 passed, 1 skipped, 2 warnings in 65.12s (0:01:05)
"""

PYTEST_COLLECTION_ERROR = b"""
==================================== ERRORS ====================================
_______________________ ERROR collecting tests/test_b.py _______________________
ImportError while importing test module '/home/dev/project/tests/test_b.py'.
Hint: make sure your test modules/packages have valid Python names.
E   ModuleNotFoundError: No module named 'nosuchmodule_xyz'
=========================== short test summary info ============================
ERROR tests/test_b.py
!!!!!!!!!!!!!!!!!!!! Interrupted: 1 error during collection !!!!!!!!!!!!!!!!!!!!
1 error in 0.74s
"""


@pytest.mark.parametrize("output, expected", [
    pytest.param(UNITTEST_MIXED, (4, 1, 1, 1), id="unittest-mixed"),
    pytest.param(UNITTEST_OK_SKIPPED, (2, 0, 0, 1), id="unittest-skipped"),
    pytest.param(UNITTEST_ONE_TEST_OK, (1, 0, 0, 0), id="unittest-one-test"),
    pytest.param(UNITTEST_IMPORT_FAILURE, (1, 0, 1, 0), id="unittest-import-failure"),
    pytest.param(UNITTEST_NO_TESTS, (0, 0, 0, 0), id="unittest-no-tests"),
    pytest.param(PYTEST_Q_MIXED, (4, 2, 0, 1), id="pytest-q-mixed"),
    pytest.param(PYTEST_FULL_WITH_ERROR, (5, 1, 1, 1), id="pytest-setup-error"),
    pytest.param(PYTEST_OK_WARNINGS, (4, 0, 0, 1), id="pytest-warnings"),
    pytest.param(PYTEST_COLLECTION_ERROR, (1, 0, 1, 0), id="pytest-collection-error"),
])
def test_parse_counts_on_real_output(output, expected):
    counts = parse_counts(output)
    assert counts.found
    assert (counts.tests, counts.failures, counts.errors, counts.skipped) == expected
    # The same invariant unittest keeps: every failure, error and skip is a test.
    assert counts.failures + counts.errors + counts.skipped <= counts.tests


def test_parse_counts_last_summary_wins_over_text_printed_by_tests():
    fake = b"Ran 99 tests in 0.1s\n\nOK\n99 passed in 0.01s\n"
    counts = parse_counts(fake + UNITTEST_MIXED)
    assert (counts.tests, counts.failures, counts.errors) == (4, 1, 1)
    counts = parse_counts(fake + PYTEST_Q_MIXED)
    assert (counts.tests, counts.failures) == (4, 2)


@pytest.mark.parametrize("output", [b"", b"hello\n", NOT_UTF8, b"Ran many tests\nOK\n",
                                    b"no tests ran in 0.70s\n"],
                         ids=["empty", "text", "not-utf8", "no-time", "pytest-no-tests"])
def test_parse_counts_without_a_summary(output):
    counts = parse_counts(output)
    assert not counts.found
    assert (counts.tests, counts.failures, counts.errors, counts.skipped) == (0, 0, 0, 0)


@pytest.mark.parametrize("code, timed_out, output, verdict, reason_part", [
    pytest.param(0, False, UNITTEST_OK_SKIPPED, "passed", "", id="unittest-ok"),
    pytest.param(0, False, PYTEST_OK_WARNINGS, "passed", "", id="pytest-ok"),
    pytest.param(0, False, b"no summary at all\n", "passed", "", id="exit-0-no-summary"),
    pytest.param(1, False, UNITTEST_MIXED, "failed", "", id="unittest-failed"),
    pytest.param(1, False, PYTEST_Q_MIXED, "failed", "", id="pytest-failed"),
    pytest.param(1, False, PYTEST_FULL_WITH_ERROR, "failed", "", id="pytest-setup-error"),
    pytest.param(1, False, UNITTEST_IMPORT_FAILURE, "error", "imported",
                 id="unittest-import-failure"),
    pytest.param(2, False, PYTEST_COLLECTION_ERROR, "error", "imported",
                 id="pytest-collection-error"),
    pytest.param(1, False, b"Traceback (most recent call last):\nSystemExit: 1\n", "error",
                 "exited 1", id="nonzero-no-summary"),
    pytest.param(-11, False, b"Segmentation fault\n", "error", "exited -11", id="signal"),
    # A suite that said OK and then exited non-zero (atexit crash) is no pass.
    pytest.param(1, False, UNITTEST_ONE_TEST_OK, "error", "exited 1", id="ok-but-exit-1"),
    pytest.param(-9, True, UNITTEST_ONE_TEST_OK, "timeout", "time limit", id="timeout"),
    pytest.param(-9, True, b"", "timeout", "time limit", id="timeout-no-output"),
    pytest.param(0, True, UNITTEST_ONE_TEST_OK, "timeout", "time limit",
                 id="timeout-wins-over-exit-0"),
])
def test_classify(code, timed_out, output, verdict, reason_part):
    got, counts, reason = judge(code, timed_out, output)
    assert got == verdict
    assert got in VERDICTS
    assert (reason == "") == (reason_part == "")
    assert reason_part in reason


def test_default_test_command(tmp_path):
    os.makedirs(tmp_path / "tests")
    command = default_test_command(str(tmp_path))
    assert command == [sys.executable, "-m", "unittest", "discover", "-s", "tests"]
    (tmp_path / "tests" / "__init__.py").write_text("")
    command = default_test_command(str(tmp_path))
    assert command == [sys.executable, "-m", "unittest", "discover", "-s", "tests", "-t", "."]


def test_read_bounded_returns_small_output_whole():
    data = UNITTEST_MIXED + NOT_UTF8
    assert read_bounded(io.BytesIO(data), len(data)) == data
    assert read_bounded(io.BytesIO(b""), 10) == b""


def test_read_bounded_keeps_head_and_summary_of_huge_output():
    data = b"HEAD-START\n" + NOT_UTF8 * 100_000 + UNITTEST_MIXED
    limit = 100_000
    got = read_bounded(io.BytesIO(data), limit)
    assert len(got) <= limit
    assert got.startswith(b"HEAD-START\n")
    assert got.endswith(UNITTEST_MIXED)
    assert b"output truncated by the runner" in got
    assert b"of %d bytes omitted" % len(data) in got
    # The summary survives truncation, so the counts still come out right.
    counts = parse_counts(got)
    assert (counts.tests, counts.failures, counts.errors) == (4, 1, 1)


def test_child_env_hides_the_secret_and_unbuffers_output(monkeypatch):
    monkeypatch.setenv("CI_SECRET", "s3cret")
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    env = child_env()
    assert "CI_SECRET" not in env
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"] == os.environ["PATH"]


@given(st.binary(min_size=1, max_size=200), st.lists(st.binary(max_size=300), max_size=5))
def test_own_hmac_equals_the_standard_library(key, parts):
    """wire signs with CPython's built-in SHA-256 when hashlib is not loaded
    (a hook's fast start): the tag must be exactly hmac's."""
    import hashlib
    import hmac
    from ci import wire
    assert wire._hmac_sha256(key, parts) == \
        hmac.new(key, b"".join(parts), hashlib.sha256).hexdigest()
