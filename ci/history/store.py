"""The test history's store: one SQLite file in the dispatcher's state
folder (``history.sqlite3``) holding every per-test record of every result,
so that a test can be followed across commits.

It is derived data.  The result files (``test_results/<commit>`` headers
and ``<commit>.xml`` JUnit records) stay the source of truth: a store that
is missing, corrupt, of another schema version or behind the folder is
brought back to what the files say (``open_store`` then ``catch_up``).

Tables: ``runs`` (one per result file: commit, branch, runner, verdict,
the file's time and stamp), ``tests`` (one per test id, with running
totals so that the slowest, most failing and flakiest tests are an index
lookup, not a scan of every record, and the newest run that recorded it
quarantined, so that the quarantined tests are one too) and ``records`` (test, run, cell: a matrix
cell's name or "", outcome, duration, quarantined).  A matrix commit's
records are read from its cells' own files.
A commit tested again replaces its run, as its result file
is replaced.  Only the writer (ci/history/writer.py) writes; readers open
the file read-only (ci/history/queries.py).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import logging
import os
import sqlite3

from ci import junit_xml
from ci import results
from ci.results import TestRecord
from ci.wire import valid_full_commit

log = logging.getLogger(__name__)

FILE_NAME = "history.sqlite3"
# Bumped on any change to SCHEMA: a store of another version is rebuilt.
SCHEMA_VERSION = 3
# Outcomes that count as a failure of the test (``results.COUNTED_AS``
# failures and errors).
FAILING = (results.FAILED, results.ERROR, results.XPASS)
# A writer waits this long for a lock another process holds (a reader
# never takes one in WAL mode; a test may, to stall the writer).
BUSY_TIMEOUT_MS = 2000
# Catching up commits this many records per transaction.
BATCH_RECORDS = 50_000
# Names per ``IN (...)`` lookup (SQLite's variable limit is 32766).
LOOKUP_CHUNK = 500

SCHEMA = f"""
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    commit_id TEXT NOT NULL UNIQUE,
    branch TEXT NOT NULL DEFAULT '',
    runner TEXT NOT NULL DEFAULT '',
    verdict TEXT NOT NULL DEFAULT '',
    finished REAL NOT NULL,
    stamp TEXT NOT NULL
);
CREATE INDEX runs_branch ON runs(branch, id);
CREATE TABLE tests (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    key TEXT NOT NULL UNIQUE,
    runs INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    seconds REAL NOT NULL DEFAULT 0,
    flaky INTEGER NOT NULL DEFAULT 0,
    quarantined_run INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX tests_failures ON tests(failures);
CREATE INDEX tests_mean ON tests(seconds / runs);
CREATE INDEX tests_flaky ON tests(flaky);
CREATE INDEX tests_quarantined ON tests(quarantined_run);
CREATE TABLE records (
    test INTEGER NOT NULL,
    run INTEGER NOT NULL,
    cell TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL,
    duration REAL NOT NULL,
    quarantined INTEGER NOT NULL DEFAULT 0
);
-- quarantined: so that the walk back across a test's quarantine reads the index alone.
CREATE INDEX records_test ON records(test, run, quarantined);
CREATE INDEX records_run ON records(run);
CREATE INDEX records_quarantined ON records(test, run) WHERE quarantined = 1;
PRAGMA user_version = {SCHEMA_VERSION};
"""
# The slowest tests: mean duration, as the index ``tests_mean`` holds it.
MEAN = "seconds / runs"


class StoreBroken(Exception):
    """The store cannot be used as it is (corrupt, another schema)."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One result file's worth of history.  ``records`` None: the result
    has no per-test records (the run is still recorded, so that catching
    up knows the file).  ``cells``: a matrix commit's records, per cell
    (name, records), read from the cells' own files; its own file has
    none."""
    commit: str
    branch: str
    runner: str
    verdict: str
    finished: float
    stamp: str
    records: tuple[TestRecord, ...] | None
    cells: tuple[tuple[str, tuple[TestRecord, ...]], ...] = ()

    def record_sets(self):
        """(cell, records) of every set of records the run holds: the
        commit's own (cell "") and each cell's."""
        if self.records:
            yield "", self.records
        for cell, records in self.cells:
            if records:
                yield cell, records


def test_key(name: str) -> str:
    """A short stable handle for a test id of any length, for URLs."""
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def file_stamp(path: str) -> tuple[str, float] | None:
    """(stamp, mtime) of a result file: the stamp changes when the file is
    replaced (a retest), which is how a store learns it is behind."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_mtime_ns}:{st.st_size}:{st.st_ino}", st.st_mtime


def run_from_header(header, records, stamp: tuple[str, float], cells=()) -> Run:
    return Run(commit=header.get("commit", ""), branch=header.get("branch") or "",
               runner=header.get("runner") or "", verdict=header.get("verdict") or "",
               finished=stamp[1], stamp=stamp[0],
               records=None if records is None else tuple(records), cells=tuple(cells))


def read_records(results_dir: str, commit: str, cell: str = "") -> list[TestRecord] | None:
    """The records of a commit's (or its cell's) JUnit file, None without
    one or when it cannot be read (the same parser as the dispatcher's,
    so ids are capped the same way)."""
    try:
        with open(results.junit_path(results_dir, commit, cell), "rb") as handle:
            data = handle.read(results.MAX_JUNIT_BYTES + 1)
    except OSError:
        return None
    return junit_xml.records_or_note(data)[0]


def run_from_files(results_dir: str, commit: str) -> Run | None:
    """A commit's run read back from its result file and JUnit file; for
    a matrix commit (header ``cells:``), each cell's records from the
    cell's own JUnit file (the commit's own file has none).  None without
    a complete result file."""
    path = os.path.join(results_dir, commit)
    stamp = file_stamp(path)
    header = results.read_header(path)
    if stamp is None or not header or not header.get("verdict"):
        return None
    names = results.cell_names(header)
    if not names:
        return run_from_header({**header, "commit": commit},
                               read_records(results_dir, commit), stamp)
    cells = [(name, tuple(read_records(results_dir, commit, name) or ())) for name in names]
    return run_from_header({**header, "commit": commit}, None, stamp, cells)


# --------------------------------------------------------------------------
# Opening, checking, rebuilding.

def connect(path: str) -> sqlite3.Connection:
    """The writer's connection: WAL (readers never block it nor it them),
    NORMAL sync (WAL stays consistent; a crash may lose the newest runs,
    which ``catch_up`` re-reads from their files)."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                           check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def check(conn: sqlite3.Connection) -> None:
    """StoreBroken unless the store is ours, of this schema, and intact."""
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise StoreBroken(f"schema version {version}, expected {SCHEMA_VERSION}")
        problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
    except sqlite3.DatabaseError as exc:
        raise StoreBroken(str(exc)) from None
    if problems != ["ok"]:
        raise StoreBroken("; ".join(str(p) for p in problems)[:300])


def remove_files(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass


def open_store(path: str) -> sqlite3.Connection:
    """The store at ``path``, ready to write: created when missing; when
    it is unusable, logged as such, deleted and created empty (``catch_up``
    then refills it from the result files)."""
    if os.path.exists(path):
        conn = None
        try:
            conn = connect(path)
            check(conn)
            return conn
        except (StoreBroken, sqlite3.DatabaseError) as exc:
            log.error("test history %s is unusable (%s): rebuilding it from the result files",
                      path, exc)
            if conn is not None:
                conn.close()
            remove_files(path)
    else:
        log.info("no test history at %s yet: building it from the result files", path)
    conn = connect(path)
    conn.executescript(SCHEMA)
    return conn


# --------------------------------------------------------------------------
# Writing runs.

def write_run(conn: sqlite3.Connection, run: Run) -> None:
    """Add one run (replacing the commit's earlier run) inside the caller's
    transaction."""
    old = conn.execute("SELECT id FROM runs WHERE commit_id = ?", (run.commit,)).fetchone()
    if old:
        forget_run(conn, old[0])
    run_id = conn.execute(
        "INSERT INTO runs (commit_id, branch, runner, verdict, finished, stamp) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (run.commit, run.branch, run.runner, run.verdict, run.finished, run.stamp)).lastrowid
    for cell, records in run.record_sets():
        write_records(conn, run_id, cell, records)


def write_records(conn: sqlite3.Connection, run_id: int, cell: str, records) -> None:
    """One set of a run's records (the commit's own, or one cell's), and
    the tests' running totals (runs, failures, seconds, flaky runs) and
    newest quarantined run."""
    ids = test_ids(conn, {record.id for record in records})
    conn.executemany(
        "INSERT INTO records (test, run, cell, outcome, duration, quarantined) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [(ids[r.id], run_id, cell, r.outcome, r.duration, int(r.quarantined)) for r in records])
    totals: dict[int, list] = collections.defaultdict(lambda: [0, 0, 0.0, 0])
    quarantined = set()
    for record in records:
        total = totals[ids[record.id]]
        total[0] += 1
        total[1] += record.outcome in FAILING
        total[2] += record.duration
        total[3] += record.outcome == results.FLAKY
        if record.quarantined:
            quarantined.add(ids[record.id])
    conn.executemany(
        "UPDATE tests SET runs = runs + ?, failures = failures + ?, seconds = seconds + ?, "
        "flaky = flaky + ? WHERE id = ?", [(*total, test) for test, total in totals.items()])
    conn.executemany("UPDATE tests SET quarantined_run = max(quarantined_run, ?) WHERE id = ?",
                     [(run_id, test) for test in quarantined])


def forget_run(conn: sqlite3.Connection, run_id: int) -> None:
    """Remove a run and take its records out of the tests' totals."""
    _forget_runs(conn, [run_id])


def forget_commit(conn: sqlite3.Connection, commit: str) -> None:
    """Drop a commit's run, if the store has one (its result was pruned)."""
    forget_commits(conn, [commit])


def forget_commits(conn: sqlite3.Connection, commits: list[str]) -> None:
    """Drop the runs of many commits (pruned results) in the caller's
    transaction: a few statements per LOOKUP_CHUNK commits rather than
    four per commit, which made forgetting 100,000 pruned runs the
    history writer's work for minutes (issue 21)."""
    forget_runs(conn, run_ids(conn, commits))


def run_ids(conn: sqlite3.Connection, commits: list[str]) -> list[int]:
    """The ids of the runs the store holds for ``commits``."""
    found: list[int] = []
    for start in range(0, len(commits), LOOKUP_CHUNK):
        chunk = commits[start:start + LOOKUP_CHUNK]
        marks = ",".join("?" * len(chunk))
        found += [row[0] for row in conn.execute(
            f"SELECT id FROM runs WHERE commit_id IN ({marks})", chunk)]
    return found


def forget_runs(conn: sqlite3.Connection, runs: list[int]) -> None:
    """Drop these runs and their records, LOOKUP_CHUNK at a time, in the
    caller's transaction."""
    for start in range(0, len(runs), LOOKUP_CHUNK):
        _forget_runs(conn, runs[start:start + LOOKUP_CHUNK])


def _forget_runs(conn: sqlite3.Connection, runs: list[int]) -> None:
    """Take the runs' records out of the tests' totals, then delete them;
    a test whose newest quarantined run was one of them gets its newest
    remaining one (one lookup along ``records_quarantined`` each)."""
    marks = ",".join("?" * len(runs))
    totals = conn.execute(
        "SELECT count(*), sum(outcome IN (?, ?, ?)), sum(duration), sum(outcome = ?), test "
        f"FROM records WHERE run IN ({marks}) GROUP BY test",
        (*FAILING, results.FLAKY, *runs)).fetchall()
    conn.executemany(
        "UPDATE tests SET runs = runs - ?, failures = failures - ?, "
        "seconds = max(seconds - ?, 0), flaky = flaky - ? WHERE id = ?", totals)
    conn.execute(f"DELETE FROM records WHERE run IN ({marks})", runs)
    conn.execute(f"DELETE FROM runs WHERE id IN ({marks})", runs)
    conn.execute(
        "UPDATE tests SET quarantined_run = coalesce((SELECT max(run) FROM records "
        "WHERE records.test = tests.id AND records.quarantined = 1), 0) "
        f"WHERE quarantined_run IN ({marks})", runs)


def test_ids(conn: sqlite3.Connection, names: set[str]) -> dict[str, int]:
    """name -> tests.id for every name, adding the new ones."""
    ids = _known_ids(conn, names)
    missing = [name for name in names if name not in ids]
    if missing:
        conn.executemany("INSERT INTO tests (name, key) VALUES (?, ?)",
                         [(name, test_key(name)) for name in missing])
        ids.update(_known_ids(conn, set(missing)))
    return ids


def _known_ids(conn: sqlite3.Connection, names: set[str]) -> dict[str, int]:
    ordered = list(names)
    ids = {}
    for start in range(0, len(ordered), LOOKUP_CHUNK):
        chunk = ordered[start:start + LOOKUP_CHUNK]
        marks = ",".join("?" * len(chunk))
        ids.update(conn.execute(f"SELECT name, id FROM tests WHERE name IN ({marks})", chunk))
    return ids


# --------------------------------------------------------------------------
# Catching up with the results folder.

def result_stamps(results_dir: str) -> dict[str, tuple[str, float]]:
    """commit -> (stamp, mtime) of every result file in the folder."""
    stamps = {}
    with os.scandir(results_dir) as listing:
        for entry in listing:
            if valid_full_commit(entry.name) and entry.is_file(follow_symlinks=False):
                stamp = file_stamp(entry.path)
                if stamp is not None:
                    stamps[entry.name] = stamp
    return stamps


def catch_up(conn: sqlite3.Connection, results_dir: str, should_stop=lambda: False) -> int:
    """Bring the store level with the results folder: runs for result files
    it lacks or holds an older version of (oldest first, so run ids follow
    finish order), and none for files that are gone.  Returns the number
    of runs read."""
    held = dict(conn.execute("SELECT commit_id, stamp FROM runs"))
    stamps = result_stamps(results_dir)
    stale = collections.deque(sorted(
        (c for c, (stamp, _) in stamps.items() if held.get(c) != stamp),
        key=lambda c: (stamps[c][1], c)))
    gone = [c for c in held if c not in stamps]
    with transaction(conn):
        forget_commits(conn, gone)
    read = 0
    while stale and not should_stop():
        with transaction(conn):
            pending = 0
            while stale and pending < BATCH_RECORDS and not should_stop():
                run = run_from_files(results_dir, stale.popleft())
                if run is not None:
                    write_run(conn, run)
                    read += 1
                    pending += sum(len(r) for _, r in run.record_sets()) + 1
    return read


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection):
    """BEGIN ... COMMIT (ROLLBACK on any error) on an autocommit connection."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
