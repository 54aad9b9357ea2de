"""The tests page's lists from the test history (issue 20): the flakiest
tests (a running ``flaky`` total per test, kept right when runs are
replaced or forgotten) and the tests quarantined in their latest run, with
that run's state and the first commit of the quarantine; and their HTML,
escaped."""

from __future__ import annotations

import hashlib

import pytest

from ci.dashboard import history_pages
from ci.history import queries, store
from ci.history.queries import HistoryReader
from ci.results import ERROR, FAILED, FLAKY, PASSED, TestRecord


def commit_id(n: int) -> str:
    return hashlib.sha1(f"lists-{n}".encode()).hexdigest()


class History:
    """A store written as the writer process writes it (``write_run``,
    ``forget_commits``), and a read-only reader over it."""

    def __init__(self, path: str):
        self.conn = store.open_store(path)
        self.reader = HistoryReader(path)
        self.finished = 1000.0

    def run(self, n: int, records=(), branch: str = "main", cells=()) -> str:
        commit = commit_id(n)
        self.finished += 1
        run = store.Run(commit, branch, "r1", "passed", self.finished, f"stamp-{n}",
                        tuple(records) or None, tuple(cells))
        with store.transaction(self.conn):
            store.write_run(self.conn, run)
        return commit

    def forget(self, *commits: str) -> None:
        with store.transaction(self.conn):
            store.forget_commits(self.conn, list(commits))

    def overview(self, **kw) -> dict:
        return self.reader.overview(**kw)


@pytest.fixture
def history(tmp_path):
    made = History(str(tmp_path / store.FILE_NAME))
    yield made
    made.reader.close()
    made.conn.close()


def rec(name: str, outcome: str = PASSED, quarantined: bool = False) -> TestRecord:
    return TestRecord("t.T", name, outcome, 0.1, message="boom" if outcome != PASSED else "",
                      quarantined=quarantined)


def ids(rows: list[dict]) -> list[str]:
    return [row["id"] for row in rows]


# --------------------------------------------------------------------------
# Flakiest.

def test_the_flakiest_come_first_with_their_flake_rate(history):
    for n, (x, y) in enumerate([(FLAKY, PASSED), (FLAKY, FLAKY), (PASSED, PASSED)]):
        history.run(n, [rec("test_x", x), rec("test_y", y), rec("test_z")])
    history.run(3, [rec("test_y", FLAKY), rec("test_z")])     # y: 2 of 4 runs
    flakiest = history.overview()["flakiest"]
    assert sorted(ids(flakiest)) == ["t.T.test_x", "t.T.test_y"]
    x = next(t for t in flakiest if t["id"] == "t.T.test_x")
    assert (x["flaky"], x["runs"], x["flake_rate"]) == (2, 3, round(2 / 3, 4))
    y = next(t for t in flakiest if t["id"] == "t.T.test_y")
    assert (y["flaky"], y["runs"], y["flake_rate"]) == (2, 4, 0.5)
    # A flaky run is no failure; a test never flaky is not listed.
    assert x["failures"] == 0 and "t.T.test_z" not in ids(flakiest)
    assert history.overview()["failing"] == []


def test_a_test_flaky_on_two_of_three_runs_is_listed_first(history):
    for n, x in enumerate([FLAKY, PASSED, FLAKY]):
        history.run(n, [rec("test_x", x), rec("test_once", FLAKY if n == 1 else PASSED),
                        rec("test_never")])
    flakiest = history.overview()["flakiest"]
    assert ids(flakiest) == ["t.T.test_x", "t.T.test_once"]
    assert flakiest[0]["flaky"] == 2 and flakiest[0]["flake_rate"] == round(2 / 3, 4)
    assert ids(history.overview(limit=1)["flakiest"]) == ["t.T.test_x"]


def test_forgetting_or_replacing_runs_lowers_the_flaky_count(history):
    commits = [history.run(n, [rec("test_x", FLAKY), rec("test_y", FLAKY if n == 2 else FAILED)])
               for n in range(3)]
    history.forget(commits[0])                    # pruned (retention's forget)
    (x, y) = sorted(history.overview()["flakiest"], key=lambda t: t["id"])
    assert (x["flaky"], x["runs"], x["flake_rate"]) == (2, 2, 1.0)
    assert (y["flaky"], y["failures"]) == (1, 1)
    history.forget(commits[2])
    assert ids(history.overview()["flakiest"]) == ["t.T.test_x"]
    # A retest that passes replaces the run, and its flaky mark leaves the total.
    history.run(1, [rec("test_x"), rec("test_y")])
    assert history.overview()["flakiest"] == []
    assert history.reader.test("t.T.test_x")["flaky"] == 0


# --------------------------------------------------------------------------
# Quarantined.

def test_quarantined_tests_are_listed_with_their_latest_state(history):
    marks = {"test_q": [False, True, True, True],          # quarantined since 1, failing
             "test_lifted": [True, True, False, False],    # no longer quarantined
             "test_ok": [False, False, False, True]}       # quarantined at 3, passing
    outcomes = {"test_q": FAILED, "test_lifted": FAILED, "test_ok": PASSED}
    commits = [history.run(n, [rec(name, outcomes[name], marks[name][n]) for name in marks])
               for n in range(4)]
    # Both were quarantined most recently in the same run: the failing one first.
    assert ids(history.overview()["quarantined"]) == ["t.T.test_q", "t.T.test_ok"]
    q, ok = history.overview()["quarantined"]
    assert (q["outcome"], q["failing"], q["commit"], q["branch"]) == \
        (FAILED, True, commits[3], "main")
    assert q["quarantined_since"] == commits[1]
    assert q["runs"] == 4 and q["failures"] == 4
    assert (ok["outcome"], ok["failing"], ok["quarantined_since"]) == \
        (PASSED, False, commits[3])

    # Forgetting the newest runs: the newest quarantined run is looked up
    # again, so test_ok is gone and test_lifted is quarantined again in
    # what is now its latest run.
    history.forget(commits[3], commits[2])
    listed = {t["id"]: (t["commit"], t["quarantined_since"])
              for t in history.overview()["quarantined"]}
    assert listed == {"t.T.test_lifted": (commits[1], commits[0]),
                      "t.T.test_q": (commits[1], commits[1])}
    # Most recently quarantined first (among the failing ones, then the others).
    history.run(4, [rec("test_q", FAILED, True), rec("test_lifted", FAILED, True),
                    rec("test_ok", PASSED, True)])
    history.run(5, [rec("test_lifted", FAILED, True)])
    history.run(6, [rec("test_ok", PASSED, True)])
    assert ids(history.overview()["quarantined"]) == \
        ["t.T.test_lifted", "t.T.test_q", "t.T.test_ok"]


def test_a_quarantine_lifted_and_set_again_dates_from_the_second_time(history):
    marks = [True, False, True, True]
    commits = [history.run(n, [rec("test_q", FAILED, marked)]) for n, marked in enumerate(marks)]
    (q,) = history.overview()["quarantined"]
    assert q["quarantined_since"] == commits[2] and q["commit"] == commits[3]


def test_another_branch_running_it_unquarantined_does_not_end_the_quarantine(history):
    main = [history.run(0, [rec("test_q", FAILED)]), history.run(1, [rec("test_q", FAILED, True)])]
    history.run(2, [rec("test_q", FAILED)], branch="feature")      # not quarantined there
    history.run(3, [rec("test_q", FAILED)], branch="feature")
    main.append(history.run(4, [rec("test_q", FAILED, True)]))
    (q,) = history.overview()["quarantined"]
    assert (q["commit"], q["quarantined_since"]) == (main[2], main[1])
    # The branch's own unquarantined run does end it.
    main.append(history.run(5, [rec("test_q", FAILED)]))
    main.append(history.run(6, [rec("test_q", FAILED, True)]))
    (q,) = history.overview()["quarantined"]
    assert q["quarantined_since"] == main[4]


def test_a_matrix_run_shows_the_worst_cell_and_quarantine_on_another_branch(history):
    history.run(0, [rec("test_q", PASSED, True)])
    feature = history.run(1, branch="feature", cells=(
        ("py3.9", (rec("test_q", PASSED, True),)), ("py3.12", (rec("test_q", ERROR, True),))))
    (q,) = history.overview()["quarantined"]
    # The latest run is the feature branch's; since is counted on its branch.
    assert (q["outcome"], q["failing"], q["branch"]) == (ERROR, True, "feature")
    assert q["commit"] == feature and q["quarantined_since"] == feature


def test_the_quarantined_list_is_bounded(history):
    names = [f"test_{i:03d}" for i in range(60)]
    history.run(0, [rec(name, quarantined=True) for name in names])
    assert len(history.overview()["quarantined"]) == queries.MAX_QUARANTINED
    assert len(history.overview(quarantined=5)["quarantined"]) == 5


def test_the_lists_survive_a_rebuild_of_an_older_schema(history, tmp_path):
    """A store of schema 2 (no ``flaky``, no ``quarantined_run``) is
    unusable to this version: opening it rebuilds it."""
    path = str(tmp_path / "old.sqlite3")
    conn = store.connect(path)
    conn.executescript("CREATE TABLE tests (id INTEGER PRIMARY KEY); PRAGMA user_version = 2;")
    conn.close()
    conn = store.open_store(path)
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(tests)")}
        assert {"flaky", "quarantined_run"} <= columns
        assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION == 3
    finally:
        conn.close()


# --------------------------------------------------------------------------
# The HTML.

EVIL = '<img src=x onerror="alert(1)">&"\''


def test_both_lists_are_rendered_escaped(history):
    commits = [history.run(n, [rec(EVIL, FLAKY if n else FAILED, quarantined=n > 0)])
               for n in range(3)]
    sections = history_pages.tests_sections(history.overview())
    html = sections["sec-flakiest"] + sections["sec-quarantined"]
    assert "<img" not in html and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
    assert "<h2>Flakiest</h2>" in sections["sec-flakiest"] and "66.7%" in html
    assert "<h2>Quarantined (1)</h2>" in sections["sec-quarantined"]
    assert f'href="/commit/{commits[1]}"' in html and f'href="/commit/{commits[2]}"' in html
    assert ">passing</span>" in html
    empty = history_pages.tests_sections({"results": 0, "tests_seen": 0, "slowest": [],
                                          "failing": [], "flakiest": [], "quarantined": []})
    assert "No test has been flaky." in empty["sec-flakiest"]
    assert "No test is quarantined." in empty["sec-quarantined"]
