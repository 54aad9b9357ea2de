"""One test run's outcome: what a runner produces, a ``results`` message
carries and the dispatcher writes (the result file, the JUnit XML) and
tells the notifier.

It is one frozen value, so nothing rides along unseen: the header holds
only result-file fields (``results.RESULT_FIELDS``, in that order), and
the per-test records and the XML a runner sends have fields of their own.
The ``results`` body is made here (``to_body``) and read here
(``from_body``), which is also where the dispatcher's check of a runner's
fields lives: the runner's tests may have forged any of them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
from collections.abc import Mapping

from ci import junit_xml
from ci import results
from ci.files import atomic_write
from ci.results import RUNNER_VERDICTS, TestRecord
from ci.wire import ProtocolError, decode_fields, encode_fields, one_line


# --------------------------------------------------------------------------
# What the dispatcher accepts of a runner's header values.

RESULT_INT_FIELDS = ("tests", "failures", "errors", "skipped", "exit_code")
# ASCII digits only: str.isdigit() also accepts '²' and '--1', which int() rejects.
RESULT_INT_RE = re.compile(r"-?[0-9]{1,12}")
SETUP_STATES = ("built", "reused", "none", "failed")
# Whose environment it was (see environments.Scope).
SETUP_SCOPES = ("trusted", "branch", "commit")
RESULT_DURATION_RE = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?")
# The ``shards`` field: ``i/n``, then how the shard ran (see sharding.py:
# whole, skipped or empty); after a merge, ``n`` and an explanation.
SHARDS_FIELD_RE = re.compile(r"([1-9][0-9]{0,2})/([1-9][0-9]{0,2})(?: (whole|skipped|empty))?")
# Free text a runner may send, flattened and capped.
TEXT_FIELDS = ("runner", "started", "reason", "subject", "author", "committed")

# In a ``results`` body only: the length of the JUnit XML after the blank
# line, and of the per-test records (``results.format_records``) after it.
JUNIT_BYTES_FIELD = "junit_bytes"
RECORDS_BYTES_FIELD = "records_bytes"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """``header``: the result file's fields (values str or int), kept in
    ``RESULT_FIELDS`` order; any other key is a bug and refused.
    ``output``: the raw test output.  ``records``: the per-test records
    (the runner's, sent in a format of our own, or the dispatcher's, read
    from them), or None when there are none (no XML is written then, and a
    stale one is removed; an empty tuple is a document with no tests,
    which is written).  ``junit_xml``: the same records as JUnit XML the
    runner also sends, for dispatchers from before the records part
    (b"": none); a dispatcher of this version reads the records."""
    header: Mapping[str, str | int]
    output: bytes = b""
    records: tuple[TestRecord, ...] | None = None
    junit_xml: bytes = b""

    def __post_init__(self) -> None:
        ordered = results.ordered_header(self.header)
        object.__setattr__(self, "header", types.MappingProxyType(ordered))
        if self.records is not None:
            object.__setattr__(self, "records", tuple(self.records))

    @property
    def verdict(self) -> str | None:
        return self.header.get("verdict")

    def with_header(self, **values: str | int) -> Outcome:
        """The same outcome with these header fields set (or replaced)."""
        return dataclasses.replace(self, header={**self.header, **values})

    # ---- the result file ------------------------------------------------
    def result_file(self) -> bytes:
        """``test_results/<commit>``: header, blank line, raw output."""
        return results.format_result(self.header, self.output)

    def write(self, results_dir: str, commit: str, cell: str = "",
              spares=None) -> os.stat_result:
        """The JUnit XML first, then the result file: the file is the proof
        the commit (or its matrix cell ``cell``) is done, so it is written
        last.  ``spares``: the dispatcher's pool of ready files (atomic_write).
        Returns the result file's stat (atomic_write's)."""
        records = None if self.records is None else list(self.records)
        junit_xml.write_junit(results_dir, commit, records, cell, spares)
        return atomic_write(os.path.join(results_dir, results.result_name(commit, cell)),
                            self.result_file(), spares=spares)

    # ---- the ``results`` message body -------------------------------------
    def to_body(self) -> bytes:
        """The header plus ``junit_bytes: N`` when there is XML and
        ``records_bytes: M`` when there are records; the blank line; N
        bytes of XML; M bytes of records; the output.  Without either it is
        the old style body (the result file's bytes).  An older dispatcher
        reads the XML and takes the records part for output."""
        head = dict(self.header)
        records = b""
        if self.junit_xml:
            head[JUNIT_BYTES_FIELD] = len(self.junit_xml)
        if self.records is not None:
            records = results.format_records(self.records)
            head[RECORDS_BYTES_FIELD] = len(records)
        return encode_fields(head) + b"\n" + self.junit_xml + records + self.output

    @classmethod
    def from_body(cls, body: bytes) -> Outcome:
        """The outcome a runner's ``results`` body describes, checked as
        the dispatcher must: ProtocolError (its text is the reply) for a
        malformed body or a bad verdict, integer or duration; other values
        that do not fit are dropped; the counts come from the per-test
        records when they parse (a forged header cannot disagree with them):
        the records part, or from an older runner the JUnit XML."""
        raw, parts, output = split_body(body)
        header = checked_header(raw)
        added, records = records_part(raw, parts)
        if records is not None:
            # The records decide these too, also when they are 0.
            for name in (*results.EXTRA_COUNTS, "quarantined_failing"):
                header.pop(name, None)
        header.update(added)
        return cls(header, output, records)


@dataclasses.dataclass(frozen=True)
class BodyParts:
    """What a ``results`` body carries between its blank line and its
    output: the JUnit XML (b"": none) and the records part (None: none,
    as from a runner before it)."""
    junit_xml: bytes = b""
    records: bytes | None = None


def split_body(body: bytes) -> tuple[dict[str, str], BodyParts, bytes]:
    """(fields, the parts, output); ProtocolError if malformed.  A body
    without ``junit_bytes`` or ``records_bytes`` is the old style."""
    head, sep, rest = body.partition(b"\n\n")
    if not sep:
        raise ProtocolError("results body needs fields, a blank line, then output")
    fields = decode_fields(head)
    xml, rest = _cut(fields, JUNIT_BYTES_FIELD, "the XML that follows the blank line", rest)
    records, rest = _cut(fields, RECORDS_BYTES_FIELD, "the records that follow the XML", rest)
    return fields, BodyParts(xml or b"", records), rest


def _cut(fields: dict[str, str], name: str, what: str,
         rest: bytes) -> tuple[bytes | None, bytes]:
    """(the part ``fields[name]`` gives the length of, or None without
    that field; what follows it); the field itself is taken out."""
    size = fields.pop(name, None)
    if size is None:
        return None, rest
    if not re.fullmatch(r"[0-9]{1,10}", size) or int(size) > len(rest):
        raise ProtocolError(f"{name} must be the length of {what}")
    return rest[:int(size)], rest[int(size):]


def checked_header(raw: dict[str, str]) -> dict:
    """The header fields of a runner's raw values that the dispatcher
    keeps (never ``commit``, ``branch`` or ``previous``: those are its own)."""
    # ``conflict`` is the dispatcher's own verdict (a merge that could not
    # be made, so nothing ran): a runner's tests could otherwise forge one.
    if raw.get("verdict") not in RUNNER_VERDICTS:
        raise ProtocolError(f"verdict must be one of {', '.join(RUNNER_VERDICTS)}")
    header: dict = {"verdict": raw["verdict"]}
    for name in RESULT_INT_FIELDS:
        value = raw.get(name, "0")
        if not RESULT_INT_RE.fullmatch(value):
            raise ProtocolError(f"field {name} must be an integer")
        header[name] = int(value)
    try:
        duration = float(raw.get("duration", "0"))
    except ValueError:
        raise ProtocolError("field duration must be a number") from None
    if not math.isfinite(duration):
        raise ProtocolError("field duration must be a finite number")
    header["duration"] = f"{duration:.3f}"
    for name in TEXT_FIELDS:
        if name in raw:
            header[name] = one_line(raw[name], 300)
    # How the runner readied the commit's environment.
    if raw.get("setup") in SETUP_STATES:
        header["setup"] = raw["setup"]
    if raw.get("setup_scope") in SETUP_SCOPES:
        header["setup_scope"] = raw["setup_scope"]
    if RESULT_DURATION_RE.fullmatch(raw.get("setup_duration", "")):
        header["setup_duration"] = raw["setup_duration"]
    if SHARDS_FIELD_RE.fullmatch(raw.get("shards", "")):
        header["shards"] = raw["shards"]
    header.update(flaky_fields(raw))
    header.update(failfirst_fields(raw))
    return header


def failfirst_fields(raw: dict[str, str]) -> dict:
    """Failing tests first (ci/runner/ordering.py): what became of them,
    and when the first test failed (the first run's, reruns aside)."""
    fields: dict = {}
    if raw.get("failing_first"):
        fields["failing_first"] = one_line(raw["failing_first"], 200)
    if RESULT_DURATION_RE.fullmatch(raw.get("first_failure_after", "")):
        fields["first_failure_after"] = raw["first_failure_after"]
    return fields


def flaky_fields(raw: dict[str, str]) -> dict:
    """The counts of flaky and quarantined tests a runner sent (whole
    numbers from 0, else ProtocolError; 0 is left out as the runner leaves
    it out) and the failing quarantined tests' names (dropped unless a
    JSON list of names)."""
    fields: dict = {}
    for name in results.EXTRA_COUNTS:
        value = raw.get(name)
        if value is None:
            continue
        if not re.fullmatch(r"[0-9]{1,12}", value):
            raise ProtocolError(f"field {name} must be a whole number")
        if int(value):
            fields[name] = int(value)
    if results.named_failing(raw.get("quarantined_failing")) is not None:
        fields["quarantined_failing"] = raw["quarantined_failing"]
    return fields


def records_part(raw: dict[str, str], parts: BodyParts) -> tuple[dict, tuple | None]:
    """(header fields, records) of a body's per-test parts: the records
    part, or without one (an older runner) the JUnit XML; the XML beside
    a records part is not read.  Either came from a runner whose tests may
    have forged it: it is parsed here, and when it holds records the counts
    are theirs, so the result file and the XML can never disagree; when it
    does not parse, ``junit: unreadable`` and no records.  The runner's own
    ``junit`` note is kept otherwise."""
    added: dict = {}
    if raw.get("junit"):
        added["junit"] = one_line(raw["junit"], 100)
    if parts.records is not None:
        records, note = junit_xml.records_or_note(parts.records, results.parse_records)
    elif parts.junit_xml:
        records, note = junit_xml.records_or_note(parts.junit_xml)
    else:
        return added, None
    if records is None:
        added["junit"] = note
        return added, None
    added.update(results.record_fields(records))
    return added, tuple(records)
