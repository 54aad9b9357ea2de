"""Flaky and quarantined tests on the dashboard's commit page and in its
JSON (ci/dashboard/index.py, pages.py), from a real results folder."""

from __future__ import annotations

from ci import junit_xml
from ci import results
from ci.dashboard import pages
from ci.dashboard.index import ResultIndex
from ci.history.queries import window_stats
from ci.results import TestRecord
from ci.dashboard.history_pages import outcome_class

OLD, NEW = "a" * 40, "b" * 40


def write(folder, commit, previous, records):
    header = {"commit": commit, "verdict": "passed", "branch": "main", "previous": previous,
              **results.record_fields(records)}
    junit_xml.write_junit(str(folder), commit, records)
    (folder / commit).write_bytes(results.format_result(header, b"out\n"))


def test_the_commit_page_marks_flaky_and_quarantined_tests(tmp_path):
    write(tmp_path, OLD, "", [TestRecord("m.T", "test_q", "failed", quarantined=True)])
    write(tmp_path, NEW, OLD, [TestRecord("m.T", "test_f", "flaky", message="once"),
                               TestRecord("m.T", "test_q", "failed", quarantined=True),
                               TestRecord("m.T", "test_ok")])
    index = ResultIndex(str(tmp_path))
    tests = index.test_report(NEW)
    assert tests == [{"name": "m.T.test_f", "kind": "flaky", "new": False},
                     {"name": "m.T.test_q", "kind": "quarantined", "new": False}]
    html = str(pages.tests_section(tests))
    assert "Failing tests (0; 1 flaky, 1 quarantined)" in html
    assert 'class="t-quarantined"' in html and "new failure" not in html
    item = index.get(NEW)
    assert item["flaky"] == "1" and item["quarantined_failed"] == "1"
    summary = str(pages.fields_section(item, "finished"))
    assert "<dt>quarantined_failing</dt>" in summary and "m.T.test_q" in summary
    stats = window_stats([{"outcome": "flaky", "duration": 1.0},
                          {"outcome": "passed", "duration": 1.0}])
    assert (stats["flaky"], stats["flake_rate"]) == (1, 0.5)
    assert outcome_class("flaky") == "flaky"
