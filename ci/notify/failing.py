"""Which tests a notification names: the failing tests of a commit (those
that decide its verdict: failed every time and not quarantined), each
marked new when it did not fail on the previous commit of the branch.

Read from the JUnit files the dispatcher wrote beside the result files
(``<commit>.xml``, or a matrix commit's cells' ``<commit>.cell.<name>.xml``),
once, when the event is made: the event then holds the names, so a
notification sent again after a restart says the same.
"""

from __future__ import annotations

import logging
import os

from ci import junit_xml
from ci import results
from ci.files import read_inside

log = logging.getLogger(__name__)

# Tests an event names, at most (the count says how many there were).
MAX_NAMED = 20


def deciding_failures(results_dir: str, commit: str) -> list[str] | None:
    """The ids of ``commit``'s failing, unquarantined tests in record
    order, or None when it has no readable records.  A matrix commit's
    are its cells' (its own file has no JUnit file beside it), each id
    once, in the order of the header's ``cells:``."""
    cells = results.cell_names(results.read_header(os.path.join(results_dir, commit)) or {})
    if not cells:
        return _failures_in(results_dir, commit)
    found: list[str] | None = None
    for cell in cells:
        failing = _failures_in(results_dir, commit, cell)
        if failing is not None:
            found = list(dict.fromkeys([*(found or []), *failing]))
    return found


def _failures_in(results_dir: str, commit: str, cell: str = "") -> list[str] | None:
    """The failing, unquarantined test ids of one JUnit file (a commit's
    or a cell's), None without a readable one."""
    try:
        path = results.junit_path(results_dir, commit, cell)
        data = read_inside(path, results_dir, results.MAX_JUNIT_BYTES)
        records = junit_xml.parse_junit(data)
    except (OSError, ValueError, results.JunitError) as exc:
        if not isinstance(exc, FileNotFoundError):
            log.warning("records of %s unreadable: %s", results.result_name(commit, cell)[:60],
                        exc)
        return None
    return results.deciding_failures(records)


def failing_tests(results_dir: str, commit: str, previous: str | None) -> dict:
    """The event's ``failing_tests`` (up to MAX_NAMED of ``{"id", "new"}``;
    ``new`` is None when the previous commit's records are unknown) and
    ``failing_count``; {} when the commit has no records."""
    failing = deciding_failures(results_dir, commit)
    if failing is None:
        return {}
    before = deciding_failures(results_dir, previous) if previous else None
    named = [{"id": name, "new": None if before is None else name not in before}
             for name in failing[:MAX_NAMED]]
    return {"failing_tests": named, "failing_count": len(failing)}


def summary(event: dict) -> str:
    """``failing: a.b.test_x (new), c.d.test_y and 3 more``, or ""."""
    named = event.get("failing_tests") or []
    if not named:
        return ""
    parts = [item["id"] + (" (new)" if item.get("new") else "") for item in named[:5]]
    more = int(event.get("failing_count") or len(named)) - len(parts)
    return "failing: " + ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def environment(event: dict) -> dict:
    """The notify command's variables for them: ids one per line."""
    named = event.get("failing_tests") or []
    if not named:
        return {}
    return {"CI_FAILING_TESTS": "\n".join(item["id"] for item in named),
            "CI_NEW_FAILING_TESTS": "\n".join(item["id"] for item in named if item.get("new"))}
