"""The result formats, as pure functions: the text result file
(``test_results/<commit>``: ``key: value`` header, blank line, raw output),
per-test records (``TestRecord``, their counts, and the records format a
runner sends them in), and the result files' names.  JUnit XML is in
ci/junit_xml.py; the ``results`` message body, and the one value a run's
result travels as, in ci/outcome.py.

The text file stays the source of truth; the XML is written before it and
its counts are the text header's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
from collections.abc import Mapping
from ci.wire import ProtocolError, decode_fields, encode_fields, one_line, valid_full_commit

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Text result files: ``key: value`` header, blank line, raw test output.

RESULT_FIELDS = ("commit", "verdict", "tests", "failures", "errors", "skipped",
                 "flaky", "quarantined", "quarantined_failed", "quarantined_failing",
                 "runner", "started", "duration", "exit_code", "reason",
                 "branch", "previous", "subject", "author", "committed",
                 "setup", "setup_scope", "setup_duration",
                 "junit", "shards",
                 # Build matrices (ci/matrix.py): a commit's file lists its
                 # cells' verdicts; a cell's file says which cell it is.
                 "cells", "cell", "python", "axes", "labels",
                 # Failing tests first (ci/runner/ordering.py).
                 "failing_first", "first_failure_after",
                 # Merged results (issue 22, ci/mergeinfo.py): the commit is the
                 # merge of ``merge_head`` into ``<target-branch> <target-commit>``;
                 # a ``conflict`` verdict names the conflicting paths.
                 "merged_into", "merge_head", "conflicts")


def ordered_header(fields: Mapping) -> dict:
    """``fields`` in a result file header's order; ValueError for a key
    that is no result field (per-test records and XML have their own place,
    see ci/outcome.py: nothing else may ride in a header)."""
    unknown = sorted(str(key) for key in set(fields) - set(RESULT_FIELDS))
    if unknown:
        raise ValueError(f"not result fields: {', '.join(unknown)}")
    return {key: fields[key] for key in RESULT_FIELDS if key in fields}


def format_result(fields: Mapping, output: bytes) -> bytes:
    """A result file's bytes: the header in its order, a blank line, the
    output (``parse_result`` is the inverse)."""
    return encode_fields(ordered_header(fields)) + b"\n" + output


def parse_result(data: bytes) -> tuple[dict[str, str], bytes]:
    """Split a result file into its header fields and the test output: the
    one parser of the format (``read_header`` applies it to a file's first
    bytes; scripts, benchmarks and tests read whole files with it).
    ProtocolError when the header is malformed or not yet complete."""
    head, sep, output = data.partition(b"\n\n")
    if not sep:
        raise ProtocolError("result has no header/output separator")
    return decode_fields(head), output


# A header is a few short lines: this much of a file's start holds it.
HEADER_READ = 64 * 1024
# O_NOATIME where the system has it (read_header's keep_atime).
NOATIME = getattr(os, "O_NOATIME", 0)


def read_header(path: str, limit: int = HEADER_READ,
                keep_atime: bool = False) -> dict[str, str] | None:
    """The header fields of the result file at ``path``, reading only its
    first ``limit`` bytes (the output may be huge); None when the file is
    missing or unreadable, or has no complete header there yet.  The one
    reader of headers for the dashboard, the notifier and run_local.
    ``keep_atime``: leave the file's access time alone where the system
    lets this user (its owner); the pruner's plan reads every header, and
    under ``relatime`` each first read since a file was written sets its
    atime: 100,000 inodes to write back while results are being stored."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, flags | (NOATIME if keep_atime else 0))
        except PermissionError:
            if not keep_atime:
                raise
            fd = os.open(path, flags)
        try:
            # One read: a buffered file object would add an fstat, an ioctl,
            # an lseek and a second read (7 system calls a header, not 3).
            data = os.read(fd, limit)
        finally:
            os.close(fd)
        return parse_result(data)[0]
    except (OSError, ProtocolError):
        return None


# --------------------------------------------------------------------------
# Per-test records.

PASSED, FAILED, ERROR, SKIPPED, XFAIL, XPASS = (
    "passed", "failed", "error", "skipped", "xfail", "xpass")
# Failed, then passed when the runner ran it again (ci/runner/reruns.py).
FLAKY = "flaky"
OUTCOMES = (PASSED, FAILED, ERROR, SKIPPED, XFAIL, XPASS, FLAKY)
# The outcomes that fail a test (and, unless quarantined, its commit).
FAILING = (FAILED, ERROR, XPASS)
# What each outcome adds to the header's counts, as unittest counts them:
# an unexpected success fails the run (exit 1), an expected failure does not.
COUNTED_AS = {FAILED: "failures", XPASS: "failures", ERROR: "errors", SKIPPED: "skipped"}

# Record kinds.  A plain test counts once in ``tests``.  A subtest (or a
# second outcome of one test, such as a tearDown error after a failure) is
# one part of test ``classname.name``: its outcome counts, the test counts
# once.  A fixture (setUpClass, setUpModule...) counts its outcome and is
# no test, exactly as unittest's summary counts them.
TEST, SUBTEST, FIXTURE = "", "subtest", "fixture"
KINDS = (TEST, SUBTEST, FIXTURE)

# The limits keep 100,000 tests of one commit (with room for their subtest
# and fixture records) while bounding memory: a record in memory is about
# 250 bytes besides its text (slots, classnames shared), so 150,000 of them
# are under 40 MB, and their text is bounded by the byte caps (a document
# of at most MAX_JUNIT_BYTES, a records part of at most MAX_RECORDS_BYTES,
# which a --max-message-size of 16 MiB keeps to less).
MAX_JUNIT_BYTES = 32 * 1024 * 1024
MAX_RECORDS_BYTES = 32 * 1024 * 1024
MAX_RECORDS = 150_000
# Elements of any kind (properties, system-out...): bounds the parse's memory.
MAX_ELEMENTS = 600_000
NAME_LIMIT = 500
MESSAGE_LIMIT = 1000
TRACEBACK_LIMIT = 4000
# A duration past this is nonsense (or forged); a year is plenty.
MAX_DURATION = 366 * 86400.0


class JunitError(Exception):
    """A JUnit document we will not use (too large, a DTD, malformed...)."""


@dataclasses.dataclass(frozen=True, slots=True)
class TestRecord:
    __test__ = False  # not a test class, whatever pytest thinks of the name

    classname: str
    name: str
    outcome: str = PASSED
    duration: float = 0.0
    message: str = ""
    traceback: str = ""
    kind: str = TEST
    subtest: str = ""  # a subtest's own description, e.g. "(i=2)"
    # Matched by the recipe's ``quarantine``: recorded, but never decides
    # the verdict.
    quarantined: bool = False

    @property
    def id(self) -> str:
        """``module.Class.test`` (or pytest's ``tests.test_x.test``), plus a
        subtest's description."""
        base = f"{self.classname}.{self.name}" if self.classname else self.name
        return f"{base} {self.subtest}" if self.subtest else base


_XML_BAD = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _block(text: str, limit: int) -> str:
    """Multi-line untrusted text fit for XML: no characters XML forbids,
    and at most ``limit`` characters, a note of the cut among them (the
    end kept: it names the error), so cutting again changes nothing."""
    text = _XML_BAD.sub("?", text)
    if len(text) > limit:
        note = f"[... {len(text) - limit} characters cut ...]\n"
        text = note[:limit] + text[len(text) - max(limit - len(note), 0):]
    return text


def finite_number(value, default: float = 0.0) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return min(number, MAX_DURATION) if math.isfinite(number) and number >= 0 else default


def clean_record(record: TestRecord) -> TestRecord:
    """The record with every field flattened and capped (names one line)."""
    return TestRecord(
        # One string per class, however many of its tests there are.
        classname=sys.intern(one_line(record.classname, NAME_LIMIT)),
        name=one_line(record.name, NAME_LIMIT),
        outcome=record.outcome if record.outcome in OUTCOMES else ERROR,
        duration=round(finite_number(record.duration), 3),
        message=one_line(record.message, MESSAGE_LIMIT),
        traceback=_block(record.traceback, TRACEBACK_LIMIT),
        kind=record.kind if record.kind in KINDS else TEST,
        subtest=one_line(record.subtest, NAME_LIMIT) if record.kind == SUBTEST else "",
        quarantined=record.quarantined is True)


# Counts a header has only when they are not 0 (older results lack them).
EXTRA_COUNTS = ("flaky", "quarantined", "quarantined_failed")
# Failing quarantined tests a header names, at most (``quarantined_failing``),
# and the most characters of that field.
MAX_NAMED = 20
MAX_NAMED_CHARS = 4000


def count_records(records: list[TestRecord]) -> dict[str, int]:
    """``tests``, ``failures``, ``errors``, ``skipped`` as the JUnit
    document holds them (see the kinds above): every failure element, a
    quarantined test's too; a flaky test has none."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    tests, parts = set(), set()
    for record in records:
        if record.outcome in COUNTED_AS:
            counts[COUNTED_AS[record.outcome]] += 1
        if record.kind == TEST:
            counts["tests"] += 1
            tests.add((record.classname, record.name))
        elif record.kind == SUBTEST:
            parts.add((record.classname, record.name))
    counts["tests"] += len(parts - tests)
    return counts


def extra_counts(records: list[TestRecord]) -> dict[str, int]:
    """``flaky``, ``quarantined`` (records) and ``quarantined_failed``,
    each only when not 0."""
    extra = dict.fromkeys(EXTRA_COUNTS, 0)
    for record in records:
        extra["flaky"] += record.outcome == FLAKY
        if record.quarantined:
            extra["quarantined"] += 1
            extra["quarantined_failed"] += record.outcome in FAILING
    return {name: value for name, value in extra.items() if value}


def deciding_failures(records) -> list[str]:
    """The ids of the failing tests that decide a verdict (not flaky, not
    quarantined), each once, in record order."""
    return list(dict.fromkeys(r.id for r in records
                              if r.outcome in FAILING and not r.quarantined))


def quarantined_failing(records: list[TestRecord]) -> str:
    """The ``quarantined_failing`` header value: the ids of the failing
    quarantined tests as a JSON list (ids may hold any character), the
    first MAX_NAMED of them, then ``"+N more"``; "" when there are none."""
    return named_list(list(dict.fromkeys(r.id for r in records
                                         if r.quarantined and r.outcome in FAILING)))


def named_list(names: list[str], more: int = 0) -> str:
    """``names`` as a ``quarantined_failing`` value: the first MAX_NAMED
    within MAX_NAMED_CHARS, then ``"+N more"`` for the rest and ``more``
    (tests known to fail but not named); "" when there are none."""
    shown: list[str] = []
    for name in names[:MAX_NAMED]:
        if len(json.dumps([*shown, name, "+0000000 more"], ensure_ascii=False)) \
                > MAX_NAMED_CHARS:
            break
        shown.append(name)
    if len(shown) < len(names) or more:
        shown.append(f"+{len(names) - len(shown) + more} more")
    return json.dumps(shown, ensure_ascii=False) if names or more else ""


_MORE = re.compile(r"\+(\d{1,9}) more")


def merge_named(values: list[str | None]) -> str:
    """One ``quarantined_failing`` value from several (a matrix commit's
    cells'): their ids once each, in order, and what they could not name
    counted in the ``"+N more"`` (an id failing in two cells is one test;
    the unnamed ones of two cells may overlap, so N is at most that)."""
    names: list[str] = []
    more = 0
    for value in values:
        listed = named_failing(value) or []
        # Only a list's last entry can be the count (an id may read "+1 more").
        counted = _MORE.fullmatch(listed[-1]) if listed else None
        if counted:
            more += int(counted.group(1))
            listed = listed[:-1]
        names.extend(name for name in listed if name not in names)
    return named_list(names, more)


def named_failing(value: str | None) -> list[str] | None:
    """The ids of a ``quarantined_failing`` value, None if it is not one
    (a runner's, or a damaged file's)."""
    if value is None or len(value) > MAX_NAMED_CHARS or "\n" in value:
        return None
    try:
        names = json.loads(value)
    except (ValueError, RecursionError):     # json recurses: "[[[[..." past its depth
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return names


def record_fields(records: list[TestRecord]) -> dict:
    """The header fields per-test records decide: their counts, where
    ``failures`` and ``errors`` are those that decide the verdict (a
    quarantined test's are counted in ``quarantined_failed`` instead),
    and the failing quarantined tests' names."""
    fields: dict = count_records(records)
    for record in records:
        if record.quarantined and record.outcome in COUNTED_AS \
                and record.outcome in FAILING:
            fields[COUNTED_AS[record.outcome]] -= 1
    fields.update(extra_counts(records))
    named = quarantined_failing(records)
    if named:
        fields["quarantined_failing"] = named
    return fields


def merge_records(shards: list[list[TestRecord]]) -> list[TestRecord]:
    """One commit's records from several shards.  Counts add up as long as
    a test's parts never straddle two shards (shards split by module)."""
    return [record for shard in shards for record in shard]


# --------------------------------------------------------------------------
# Per-test records in a format of our own: what JUnit XML has no word for
# (a record's kind, a subtest's description, xfail and xpass) travels in it
# from the recorder to the runner and from the runner to the dispatcher.
# One JSON array a line, the fields in RECORD_FIELDS order with trailing
# defaults left out (about 60 bytes a passing test); a field added later
# goes at the end, and readers ignore positions they do not know.

# ``quarantined`` (matched by the recipe's quarantine) came later: records
# without it parse, as not quarantined.
RECORD_FIELDS = ("classname", "name", "outcome", "duration", "message", "traceback",
                 "kind", "subtest", "quarantined")
_DEFAULTS = tuple(getattr(TestRecord("", ""), field) for field in RECORD_FIELDS)


def shorten(records: list[TestRecord], traceback_limit: int) -> list[TestRecord]:
    """The records with tracebacks of at most ``traceback_limit``
    characters (0: none), to fit a budget."""
    if traceback_limit >= TRACEBACK_LIMIT:
        return list(records)
    return [dataclasses.replace(record, traceback=traceback_within(record, traceback_limit))
            for record in records]


def traceback_within(record: TestRecord, limit: int) -> str:
    return _block(record.traceback, limit) if limit and record.traceback else ""


def format_records(records: list[TestRecord], traceback_limit: int = TRACEBACK_LIMIT) -> bytes:
    """The records, one JSON line each (``parse_records`` reads them),
    tracebacks cut as ``shorten`` cuts them."""
    lines = []
    for record in records:
        values = [getattr(record, field) for field in RECORD_FIELDS]
        values[RECORD_FIELDS.index("traceback")] = traceback_within(record, traceback_limit)
        while values and values[-1] == _DEFAULTS[len(values) - 1]:
            values.pop()
        lines.append(json.dumps(values, separators=(",", ":")))
    return "".join(line + "\n" for line in lines).encode("utf-8")


def parse_records(data: bytes, max_bytes: int = MAX_RECORDS_BYTES,
                  max_records: int = MAX_RECORDS) -> list[TestRecord]:
    """The records of a ``format_records`` document, each cleaned and
    capped as any untrusted record; JunitError if it is too large, not
    UTF-8, has too many lines, or a line that is no array of the fields'
    types."""
    if len(data) > max_bytes:
        raise JunitError(f"records of {len(data)} bytes exceed the limit of {max_bytes}")
    try:
        # Split at newlines only: str.splitlines() also splits at U+0085
        # and U+2028, which a JSON string may hold as they are.
        lines = [line for line in data.decode("utf-8").split("\n") if line.strip()]
    except UnicodeDecodeError:
        raise JunitError("test records are not UTF-8") from None
    if len(lines) > max_records:
        raise JunitError(f"more than {max_records} test records")
    return [_record_of(line, number) for number, line in enumerate(lines, 1)]


_DECODER = json.JSONDecoder()
# Each field's type is its default's (a float field also takes an integer).
_TYPES = tuple(type(default) for default in _DEFAULTS)


def _record_of(line: str, number: int) -> TestRecord:
    try:
        values, end = _DECODER.raw_decode(line)
    except (ValueError, RecursionError):
        raise JunitError(f"test record {number} is not JSON") from None
    if not isinstance(values, list) or len(values) < 2 or line[end:].strip():
        raise JunitError(f"test record {number} is not an array of its fields")
    values = values[:len(RECORD_FIELDS)] + list(_DEFAULTS[len(values):])
    for value, kind in zip(values, _TYPES):
        if type(value) is not kind and not (kind is float and type(value) is int):
            raise JunitError(f"test record {number} has a field of the wrong type")
    return clean_record(TestRecord(*values))


# --------------------------------------------------------------------------
# JUnit XML: writing.


# --------------------------------------------------------------------------
# JUnit XML: reading untrusted documents.


# --------------------------------------------------------------------------
# Where the dispatcher writes a commit's records.

# A matrix cell's files lie beside its commit's: <commit>.cell.<name>(.xml).
CELL_INFIX = ".cell."
# Cells of one matrix commit read from its ``cells:`` field, at most (as
# many as the dashboard lists).
MAX_HEADER_CELLS = 256


def result_name(commit: str, cell: str = "") -> str:
    """The file name of a commit's result, or of one of its cells'."""
    if not valid_full_commit(commit):
        raise ValueError(f"not a full commit id: {commit[:80]!r}")
    if cell and (not CELL_NAME_RE.fullmatch(cell) or cell.endswith(".xml")):
        raise ValueError(f"not a cell name: {cell[:80]!r}")
    return commit + CELL_INFIX + cell if cell else commit


def split_result_name(name: str) -> tuple[str, str] | None:
    """(commit, cell) of a result file's name (cell "" for a commit's own),
    None for any other file (XML, temporary files)."""
    commit, infix, cell = name.partition(CELL_INFIX)
    if not valid_full_commit(commit) or (infix and not cell):
        return None
    try:
        return (commit, cell) if result_name(commit, cell) == name else None
    except ValueError:
        return None


def result_or_xml(name: str) -> bool:
    """A result file's name or its JUnit XML's (``result_name``)."""
    return split_result_name(name[:-4] if name.endswith(".xml") else name) is not None


def xml_commit(name: str) -> str | None:
    """The commit whose (or whose cell's) JUnit XML ``name`` is, if it is one."""
    split = split_result_name(name[:-4]) if name.endswith(".xml") else None
    return split[0] if split else None


def cell_names(header: dict) -> list[str]:
    """The cells a matrix commit's ``cells:`` field names (``py3.9=failed
    py3.12=passed``), in its order, at most MAX_HEADER_CELLS; malformed
    words are left out (the header is read, not trusted); [] for a commit
    without a matrix."""
    names: list[str] = []
    for word in str(header.get("cells") or "").split()[:MAX_HEADER_CELLS]:
        name, sep, _ = word.partition("=")
        if sep and CELL_NAME_RE.fullmatch(name) and not name.endswith(".xml") \
                and name not in names:
            names.append(name)
    return names


def worst_verdict(verdicts) -> str:
    """A commit's verdict from its cells': the worst (a failing cell fails
    the commit; an error, which says nothing of the code, is the worst)."""
    return max(verdicts, key=lambda v: SEVERITY.index(v) if v in SEVERITY else len(SEVERITY))


def junit_path(results_dir: str, commit: str, cell: str = "") -> str:
    return os.path.join(results_dir, result_name(commit, cell) + ".xml")


VERDICTS = ("passed", "failed", "error", "timeout", "conflict")
# ``conflict``: the branch could not be merged with its target, so nothing
# ran; only the dispatcher writes it (RUNNER_VERDICTS is what a runner may send).
CONFLICT = "conflict"
RUNNER_VERDICTS = ("passed", "failed", "error", "timeout")
# The verdicts that make a branch red (every one but ``passed``).
RED_VERDICTS = ("failed", "error", "timeout", "conflict")
SEVERITY = ("passed", "failed", "conflict", "timeout", "error")
# A matrix cell's name (ci/matrix.py's CELL_RE and the dashboard's are
# this one): it is part of a result file's name.
CELL_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,160}")
