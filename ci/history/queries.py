"""Reading the test history: read-only connections to the store the
dispatcher's writer keeps (``file:...?mode=ro``), for the dashboard.

Every query is an index lookup bounded by its ``limit``, never a scan of
all records, so the pages stay fast however long the history grows: the
tests' running totals (``tests.runs``, ``failures``, ``seconds``,
``flaky``) answer "slowest", "most failing" and "flakiest",
``tests.quarantined_run`` the tests quarantined most recently, and
``records(test, run)`` one test's recent runs, latest state and current
quarantine.  The answers are plain dicts, for the pages and the JSON API
alike.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import urllib.parse

from ci import results
from ci.history import store

# Read-only connections kept open for reuse, at most.
POOL_SIZE = 4
DEFAULT_RUNS = 50
MAX_RUNS = 500
# Tests ``quarantined_since`` looks up per call, at most (a header names 20).
MAX_SINCE = 100
# The overview's list of quarantined tests: at most this many, from at most
# QUARANTINE_CANDIDATES tests quarantined most recently (a test whose
# quarantine was lifted since is looked at, then left out).
MAX_QUARANTINED = 50
QUARANTINE_CANDIDATES = 200
# A test's totals, as ``_test_row`` reads them.
TEST_COLUMNS = "name, key, runs, failures, seconds, flaky"


class Unavailable(Exception):
    """No history to read (no store yet, or not one we can read)."""


class HistoryReader:
    """A small pool of read-only connections to the store at ``path``.
    Connections are dropped when the file is replaced (a rebuild), so a
    reader never keeps answering from a deleted store."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._pool: list[sqlite3.Connection] = []
        self._inode: int | None = None

    def _connect(self) -> sqlite3.Connection:
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=1.0)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise Unavailable(f"test history {self.path} unreadable: {exc}") from None
        if version != store.SCHEMA_VERSION:
            conn.close()
            raise Unavailable(f"test history {self.path} has schema version {version}, "
                              f"this dashboard reads {store.SCHEMA_VERSION} (the dispatcher "
                              "rebuilds it when it starts)")
        return conn

    @contextlib.contextmanager
    def connection(self):
        try:
            inode = os.stat(self.path).st_ino
        except OSError:
            raise Unavailable(f"no test history at {self.path} yet (the dispatcher writes "
                              "it in its state folder)") from None
        with self._lock:
            if inode != self._inode:
                self._close_pool()
                self._inode = inode
            conn = self._pool.pop() if self._pool else None
        conn = conn or self._connect()
        try:
            yield conn
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise Unavailable(f"test history {self.path} unreadable: {exc}") from None
        with self._lock:
            if len(self._pool) < POOL_SIZE and inode == self._inode:
                self._pool.append(conn)
                conn = None
        if conn is not None:
            conn.close()

    def _close_pool(self) -> None:
        for conn in self._pool:
            conn.close()
        self._pool.clear()

    def close(self) -> None:
        with self._lock:
            self._close_pool()

    # ---- queries ------------------------------------------------------------
    def overview(self, limit: int = 20, quarantined: int = MAX_QUARANTINED) -> dict:
        """Counts; the ``limit`` slowest (by mean duration), most often
        failing and flakiest tests (most flaky runs: failed, then passed
        on a rerun); and up to ``quarantined`` tests quarantined in their
        latest run (failing there first, then most recently quarantined
        first), with their state."""
        with self.connection() as conn:
            slowest = conn.execute(
                f"SELECT {TEST_COLUMNS} FROM tests WHERE runs > 0 "
                f"ORDER BY {store.MEAN} DESC LIMIT ?", (limit,)).fetchall()
            failing = conn.execute(
                f"SELECT {TEST_COLUMNS} FROM tests WHERE failures > 0 "
                "ORDER BY failures DESC LIMIT ?", (limit,)).fetchall()
            flakiest = self._flakiest(conn, limit)
            held = self._quarantined(conn, quarantined)
            runs = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
            tests = conn.execute("SELECT max(id) FROM tests").fetchone()[0] or 0
        return {"results": runs, "tests_seen": tests,
                "slowest": [_test_row(row) for row in slowest],
                "failing": [_test_row(row) for row in failing],
                "flakiest": flakiest, "quarantined": held}

    def flakiest(self, limit: int = 20) -> list[dict]:
        """The overview's flakiest tests alone (the benchmark times it)."""
        with self.connection() as conn:
            return self._flakiest(conn, limit)

    def quarantined(self, limit: int = MAX_QUARANTINED) -> list[dict]:
        """The overview's quarantined tests alone (the benchmark times it)."""
        with self.connection() as conn:
            return self._quarantined(conn, limit)

    @staticmethod
    def _flakiest(conn, limit: int) -> list[dict]:
        """The ``limit`` tests with the most flaky runs, along ``tests(flaky)``."""
        return [_test_row(row) for row in conn.execute(
            f"SELECT {TEST_COLUMNS} FROM tests WHERE flaky > 0 ORDER BY flaky DESC LIMIT ?",
            (limit,))]

    @classmethod
    def _quarantined(cls, conn, limit: int) -> list[dict]:
        """The tests still quarantined in their latest run, those failing
        there first, then most recently quarantined first: candidates from
        the index on
        ``tests.quarantined_run``, then each one's latest run (along
        ``records(test, run)``): its outcome (the worst of its cells'),
        commit, branch and the first commit of its current quarantine."""
        candidates = conn.execute(
            f"SELECT id, {TEST_COLUMNS} FROM tests WHERE quarantined_run > 0 "
            "ORDER BY quarantined_run DESC, id DESC LIMIT ?",
            (min(QUARANTINE_CANDIDATES, max(limit, 0) * 4),)).fetchall()
        found = []
        for row in candidates:
            if len(found) >= limit:
                break
            state = cls._quarantine_state(conn, row[0])
            if state is not None:
                found.append({**_test_row(row[1:]), **state})
        found.sort(key=lambda test: not test["failing"])       # stable: failing ones first
        return found

    @classmethod
    def _quarantine_state(cls, conn, test_id: int) -> dict | None:
        """A test's latest run (its records there, one per matrix cell):
        None unless it ran the test quarantined, else the worst outcome,
        whether that fails, the run's commit, branch and time, and the
        first commit of the current quarantine on that branch."""
        latest = conn.execute(
            "SELECT x.run, r.commit_id, r.branch, r.finished FROM records x "
            "JOIN runs r ON r.id = x.run WHERE x.test = ? ORDER BY x.run DESC LIMIT 1",
            (test_id,)).fetchone()
        if latest is None:
            return None
        run_id, commit, branch, finished = latest
        marks = conn.execute("SELECT outcome, quarantined FROM records WHERE test = ? AND run = ?",
                             (test_id, run_id)).fetchall()
        if not any(marked for _, marked in marks):
            return None                     # lifted: its latest run ran it unquarantined
        outcome = worst([o for o, _ in marks])
        return {"outcome": outcome, "failing": outcome in store.FAILING, "commit": commit,
                "branch": branch, "finished": finished,
                "quarantined_since": cls._since_test(conn, (run_id, branch), test_id)}

    def test(self, name: str | None = None, key: str | None = None,
             branch: str | None = None, limit: int = DEFAULT_RUNS,
             cell: str | None = None) -> dict | None:
        """One test's totals and its last ``limit`` runs on ``branch``
        (default: the branch it last ran on), newest first, each with the
        matrix cell it ran in (``""`` outside a matrix); ``cell``: only that
        cell's runs.  None when the history has no such test."""
        with self.connection() as conn:
            column, value = ("name", name) if name is not None else ("key", key)
            row = conn.execute(f"SELECT id, {TEST_COLUMNS} FROM tests "
                               f"WHERE {column} = ?", (value,)).fetchone()
            if row is None:
                return None
            test_id = row[0]
            if branch is None:
                last = conn.execute(
                    "SELECT r.branch FROM records x JOIN runs r ON r.id = x.run "
                    "WHERE x.test = ? ORDER BY x.run DESC LIMIT 1", (test_id,)).fetchone()
                branch = last[0] if last else ""
            runs = self._runs(conn, test_id, branch, limit, cell)
            branches = [b for (b,) in conn.execute(
                "SELECT DISTINCT branch FROM runs ORDER BY branch LIMIT 200")]
        data = _test_row(row[1:])
        data.update(branch=branch, branches=branches, cell=cell,
                    recent=[dict(zip(("commit", "finished", "runner", "verdict", "outcome",
                                      "duration", "cell", "quarantined"), run[:7] + (
                                          bool(run[7]),))) for run in runs])
        data["cells"] = sorted({r["cell"] for r in data["recent"] if r["cell"]})
        data["window"] = window_stats(data["recent"])
        return data

    @staticmethod
    def _runs(conn, test_id: int, branch: str, limit: int, cell: str | None) -> list:
        """The test's last ``limit`` records on ``branch`` (of ``cell`` only,
        when given), newest first: walked backwards along records(test, run)."""
        where, params = "x.test = ? AND r.branch = ?", [test_id, branch]
        if cell is not None:
            where += " AND x.cell = ?"
            params.append(cell)
        return conn.execute(
            f"SELECT r.commit_id, r.finished, r.runner, r.verdict, x.outcome, x.duration, "
            f"x.cell, x.quarantined FROM records x JOIN runs r ON r.id = x.run "
            f"WHERE {where} ORDER BY x.run DESC, x.cell LIMIT ?", (*params, limit)).fetchall()

    def quarantined_since(self, commit: str, names) -> dict[str, str]:
        """For each test id in ``names`` that ``commit``'s run recorded as
        quarantined: the first commit of the same branch, up to this one,
        whose run recorded it quarantined with no run of the branch since
        recording it unquarantined (so a quarantine lifted and set again
        counts from the second time).  Tests the history does not hold so
        are left out; at most ``MAX_SINCE`` names are looked up."""
        names = list(dict.fromkeys(names))[:MAX_SINCE]
        found: dict[str, str] = {}
        with self.connection() as conn:
            run = conn.execute("SELECT id, branch FROM runs WHERE commit_id = ?",
                               (commit,)).fetchone()
            if run is None or not names:
                return found
            for name in names:
                since = self._since(conn, run, name)
                if since:
                    found[name] = since
        return found

    @classmethod
    def _since(cls, conn, run: tuple[int, str], name: str) -> str | None:
        """The first commit of a test's current quarantine on the run's
        branch, the test named by its id."""
        row = conn.execute("SELECT id FROM tests WHERE name = ?", (name,)).fetchone()
        return None if row is None else cls._since_test(conn, run, row[0])

    @staticmethod
    def _since_test(conn, run: tuple[int, str], test_id: int) -> str | None:
        """The first commit of a test's current quarantine on the run's
        branch: backwards from the run to the branch's last record of it
        unquarantined, then forwards to the first quarantined one after.
        The backward walk crosses the whole quarantine, so it goes first
        along the index alone (``records_test`` holds ``quarantined``) to
        the last unquarantined record of any branch; only when that one is
        another branch's does it go on below it, checking each run's
        branch (every record between is quarantined)."""
        run_id, branch = run
        lifted = conn.execute(
            "SELECT x.run, r.branch FROM records x JOIN runs r ON r.id = x.run "
            "WHERE x.test = ? AND x.run <= ? AND x.quarantined = 0 "
            "ORDER BY x.run DESC LIMIT 1", (test_id, run_id)).fetchone()
        if lifted is not None and lifted[1] != branch:
            lifted = conn.execute(
                "SELECT x.run FROM records x JOIN runs r ON r.id = x.run "
                "WHERE x.test = ? AND x.run < ? AND x.quarantined = 0 AND r.branch = ? "
                "ORDER BY x.run DESC LIMIT 1", (test_id, lifted[0], branch)).fetchone()
        first = conn.execute(
            "SELECT r.commit_id FROM records x JOIN runs r ON r.id = x.run "
            "WHERE x.test = ? AND x.run > ? AND x.run <= ? AND x.quarantined = 1 "
            "AND r.branch = ? ORDER BY x.run LIMIT 1",
            (test_id, lifted[0] if lifted else 0, run_id, branch)).fetchone()
        return first[0] if first else None

    def recent_failures(self, branch: str, limit: int = 50, runs: int = 100) -> list[str]:
        """The ids of the tests that failed in the last ``runs`` results
        of ``branch``, most recent failure first, at most ``limit``."""
        failing = ", ".join("?" * len(store.FAILING))
        with self.connection() as conn:
            rows = conn.execute(
                f"SELECT t.name FROM records x JOIN tests t ON t.id = x.test "
                f"WHERE x.run IN (SELECT id FROM runs WHERE branch = ? ORDER BY id DESC "
                f"LIMIT ?) AND x.outcome IN ({failing}) GROUP BY t.name "
                f"ORDER BY max(x.run) DESC LIMIT ?",
                (branch, runs, *store.FAILING, limit)).fetchall()
        return [name for (name,) in rows]


def _test_row(row) -> dict:
    """A test's totals (``TEST_COLUMNS``) with their rates; ``flaky``: its
    runs that failed, then passed on a rerun."""
    name, key, runs, failures, seconds, flaky = row
    return {"id": name, "key": key, "runs": runs, "failures": failures,
            "failure_rate": round(failures / runs, 4) if runs else 0.0,
            "flaky": flaky, "flake_rate": round(flaky / runs, 4) if runs else 0.0,
            "mean_duration": round(seconds / runs, 3) if runs else 0.0}


# The outcomes of one run's records of a test (one per matrix cell), worst
# first: the one the quarantined list shows.
SEVERITY = (results.ERROR, results.FAILED, results.XPASS, results.FLAKY, results.PASSED,
            results.XFAIL, results.SKIPPED)


def worst(outcomes: list[str]) -> str:
    """The worst of a run's outcomes of one test (unknown ones last)."""
    return min(outcomes, key=lambda o: SEVERITY.index(o) if o in SEVERITY else len(SEVERITY))


def window_stats(recent: list[dict]) -> dict:
    """Failure and flake rates and durations over the runs shown (a flaky
    run: failed, then passed when the runner ran it again)."""
    ran = [r for r in recent if r["outcome"] != "skipped"]
    failed = sum(1 for r in recent if r["outcome"] in store.FAILING)
    flaky = sum(1 for r in recent if r["outcome"] == results.FLAKY)
    durations = [r["duration"] for r in ran]
    return {"runs": len(recent), "failures": failed,
            "failure_rate": round(failed / len(recent), 4) if recent else 0.0,
            "flaky": flaky, "flake_rate": round(flaky / len(recent), 4) if recent else 0.0,
            "mean_duration": round(sum(durations) / len(durations), 3) if durations else 0.0,
            "max_duration": max(durations, default=0.0)}
