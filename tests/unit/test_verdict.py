"""The runner's judging as pure functions, on output captured from real
unittest and pytest runs (Python 3.11, pytest 9): the counts a summary
gives (the last one wins over text a test prints), the verdict from exit
status, timeout and counts, and bounded reading that keeps the summary."""

from __future__ import annotations

import io

import pytest

from ci.results import VERDICTS
from ci.runner.pipeline import read_bounded
from ci.runner.verdict import judge, parse_counts


NOT_UTF8 = b"\xff\xfe\xc3\x28\xa0\xa1\xe2\x28\xa1\xf0\x28\x8c\xbc\x80\x00"

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
    # The status lost in a pipe (``... | tee log``): the summary still says
    # failed, and a header said "passed" beside "failures: 2".
    pytest.param(0, False, UNITTEST_MIXED, "failed", "exited 0, but its summary",
                 id="exit-0-unittest-failed"),
    pytest.param(0, False, PYTEST_Q_MIXED, "failed", "exited 0, but its summary",
                 id="exit-0-pytest-failed"),
])
def test_classify(code, timed_out, output, verdict, reason_part):
    got, counts, reason = judge(code, timed_out, output)
    assert got == verdict
    assert got in VERDICTS
    assert (reason == "") == (reason_part == "")
    assert reason_part in reason


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


UNEXPECTED_SUCCESS = (b"u\n" + b"=" * 70 + b"\nUNEXPECTED SUCCESS: test_a (t.T.test_a)\n"
                      + b"-" * 70 + b"\nRan 2 tests in 0.001s\n\n"
                      b"FAILED (skipped=1, unexpected successes=1)\n")


def test_unexpected_success_is_a_failed_test_not_an_error():
    """unittest fails a run with an unexpected success (exit 1): the tests
    ran and one of them failed, so the verdict is ``failed``."""
    verdict, counts, reason = judge(1, False, UNEXPECTED_SUCCESS)
    assert (verdict, counts.tests, counts.failures, counts.skipped) == ("failed", 2, 1, 1)
    assert reason == ""


def test_pytest_summary_with_plugin_outcomes_still_counts():
    output = (b"F.R\n=========== short test summary info ===========\n"
              b"FAILED tests/test_x.py::test_a - assert 1 == 2\n"
              b"==== 1 failed, 1 passed, 1 rerun, 2 warnings in 0.31s ====\n")
    verdict, counts, _ = judge(1, False, output)
    assert verdict == "failed"
    assert (counts.tests, counts.failures) == (2, 1)
