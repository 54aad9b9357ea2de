"""Per-test records as JUnit XML: written valid against the schema Jenkins'
xunit plugin uses (junit-10.xsd), and read from a tested commit's files,
which are untrusted: size-capped, refused outright if they have a DOCTYPE
(no entity can expand or fetch anything), parsed with a bounded number of
elements, every name and message flattened and capped.

What the schema has no place for travels in the records format
(``ci/results.py``), not in the XML."""

from __future__ import annotations

import logging
import os
import re
import xml.etree.ElementTree as ET
from ci.files import atomic_write
from ci.wire import one_line

from ci.results import (ERROR, FAILED, FLAKY, KINDS, MAX_ELEMENTS, MAX_JUNIT_BYTES, MAX_RECORDS,
                        NAME_LIMIT, PASSED, SKIPPED, SUBTEST, TEST, TRACEBACK_LIMIT, XFAIL, XPASS,
                        JunitError, TestRecord, clean_record, count_records, finite_number,
                        junit_path, result_name, traceback_within)

log = logging.getLogger(__name__)


# Each outcome as junit-10.xsd (the schema of Jenkins' xunit plugin, which
# pytest's own files follow) can say it: a child element and its ``type``.
# An expected failure is a skip of type ``xfail``, as pytest writes it
# (``pytest.xfail``); an unexpected success a failure of its own type.
# A flaky test (failed, then passed when run again) is a passing testcase
# with Maven Surefire's ``flakyFailure`` child, its failed try.
_CHILD = {FAILED: ("failure", ""), XPASS: ("failure", "unexpected success"),
          ERROR: ("error", ""), SKIPPED: ("skipped", ""), XFAIL: ("skipped", "xfail"),
          FLAKY: ("flakyFailure", "failure")}


# The suite property naming a quarantined test (its testcase's key, see
# ``_case_key``): testcase allows no attribute for it, testsuite has
# properties.
QUARANTINED_PROPERTY = "ci.quarantined"


def format_junit(records: list[TestRecord], name: str = "tests",
                 traceback_limit: int = TRACEBACK_LIMIT) -> bytes:
    """JUnit XML any consumer accepts (it follows junit-10.xsd):
    ``testsuites`` with one ``testsuite``; a ``testcase`` per record with
    a ``failure``, ``error`` or ``skipped`` child.  The suite's counts are
    ``count_records``' (the text header's), which for unittest subtests and
    fixtures is not the number of testcase elements, and which count an
    expected failure as no skip.  A subtest's description is part of its
    ``name``; what the schema has no attribute for (a record's kind) is in
    the records the runner sends (``format_records``), not here.  A flaky
    test is a passing testcase with a ``flakyFailure`` child; quarantined
    tests are named by the suite's ``ci.quarantined`` properties."""
    records = [clean_record(r) for r in records]
    counts = count_records(records)
    total = f"{sum(r.duration for r in records):.3f}"
    attrs = {"name": one_line(name, NAME_LIMIT), "tests": str(counts["tests"]),
             "failures": str(counts["failures"]), "errors": str(counts["errors"]),
             "time": total}
    root = ET.Element("testsuites", attrs)
    suite = ET.SubElement(root, "testsuite", attrs, skipped=str(counts["skipped"]))
    quarantined = list(dict.fromkeys(_case_key(r.classname, _case_name(r))
                                     for r in records if r.quarantined))
    if quarantined:
        # The schema puts a suite's properties before its testcases.
        properties = ET.SubElement(suite, "properties")
        for key in quarantined:
            ET.SubElement(properties, "property", name=QUARANTINED_PROPERTY, value=key)
    for record in records:
        case = ET.SubElement(suite, "testcase", {
            "classname": record.classname, "name": _case_name(record),
            "time": f"{record.duration:.3f}"})
        tag, kind = _CHILD.get(record.outcome, ("", ""))
        if tag:
            child = ET.SubElement(case, tag, {"message": record.message})
            if kind:
                child.set("type", kind)
            if traceback_limit and record.traceback:
                if record.outcome == FLAKY:
                    # Surefire keeps a flaky try's traceback in a stackTrace.
                    ET.SubElement(child, "stackTrace").text = traceback_within(record,
                                                                         traceback_limit)
                else:
                    child.text = traceback_within(record, traceback_limit)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def _case_name(record: TestRecord) -> str:
    """A record's testcase ``name``: a subtest's description is part of it."""
    return f"{record.name} {record.subtest}" if record.subtest else record.name


def _case_key(classname: str, name: str) -> str:
    """How a ``ci.quarantined`` property names a testcase: the id its
    ``classname`` and ``name`` attributes make (what ``TestRecord.id`` is
    for the record read back)."""
    return f"{classname}.{name}" if classname else name


def fit_junit(records: list[TestRecord], budget: int, name: str = "tests") -> bytes | None:
    """The records as XML within ``budget`` bytes, shortening tracebacks
    if it must (the message of each stays); None if even that is too big."""
    for limit in TRACEBACK_STEPS:
        xml = format_junit(records, name, traceback_limit=limit)
        if len(xml) <= budget:
            return xml
    return None


# How far tracebacks are cut, step by step, to make records fit a budget.
TRACEBACK_STEPS = (TRACEBACK_LIMIT, 1000, 200, 0)


# Anything that starts markup with "<!" but is no comment or CDATA section
# belongs to a DTD (DOCTYPE, ENTITY, ELEMENT, ATTLIST): refused whole.
_DTD_MARKUP = re.compile(r"<!(?!--|\[CDATA\[)")


_DECLARED_ENCODING = re.compile(r"""^<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]+)""")


def _tag(element) -> str:
    tag = element.tag if isinstance(element.tag, str) else ""
    return tag.rpartition("}")[2]


def _flaky_try(children: dict) -> tuple[str, str] | None:
    """(message, traceback) of a Surefire ``flakyFailure`` / ``flakyError``
    (a test that failed, then passed), or None."""
    flaky = children.get("flakyFailure", children.get("flakyError"))
    if flaky is None:
        return None
    trace = flaky.find("stackTrace")
    text = flaky.text if trace is None else trace.text
    return flaky.get("message") or "", text or ""


def _record_from(case, quarantined: set[str] = frozenset()) -> TestRecord:
    """The record of one testcase element; ``quarantined``: the keys the
    suite's ``ci.quarantined`` properties name so far."""
    children = {_tag(child): child for child in reversed(list(case))}
    outcome, detail = PASSED, None
    for tag, result in (("failure", FAILED), ("error", ERROR), ("skipped", SKIPPED)):
        if tag in children:
            outcome, detail = result, children[tag]
            break
    # ``outcome``, ``kind`` and ``subtest`` attributes: files written before
    # they moved out of the XML (the dashboard still reads those).
    declared = case.get("outcome", "")
    child_type = "" if detail is None else detail.get("type")
    if outcome == FAILED and (declared == XPASS or child_type == "unexpected success"):
        outcome = XPASS
    elif outcome == SKIPPED and (declared == XFAIL or child_type in ("xfail", "pytest.xfail")):
        outcome = XFAIL
    elif outcome == PASSED and declared == XFAIL:
        outcome, detail = XFAIL, children.get("system-out")
    message = traceback = ""
    flaky = _flaky_try(children) if outcome == PASSED else None
    if flaky is not None:
        outcome, (message, traceback) = FLAKY, flaky
    if detail is not None:
        message = detail.get("message") or ""
        traceback = detail.text or ""
        if outcome == XFAIL and detail.tag == "system-out":
            message, _, traceback = traceback.partition("\n")
    kind = case.get("kind", TEST)
    subtest = case.get("subtest", "") if kind == SUBTEST else ""
    name = case.get("name") or ""
    if subtest and name.endswith(" " + subtest):
        name = name[:-len(subtest) - 1]
    return clean_record(TestRecord(
        classname=case.get("classname") or "", name=name, outcome=outcome,
        duration=finite_number(case.get("time")), message=message, traceback=traceback,
        kind=kind if kind in KINDS else TEST, subtest=subtest,
        quarantined=_case_key(case.get("classname") or "", case.get("name") or "")
        in quarantined))


def parse_junit(data: bytes, max_bytes: int = MAX_JUNIT_BYTES,
                max_records: int = MAX_RECORDS) -> list[TestRecord]:
    """The test records of a JUnit XML document (``testcase`` elements
    anywhere in it); JunitError if it is too large, not UTF-8, has a DTD,
    is malformed or holds too many elements."""
    if len(data) > max_bytes:
        raise JunitError(f"JUnit file of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise JunitError("JUnit file is not UTF-8") from None
    # Refused before any parser sees it: no entity is ever declared, so none
    # can expand (billion laughs) or fetch a file or URL.
    if _DTD_MARKUP.search(text):
        raise JunitError("JUnit file has a DOCTYPE or other DTD markup: refused")
    declared = _DECLARED_ENCODING.match(text.lstrip())
    if declared and declared.group(1).lower().replace("_", "-") not in ("utf-8", "utf8",
                                                                       "us-ascii", "ascii"):
        raise JunitError(f"JUnit file declares encoding {declared.group(1)[:20]!r}")
    parser = ET.XMLPullParser(events=("start", "end"))
    records: list[TestRecord] = []
    counted = {"elements": 0, "depth": 0}
    # Keys of quarantined tests: a suite's properties come before its testcases.
    quarantined: set[str] = set()

    def take_events() -> None:
        for event, element in parser.read_events():
            if event == "start":
                counted["elements"] += 1
                if counted["elements"] > MAX_ELEMENTS:
                    raise JunitError(f"JUnit file has more than {MAX_ELEMENTS} elements")
                if _tag(element) == "testcase":
                    counted["depth"] += 1
                continue
            if _tag(element) == "property" and not counted["depth"] \
                    and element.get("name") == QUARANTINED_PROPERTY:
                quarantined.add(element.get("value") or "")
            if _tag(element) != "testcase":
                continue
            counted["depth"] -= 1
            if counted["depth"]:
                continue  # a testcase inside a testcase is not ours to count
            if len(records) >= max_records:
                raise JunitError(f"JUnit file has more than {max_records} test cases")
            records.append(_record_from(element, quarantined))
            element.clear()  # memory stays bounded by the records kept

    try:
        for start in range(0, len(text), 65536):
            parser.feed(text[start:start + 65536])
            take_events()
        parser.close()
        # A newer expat may hold the last events back until close().
        take_events()
    except ET.ParseError as exc:
        raise JunitError(f"JUnit file is not well-formed XML: {exc}") from None
    return records


def records_or_note(data: bytes, parse=parse_junit) -> tuple[list[TestRecord] | None, str]:
    """(records, "") or (None, "unreadable") with the reason logged;
    ``parse``: ``parse_junit`` or ``parse_records``."""
    try:
        return parse(data), ""
    except JunitError as exc:
        log.warning("JUnit results unreadable: %s", exc)
        return None, "unreadable"


def write_junit(results_dir: str, commit: str, records: list[TestRecord] | None,
                cell: str = "", spares=None) -> None:
    """Write ``<commit>.xml`` atomically, before the text result file that
    proves the commit done; without records, remove a stale one (a retest
    whose new run has no records must not keep the old run's)."""
    path = junit_path(results_dir, commit, cell)
    if records is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    # Within the size every reader takes (the dashboard's), tracebacks cut if need be.
    xml = fit_junit(records, MAX_JUNIT_BYTES, name=result_name(commit, cell))
    if xml is None:
        log.warning("JUnit XML of %d records exceeds %d bytes even without tracebacks",
                    len(records), MAX_JUNIT_BYTES)
        xml = format_junit(records, name=result_name(commit, cell), traceback_limit=0)
    atomic_write(path, xml, spares=spares)
