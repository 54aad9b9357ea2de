"""Our own checker of the rules of ``junit-10.xsd``, the JUnit schema of
Jenkins' xunit plugin (pytest checks its own ``--junit-xml`` output against
it): which elements may appear, their attributes, the required ones, what
may nest in what, and the time format of suites.  Written from the
schema's structure, not a copy of it, so the tests need no schema file
and no validating library.

It is a little stricter than the schema where that costs nothing: the
document's root must be ``testsuites`` or ``testsuite`` (the schema lets
any of its elements be a root), and a suite's ``time`` may not use the
thousands commas the schema allows (no writer of ours uses them).
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET


@dataclasses.dataclass(frozen=True)
class Rule:
    """One element: ``attrs`` allowed (``required`` among them);
    ``children``: the elements allowed inside, in any order and number
    unless ``ordered`` (then at most one of each, in that order);
    ``text``: whether it may hold text besides whitespace."""
    attrs: frozenset = frozenset()
    required: frozenset = frozenset()
    children: tuple = ()
    ordered: bool = False
    text: bool = False


def _rule(attrs=(), required=(), children=(), ordered=False, text=False) -> Rule:
    return Rule(frozenset(attrs) | frozenset(required), frozenset(required), tuple(children),
                ordered, text)


# failure, error and skipped: text (a traceback, a reason), two attributes.
_RESULT = _rule(attrs=("type", "message"), text=True)
# rerunFailure, rerunError, flakyFailure, flakyError (Surefire's reruns):
# ``type`` is required; an optional stackTrace, system-out, system-err.
_RERUN = _rule(attrs=("message",), required=("type",),
               children=("stackTrace", "system-out", "system-err"), ordered=True, text=True)
_STRING = _rule(text=True)

RULES = {
    "testsuites": _rule(attrs=("name", "time", "tests", "failures", "errors"),
                        children=("testsuite",)),
    "testsuite": _rule(
        attrs=("group", "time", "skipped", "timestamp", "hostname", "id", "package", "file",
               "log", "url", "version"),
        required=("name", "tests", "failures", "errors"),
        children=("testsuite", "properties", "testcase", "system-out", "system-err")),
    "properties": _rule(children=("property",)),
    "property": _rule(required=("name", "value")),
    "testcase": _rule(
        attrs=("time", "classname", "group"), required=("name",),
        children=("skipped", "error", "failure", "rerunFailure", "rerunError",
                  "flakyFailure", "flakyError", "system-out", "system-err")),
    "failure": _RESULT, "error": _RESULT, "skipped": _RESULT,
    "rerunFailure": _RERUN, "rerunError": _RERUN, "flakyFailure": _RERUN, "flakyError": _RERUN,
    "system-out": _STRING, "system-err": _STRING, "stackTrace": _STRING,
}
ROOTS = ("testsuites", "testsuite")
# The schema's time type for suites: digits, at most three decimals.
SUITE_TIME = re.compile(r"[0-9]*(\.[0-9]{0,3})?")
TIMED = ("testsuites", "testsuite")


def problems(data: bytes) -> list[str]:
    """Every way the document breaks the schema's rules ([] when none),
    each naming the element's path."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        return [f"not well-formed: {exc}"]
    found: list[str] = []
    if root.tag not in ROOTS:
        found.append(f"root <{root.tag}> is none of {', '.join(ROOTS)}")
    _check(root, root.tag, found)
    return found


def _check(element: ET.Element, path: str, found: list[str]) -> None:
    rule = RULES.get(element.tag)
    if rule is None:
        found.append(f"{path}: element <{element.tag}> is not in the schema")
        return
    for name in sorted(set(element.attrib) - rule.attrs):
        found.append(f"{path}: attribute {name!r} is not allowed")
    for name in sorted(rule.required - set(element.attrib)):
        found.append(f"{path}: required attribute {name!r} is missing")
    if element.tag in TIMED and "time" in element.attrib \
            and not SUITE_TIME.fullmatch(element.get("time")):
        found.append(f"{path}: time {element.get('time')!r} is not the schema's time format")
    if not rule.text and _has_text(element):
        found.append(f"{path}: text is not allowed in <{element.tag}>")
    tags = [child.tag for child in element]
    for tag in tags:
        if tag not in rule.children:
            found.append(f"{path}: <{tag}> may not be inside <{element.tag}>")
    if rule.ordered and tags != [t for t in rule.children if t in tags]:
        found.append(f"{path}: children {tags} must be at most one each, in the order "
                     f"{list(rule.children)}")
    for index, child in enumerate(element):
        if child.tag in rule.children:
            _check(child, f"{path}/{child.tag}[{index}]", found)


def _has_text(element: ET.Element) -> bool:
    pieces = [element.text] + [child.tail for child in element]
    return any(piece and piece.strip() for piece in pieces)


def assert_valid(data: bytes) -> None:
    """AssertionError listing the document's problems, if it has any."""
    found = problems(data)
    assert not found, "JUnit XML breaks junit-10.xsd:\n" + "\n".join(found[:20])
