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
removed afterwards.  Whatever is found is capped, parsed by
``results.parse_junit`` and sent on re-written by ``results.format_junit``.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import shutil
import tempfile

from ci import results
from ci.files import read_inside

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


@dataclasses.dataclass
class Collected:
    """What a run's JUnit files gave: the XML to send (b"" if none), the
    counts taken from its records (None: keep the summary's), the
    ``junit`` header note ("" when all went well) and the records (None:
    none could be used)."""
    xml: bytes = b""
    counts: dict | None = None
    note: str = ""
    records: list[results.TestRecord] | None = None

    def fields(self) -> dict:
        """The header fields to add (the XML goes as ``Outcome.junit_xml``)."""
        return {"junit": self.note} if self.note else {}


class Capture:
    """One test run's JUnit capture: the report file the command is told
    to write (``command_line`` tells it), or the ``--junit-xml`` pattern it
    writes to by itself; use as a context manager so the temporary folder
    is always removed."""

    def __init__(self, repo: str, pattern: str | None = None):
        self.repo = repo
        self.pattern = pattern
        self.paths: list[str] = []
        self.tmp: str | None = None

    def report_file(self) -> str:
        """A fresh file for the command to write its report to, in a
        private folder outside the clone."""
        self.tmp = tempfile.mkdtemp(prefix="ci-junit-")
        self.paths = [os.path.join(self.tmp, "results.xml")]
        return self.paths[0]

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
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
                data = read_untrusted(path, self.repo if self.pattern else self.tmp)
                shards.append(results.parse_junit(data))
            except (OSError, results.JunitError) as exc:
                log.warning("JUnit file %s unreadable: %s", os.path.basename(path), exc)
                return Collected(note="unreadable")
        records = results.merge_records(shards)
        if len(records) > results.MAX_RECORDS:
            log.warning("%d test records: more than %d", len(records), results.MAX_RECORDS)
            return Collected(note="unreadable")
        # The dispatcher reads no larger document.
        xml = fit(records, min(budget, results.MAX_JUNIT_BYTES))
        if xml is None:
            log.warning("JUnit results of %d records do not fit in %d bytes", len(records),
                        budget)
            return Collected(note="too large")
        return Collected(xml, results.count_records(records), records=records)


def read_untrusted(path: str, inside: str) -> bytes:
    """A JUnit file the tests wrote, at most MAX_JUNIT_BYTES + 1 bytes."""
    return read_inside(path, inside, results.MAX_JUNIT_BYTES + 1)


def fit(records: list[results.TestRecord], budget: int) -> bytes | None:
    """The records as XML within ``budget`` bytes, shortening tracebacks
    if it must (the message of each stays); None if even that is too big."""
    for limit in (results.TRACEBACK_LIMIT, 1000, 200, 0):
        xml = results.format_junit(records, traceback_limit=limit)
        if len(xml) <= budget:
            return xml
    return None


def check_pattern(pattern: str) -> str:
    """``--junit-xml``: a glob inside the clone; ValueError otherwise."""
    parts = pattern.replace("\\", "/").split("/")
    if not pattern or os.path.isabs(pattern) or ".." in parts:
        raise ValueError(f"--junit-xml {pattern!r} must be a pattern inside the clone "
                         "(relative, no '..')")
    return pattern
