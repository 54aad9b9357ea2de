"""Judging a test run: its counts read from the output's last unittest or
pytest summary, and its verdict from the exit status, a time-out and
those counts.  Pure functions: the output is the tested commit's and is
only read."""

from __future__ import annotations

import dataclasses
import re

from ci.results import FAILING, FLAKY, TestRecord

@dataclasses.dataclass
class Counts:
    """What a run's summary (or its test records) says was run."""
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    found: bool = False


UNITTEST_RAN = re.compile(rb"^Ran (\d+) tests? in [\d.]+s\s*$", re.M)
UNITTEST_STATUS = re.compile(rb"^(OK|FAILED)(?: \(([^)\n]*)\))?\s*$", re.M)
# Any "N word" list: plugins add outcomes of their own (e.g. "2 rerun").
PYTEST_SUMMARY = re.compile(rb"^=*\s*((?:\d+ [a-z]+(?:, )?)+) in [\d.]+s", re.M)
IMPORT_FAILURE_MARKERS = (b"unittest.loader._FailedTest", b"Failed to import test module",
                          b"ERROR collecting", b"ImportError while importing test module")


def parse_counts(output: bytes) -> Counts:
    """Read the test counts from the last unittest or pytest summary.

    The last summary wins, so text printed by the tests themselves earlier
    in the output cannot change the counts."""
    counts = Counts()
    ran = list(UNITTEST_RAN.finditer(output))
    summary = list(PYTEST_SUMMARY.finditer(output))
    if ran and (not summary or ran[-1].start() > summary[-1].start()):
        counts.tests, counts.found = int(ran[-1].group(1)), True
        status = [m for m in UNITTEST_STATUS.finditer(output) if m.start() > ran[-1].start()]
        if status and status[0].group(2):
            for part in status[0].group(2).split(b","):
                name, _, value = part.strip().partition(b"=")
                if value.isdigit():
                    # An unexpected success fails a unittest run (exit 1) as
                    # a failure does; without it the verdict was "error".
                    if name in (b"failures", b"unexpected successes"):
                        counts.failures += int(value)
                    elif name == b"errors":
                        counts.errors = int(value)
                    elif name == b"skipped":
                        counts.skipped = int(value)
        return counts
    if summary:
        counts.found = True
        for part in summary[-1].group(1).split(b", "):
            value, _, name = part.partition(b" ")
            number = int(value)
            if name in (b"passed", b"xfailed", b"xpassed"):
                counts.tests += number
            elif name == b"failed":
                counts.tests += number
                counts.failures = number
            elif name == b"skipped":
                counts.tests += number
                counts.skipped = number
            elif name in (b"error", b"errors"):
                # Counted as tests, as unittest counts its errors in "Ran N".
                counts.tests += number
                counts.errors = number
    return counts


def judge(exit_code: int, timed_out: bool, output: bytes,
          known: dict | None = None) -> tuple[str, Counts, str]:
    """Return (verdict, counts, reason).  ``passed`` only for exit status 0.
    ``known`` counts (from per-test records) replace the summary's.
    (Not ``ci.notify.decider.classify``, which names a change of verdict.)"""
    counts = parse_counts(output) if known is None else Counts(found=True, **known)
    if timed_out:
        return "timeout", counts, "test command exceeded the time limit and was killed"
    if exit_code == 0:
        if known is None and counts.found and (counts.failures or counts.errors):
            # The status was lost on the way (``cmd | tee log`` exits with
            # tee's); the summary, the last one printed, still says failed.
            # A test can print a fake summary only before the real one, so
            # this can make a pass a failure, never a failure a pass.
            return "failed", counts, ("the test command exited 0, but its summary reports "
                                      "failing tests (was its exit status lost in a pipe?)")
        return "passed", counts, ""
    if any(marker in output for marker in IMPORT_FAILURE_MARKERS):
        return "error", counts, "test modules could not be imported (see output)"
    if counts.found and (counts.failures or counts.errors):
        return "failed", counts, ""
    return "error", counts, f"test command exited {exit_code} without reporting failing tests"


def judge_records(exit_code: int, timed_out: bool, output: bytes,
                  records: list[TestRecord], stopped: str = "") -> tuple[str, str]:
    """(verdict, reason) of a run with per-test records, after its reruns
    and quarantine: the tests that failed every time and are not
    quarantined decide, not the exit status.  Yet a command that failed
    is never ``passed`` unless its records explain it (a flaky or a
    quarantined failure, and the exit status tests failing give, 1): a
    crash, or a failure outside any test, still fails the commit as
    ``judge`` says.  Nor is a run that ``stopped`` before its last test
    (failfast, ``-x``): the tests it did not reach may fail."""
    if timed_out:
        return "timeout", "test command exceeded the time limit and was killed"
    if any(r.outcome in FAILING and not r.quarantined for r in records):
        if any(marker in output for marker in IMPORT_FAILURE_MARKERS):
            return "error", "test modules could not be imported (see output)"
        return "failed", ""
    explained = any(r.outcome == FLAKY or (r.quarantined and r.outcome in FAILING)
                    for r in records)
    if explained and stopped:
        return "error", (f"the run stopped at a flaky or quarantined failure ({stopped}): "
                         "the tests after it did not run")
    if exit_code == 0 or (explained and exit_code == 1):
        return "passed", ""
    verdict, _, reason = judge(exit_code, False, output, {})
    return verdict, reason
