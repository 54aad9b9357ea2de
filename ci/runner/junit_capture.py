"""The runner's side of per-test results: make the test command leave a
JUnit file, then read it back as untrusted input.

* ``python -m unittest ARGS`` (the default command) runs as
  ``python ci_support/unittest_recorder.py TMP.xml ARGS``: the same run and
  output, plus a record per test.
* A pytest command (an argument named ``pytest``) gets ``--junitxml=TMP.xml``.
* Any other command names its own files with ``--junit-xml PATTERN`` (a glob
  relative to the clone); without one nothing is collected, as before.

The command line itself is built by ``command_line``; this module gives
it the report file and reads what the run left.

The temporary file lives in a private folder outside the clone and is
removed afterwards.  Whatever is found is capped and parsed (the
recorder's records file by ``results.parse_records``, any JUnit XML by
``junit_xml.parse_junit``) and sent on as records in our own format, with
the same records as schema-valid JUnit XML (``junit_xml.format_junit``)
for older dispatchers when both fit.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import tempfile

from ci import junit_xml
from ci import results
from ci.files import read_inside, remove_quietly

log = logging.getLogger(__name__)

# The repository root: this file is ci/runner/junit_capture.py.
RECORDER = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "ci_support", "unittest_recorder.py")


def use_recorder(path: str) -> None:
    """Run the recorder from ``path`` from now on: with --test-user, the
    runner's copy in its state folder, which the test user can read when
    the runner's own code lies where it cannot (see sandbox.access).  One
    runner per process, so one module-wide setting."""
    global RECORDER
    RECORDER = path


# Files a --junit-xml pattern may match: enough for one file per test module.
MAX_FILES = 200


# The recorder writes every record, in our own format, beside its XML.
RECORDS_SUFFIX = ".records"


@dataclasses.dataclass
class Collected:
    """What a run's JUnit files gave: the records to send (None if none;
    tracebacks shortened to fit), the XML of them for older dispatchers
    (b"" if it did not fit too), the counts taken from them (None: keep
    the summary's) and the ``junit`` header note ("" when all went well)."""
    records: list | None = None
    xml: bytes = b""
    counts: dict | None = None
    note: str = ""
    size: int = 0  # the bytes the records part and the XML take in the body

    def fields(self) -> dict:
        """The header fields to add (the records go as ``Outcome.records``)."""
        return {"junit": self.note} if self.note else {}


class Capture:
    """One test run's JUnit capture: the report file the command is told
    to write (``command_line`` tells it), or the ``--junit-xml`` pattern it
    writes to by itself; use as a context manager so the temporary folder
    is always removed."""

    def __init__(self, repo: str, pattern: str | None = None, scratch: str | None = None):
        self.repo = repo
        self.pattern = pattern
        self.scratch = scratch      # where its folder goes (None: the system's temp)
        self.paths: list[str] = []
        self.tmp: str | None = None

    def report_file(self) -> str:
        """A fresh file for the command to write its report to, in a
        private folder outside the clone."""
        self.tmp = tempfile.mkdtemp(prefix="ci-junit-", dir=self.scratch)
        self.paths = [os.path.join(self.tmp, "results.xml")]
        return self.paths[0]

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc) -> None:
        if self.tmp:
            remove_quietly(self.tmp)
            self.tmp = None

    @property
    def active(self) -> bool:
        return bool(self.pattern or self.paths)

    def _files(self) -> list[str]:
        if not self.pattern:
            return self.paths
        found = glob.glob(os.path.join(glob.escape(self.repo), self.pattern), recursive=True)
        return sorted(found)[:MAX_FILES + 1]

    def collect(self, timed_out: bool, budget: int) -> Collected:
        """Read, check and re-write what the run left.  A killed run's
        files are not used: it never printed its summary either."""
        if not self.active or timed_out:
            return Collected()
        files = self._files()
        if not files or not all(os.path.lexists(path) for path in files):
            log.warning("test command left no JUnit file (%s)", self.pattern or "expected one")
            return Collected(note="missing")
        if len(files) > MAX_FILES:
            log.warning("more than %d JUnit files match %s", MAX_FILES, self.pattern)
            return Collected(note="unreadable")
        shards = []
        for path in files:
            try:
                shards.append(self._read(path))
            except (OSError, results.JunitError) as exc:
                log.warning("JUnit file %s unreadable: %s", os.path.basename(path), exc)
                return Collected(note="unreadable")
        records = [_unclaimed(r) for r in results.merge_records(shards)]
        if len(records) > results.MAX_RECORDS:
            log.warning("%d test records: more than %d", len(records), results.MAX_RECORDS)
            return Collected(note="unreadable")
        collected = fit(records, budget)
        if collected is None:
            log.warning("JUnit results of %d records do not fit in %d bytes", len(records),
                        budget)
            return Collected(note="too large")
        return collected

    def _read(self, path: str) -> list[results.TestRecord]:
        """One file's records: the recorder's own records file beside its
        XML when there is one (it knows subtests and fixtures), else the XML."""
        if self.pattern:
            return junit_xml.parse_junit(read_untrusted(path, self.repo))
        if os.path.lexists(path + RECORDS_SUFFIX):
            data = read_inside(path + RECORDS_SUFFIX, self.tmp, results.MAX_RECORDS_BYTES + 1)
            return results.parse_records(data)
        return junit_xml.parse_junit(read_untrusted(path, self.tmp))


def _unclaimed(record: results.TestRecord) -> results.TestRecord:
    """``record`` without what only the runner may say of a test: the
    recipe quarantines and the runner's own reruns make a test flaky
    (ci/runner/reruns.py), so a quarantine mark or a flaky outcome the
    tested commit's files claim (Surefire's ``flakyFailure``, or a forged
    records file) is taken off.  Left on, a flaky record explained any
    exit status 1: a failing lint step beside a retried test passed."""
    if record.outcome == results.FLAKY:
        return dataclasses.replace(record, outcome=results.PASSED, message="", traceback="",
                                   quarantined=False)
    if record.quarantined:
        return dataclasses.replace(record, quarantined=False)
    return record


def read_untrusted(path: str, inside: str) -> bytes:
    """A JUnit file the tests wrote, at most MAX_JUNIT_BYTES + 1 bytes."""
    return read_inside(path, inside, results.MAX_JUNIT_BYTES + 1)


def fit(records: list[results.TestRecord], budget: int) -> Collected | None:
    """The records to send within ``budget`` bytes, tracebacks shortened
    if they must be (the message of each stays), with their XML for older
    dispatchers when that fits too; None if even the records do not."""
    for limit in junit_xml.TRACEBACK_STEPS:
        size = len(results.format_records(records, limit))
        if size <= budget:
            break
    else:
        return None
    records = results.shorten(records, limit)
    room = min(budget - size, results.MAX_JUNIT_BYTES)
    # The XML of records is always longer than their records part: when
    # that does not fit in what is left, it is not even tried.
    xml = junit_xml.fit_junit(records, room) or b"" if room >= size else b""
    return Collected(records, xml, results.count_records(records), size=size + len(xml))


def check_pattern(pattern: str) -> str:
    """``--junit-xml``: a glob inside the clone; ValueError otherwise."""
    parts = pattern.replace("\\", "/").split("/")
    if not pattern or os.path.isabs(pattern) or ".." in parts:
        raise ValueError(f"--junit-xml {pattern!r} must be a pattern inside the clone "
                         "(relative, no '..')")
    return pattern
