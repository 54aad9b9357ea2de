"""The test history store (ci/history/): rebuilt from the result files when
deleted, corrupt or behind; its writer, a child process, never holding up
the result path, even stalled, stopped or killed (restarted, and caught
up); and the queries the dashboard makes."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sqlite3
import time

import subprocess
import sys

import pytest

from support.cluster import ROOT, wait_until
from ci.dispatch.journal import Journal
from ci.dispatch.state import DispatcherState
from ci.history import store
from ci.history.queries import HistoryReader, Unavailable
from ci.history.writer import HistoryWriter
from ci import results
from ci.dispatch.cells import summary as cells_summary
from ci.matrix import Cell
from ci.outcome import Outcome
from ci.results import ERROR, FAILED, NAME_LIMIT, PASSED, SKIPPED, TestRecord


def commit_id(n: int) -> str:
    return hashlib.sha1(f"history-{n}".encode()).hexdigest()


def outcome(commit: str, records, branch="main", verdict=None, runner="r1") -> Outcome:
    failing = any(r.outcome in store.FAILING for r in records)
    return Outcome({"commit": commit, "verdict": verdict or ("failed" if failing else "passed"),
                    "runner": runner, "branch": branch}, b"output\n", tuple(records))


def records(n: int, fail_every: int = 0, slow: str = "") -> list[TestRecord]:
    """t.T.test_a (fails every ``fail_every``-th commit), t.T.test_b
    (always passes), t.T.test_slow (2 s), t.T.test_skip (skipped)."""
    flaky = FAILED if fail_every and n % fail_every == 0 else PASSED
    return [TestRecord("t.T", "test_a", flaky, 0.1, message="boom" if flaky != PASSED else ""),
            TestRecord("t.T", "test_b", PASSED, 0.2),
            TestRecord("t.T", "test_slow" + slow, PASSED, 2.0),
            TestRecord("t.T", "test_skip", SKIPPED, 0.0)]


def write(results_dir, n: int, branch="main", fail_every=3, mtime=None, **kw) -> str:
    """Commit ``n``'s result file and JUnit file, as the dispatcher writes them."""
    commit = commit_id(n)
    outcome(commit, records(n, fail_every, **kw), branch).write(str(results_dir), commit)
    if mtime is not None:
        os.utime(os.path.join(results_dir, commit), (mtime, mtime))
    return commit


@pytest.fixture
def folder(tmp_path):
    results = tmp_path / "test_results"
    results.mkdir()
    (tmp_path / "state").mkdir()
    return results


class Writers:
    """Starts HistoryWriters over one store file, as a dispatcher restarted
    would; ``stop_all`` is a dispatcher going down.  The writer processes
    log to ``log_path``."""

    def __init__(self, path: str, log_path: str):
        self.path = path
        self.log_path = log_path
        self.made: list[HistoryWriter] = []
        self.logs: list = []

    def __call__(self, results, **kwargs) -> HistoryWriter:
        self.logs.append(open(self.log_path, "ab"))
        writer = HistoryWriter(self.path, str(results), "DEBUG", self.logs[-1], **kwargs)
        writer.start()
        self.made.append(writer)
        assert writer.ready.wait(10), "the first catch-up did not finish"
        assert writer.proc.pid != os.getpid() and writer.proc.poll() is None
        return writer

    def log(self) -> str:
        with open(self.log_path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")

    def stop_all(self) -> None:
        for writer in self.made:
            # Resumed, should a test have stopped it (SIGCONT is harmless).
            if writer.proc.poll() is None:
                os.kill(writer.proc.pid, signal.SIGCONT)
            writer.stop()
            assert not writer.thread.is_alive() and writer.proc.poll() is not None
        for handle in self.logs:
            handle.close()
        self.logs.clear()


@pytest.fixture
def writers(tmp_path):
    made = Writers(str(tmp_path / "state" / store.FILE_NAME), str(tmp_path / "writer.log"))
    yield made
    made.stop_all()


def reader_for(writer) -> HistoryReader:
    return HistoryReader(writer.path)


def runs_held(path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM runs").fetchone()[0]
    finally:
        conn.close()


# --------------------------------------------------------------------------
# Queries.

def test_queries_follow_a_test_across_commits(folder, writers):
    base = time.time() - 1000
    commits = [write(folder, n, mtime=base + n) for n in range(12)]
    write(folder, 100, branch="feature", fail_every=1, mtime=base + 5.5)
    writer = writers(folder)
    reader = reader_for(writer)
    test = reader.test("t.T.test_a", branch="main")
    assert [r["commit"] for r in test["recent"]] == commits[::-1]
    # n = 0, 3, 6, 9 fail on main; the feature branch's one run failed too.
    assert [r["outcome"] for r in test["recent"]][::-1] == \
        [FAILED if n % 3 == 0 else PASSED for n in range(12)]
    assert test["runs"] == 13 and test["failures"] == 5
    assert test["window"]["failures"] == 4 and test["window"]["runs"] == 12
    assert test["window"]["failure_rate"] == round(4 / 12, 4)
    assert test["branches"] == ["feature", "main"]
    # Without a branch: the one it last ran on (main's newest is newer).
    assert reader.test("t.T.test_a")["branch"] == "main"
    assert len(reader.test("t.T.test_a", branch="main", limit=5)["recent"]) == 5
    assert reader.test("t.T.test_a", branch="feature")["recent"][0]["outcome"] == FAILED
    by_key = reader.test(key=test["key"], branch="main")
    assert by_key["id"] == "t.T.test_a" and by_key["recent"] == test["recent"]
    assert reader.test("t.T.no_such_test") is None

    overview = reader.overview(limit=2)
    assert overview["results"] == 13
    assert [t["id"] for t in overview["slowest"]] == ["t.T.test_slow", "t.T.test_b"]
    assert overview["slowest"][0]["mean_duration"] == 2.0
    assert [t["id"] for t in overview["failing"]] == ["t.T.test_a"]
    assert overview["failing"][0]["failures"] == 5


def test_a_retested_commit_replaces_its_run_and_totals(folder, writers):
    commit = write(folder, 3, fail_every=3)           # test_a fails
    writer = writers(folder)
    reader = reader_for(writer)
    assert reader.test("t.T.test_a")["failures"] == 1
    # The retest passes: the file is replaced, and so is the run.
    outcome(commit, records(1), verdict="passed").write(str(folder), commit)
    writer.result_written(commit, outcome(commit, records(1)))
    wait_until(lambda: reader.test("t.T.test_a")["failures"] == 0, 10, what="the retest")
    test = reader.test("t.T.test_a")
    assert test["runs"] == 1 and [r["outcome"] for r in test["recent"]] == [PASSED]
    assert reader.overview()["results"] == 1


def test_test_ids_of_any_characters_and_length_are_capped_like_records(folder, writers):
    evil = "<script>alert(1)</script>\n\x00é" + "x" * 5000
    commit = commit_id(7)
    outcome(commit, [TestRecord("mod.<Cls>", evil, ERROR, 0.5)]).write(str(folder), commit)
    writer = writers(folder)
    overview = reader_for(writer).overview()
    (row,) = overview["failing"]
    name = row["id"]
    assert name.startswith("mod.<Cls>.<script>alert(1)</script> ")  # flattened, one line
    assert "\n" not in name and "\x00" not in name
    assert len(name) == len("mod.<Cls>.") + NAME_LIMIT
    assert reader_for(writer).test(name)["recent"][0]["outcome"] == ERROR
    assert reader_for(writer).test(key=store.test_key(name))["id"] == name


# --------------------------------------------------------------------------
# Matrix cells and quarantine.

def write_matrix(results_dir, n: int, cells: dict, branch="main", mtime=None) -> str:
    """Commit ``n`` of a matrix, as the dispatcher writes it: each cell's
    result and JUnit files, then the commit's own file from their headers
    (``cells.summary``, no XML of its own)."""
    commit = commit_id(n)
    for name, cell_records in cells.items():
        outcome(commit, cell_records, branch).with_header(cell=name).write(
            str(results_dir), commit, name)
    headers = {name: results.read_header(os.path.join(
        results_dir, results.result_name(commit, name))) for name in cells}
    cells_summary(commit, {name: Cell(name) for name in cells}, headers).write(
        str(results_dir), commit)
    if mtime is not None:
        os.utime(os.path.join(results_dir, commit), (mtime, mtime))
    return commit


def test_a_matrix_commit_records_each_cell_from_its_own_files(folder, writers):
    base = time.time() - 1000
    old = write(folder, 1, fail_every=1, mtime=base)
    commit = write_matrix(folder, 2, {"py3.9": records(3, fail_every=3),
                                      "py3.12": records(1)}, mtime=base + 1)
    # As the dispatcher leaves it: the commit's own file, no XML of its own.
    assert results.read_header(os.path.join(folder, commit))["cells"] == \
        "py3.9=failed py3.12=passed"
    assert not os.path.exists(results.junit_path(str(folder), commit))
    writer = writers(folder)
    reader = reader_for(writer)
    test = reader.test("t.T.test_a", branch="main")
    assert [(r["commit"], r["cell"], r["outcome"]) for r in test["recent"]] == [
        (commit, "py3.12", PASSED), (commit, "py3.9", FAILED), (old, "", FAILED)]
    assert test["cells"] == ["py3.12", "py3.9"]
    assert test["runs"] == 3 and test["failures"] == 2
    only = reader.test("t.T.test_a", branch="main", cell="py3.9")
    assert [(r["commit"], r["outcome"]) for r in only["recent"]] == [(commit, FAILED)]
    assert reader.test("t.T.test_a", cell="")["recent"][0]["commit"] == old

    # Retesting one cell rewrites its files, then the commit's: its rows replaced.
    outcome(commit, records(1), "main").with_header(cell="py3.9").write(
        str(folder), commit, "py3.9")
    headers = {name: results.read_header(os.path.join(
        folder, results.result_name(commit, name))) for name in ("py3.9", "py3.12")}
    told = cells_summary(commit, {n: Cell(n) for n in headers}, headers)
    told.write(str(folder), commit)
    writer.result_written(commit, told)
    wait_until(lambda: reader.test("t.T.test_a")["failures"] == 1, 10, what="the cell retest")
    only = reader.test("t.T.test_a", branch="main", cell="py3.9")
    assert [(r["commit"], r["outcome"]) for r in only["recent"]] == [(commit, PASSED)]
    assert reader.test("t.T.test_a")["runs"] == 3

    # A rebuild reads the cells' files too.
    writers.stop_all()
    store.remove_files(writer.path)
    rebuilt = reader_for(writers(folder)).test("t.T.test_a", branch="main")
    assert [(r["cell"], r["outcome"]) for r in rebuilt["recent"]] == [
        ("py3.12", PASSED), ("py3.9", PASSED), ("", FAILED)]


def quarantined(n: int, marked: bool) -> list[TestRecord]:
    """t.T.test_q fails in every commit, quarantined when ``marked``."""
    return [TestRecord("t.T", "test_q", FAILED, 0.1, message="boom", quarantined=marked),
            TestRecord("t.T", "test_b", PASSED, 0.2)]


def test_quarantined_since_is_the_first_commit_of_the_current_quarantine(folder, writers):
    base = time.time() - 1000
    marks = [False, True, True, False, True, True]      # lifted at 3, set again at 4
    commits = []
    for n, marked in enumerate(marks):
        commit = commit_id(200 + n)
        outcome(commit, quarantined(n, marked), verdict="passed").write(str(folder), commit)
        os.utime(os.path.join(folder, commit), (base + n, base + n))
        commits.append(commit)
    other = commit_id(300)                              # another branch, quarantined earlier
    outcome(other, quarantined(0, True), branch="feature").write(str(folder), other)
    os.utime(os.path.join(folder, other), (base - 10, base - 10))
    reader = reader_for(writers(folder))
    assert reader.quarantined_since(commits[5], ["t.T.test_q"]) == {"t.T.test_q": commits[4]}
    assert reader.quarantined_since(commits[4], ["t.T.test_q"]) == {"t.T.test_q": commits[4]}
    assert reader.quarantined_since(commits[2], ["t.T.test_q", "t.T.test_b", "t.T.none"]) == \
        {"t.T.test_q": commits[1]}
    assert reader.quarantined_since(commits[3], ["t.T.test_q"]) == {}
    assert reader.quarantined_since(other, ["t.T.test_q"]) == {"t.T.test_q": other}
    assert reader.quarantined_since(commit_id(999), ["t.T.test_q"]) == {}
    assert [r["quarantined"] for r in reader.test("t.T.test_q")["recent"]] == marks[::-1]


# --------------------------------------------------------------------------
# Rebuilding from the result files.

def test_a_deleted_store_is_rebuilt_from_the_result_files(folder, writers, tmp_path):
    for n in range(5):
        write(folder, n)
    writer = writers(folder)
    assert runs_held(writer.path) == 5
    writers.stop_all()
    store.remove_files(writer.path)
    writer = writers(folder)
    assert runs_held(writer.path) == 5
    assert reader_for(writer).test("t.T.test_a")["failures"] == 2


def test_a_corrupt_store_is_logged_and_rebuilt(folder, writers):
    for n in range(4):
        write(folder, n)
    path = writers(folder).path
    writers.stop_all()
    with open(path, "r+b") as handle:        # overwrite the header and the first pages
        handle.write(b"this is not a database" * 400)
    writer = writers(folder)
    assert any(" ERROR ci.history.store: " in line and "unusable" in line and
               "rebuilding it from the result files" in line
               for line in writers.log().splitlines()), writers.log()
    assert runs_held(writer.path) == 4


def test_a_store_behind_the_folder_catches_up(folder, writers):
    """Results written while the dispatcher was down (or lost from a full
    queue) are read from the files at start; a file replaced by a retest
    is read again; a file gone is forgotten."""
    first = [write(folder, n) for n in range(3)]
    writers(folder)
    writers.stop_all()
    later = write(folder, 10, fail_every=1)
    write(folder, 0, fail_every=1)                     # retested: test_a now fails
    os.unlink(os.path.join(folder, first[1]))
    writer = writers(folder)
    reader = reader_for(writer)
    commits = {r["commit"]: r["outcome"] for r in reader.test("t.T.test_a")["recent"]}
    assert set(commits) == {first[0], first[2], later}
    assert commits[first[0]] == FAILED and commits[later] == FAILED


def test_a_schema_from_another_version_is_rebuilt(folder, writers):
    write(folder, 1)
    path = writers(folder).path
    writers.stop_all()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    # The dashboard refuses it until the dispatcher's writer rebuilds it.
    with pytest.raises(Unavailable, match="schema version 99"):
        HistoryReader(path).overview()
    writer = writers(folder)
    assert reader_for(writer).overview()["results"] == 1


# --------------------------------------------------------------------------
# The result path never waits for the writer.

def dispatcher_state(folder, tmp_path, writer) -> DispatcherState:
    """A dispatcher's state whose results tell ``writer``, one runner registered."""
    state = DispatcherState(str(folder), Journal(str(tmp_path / "journal")), 3)
    state.recover(0)
    state.listeners.append(writer.result_written)
    state.register(("127.0.0.1", 9001), "i1", None)
    return state


# A result that waited for the writer waited its busy timeout (2 s) or for
# ever (a full pipe): half of it is slack for a loaded disk's fsyncs.
NEVER_WAITED = store.BUSY_TIMEOUT_MS / 1000 / 2


def store_results(state, commits, first: int = 0) -> float:
    """Each commit through the result path; the slowest call, in seconds."""
    state.enqueue(commits)
    slowest = 0.0
    for n in range(len(commits)):
        job = state.next_assignment()
        started = time.monotonic()
        assert state.record_result(job.commit, job.token, None,
                                   outcome(job.commit, records(first + n, 2), branch=""))
        slowest = max(slowest, time.monotonic() - started)
        assert os.path.exists(os.path.join(state.results_dir, job.commit))
    return slowest


def test_a_stalled_writer_never_holds_up_the_result_path(folder, writers, tmp_path):
    """Another process holds the store's write lock: the writer stalls.
    Results still land, each in about the time a file write takes, even
    past the writer's queue limit; once the lock goes, the store catches
    up with every one of them."""
    writer = writers(folder, max_pending=20)
    blocker = sqlite3.connect(writer.path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    state = dispatcher_state(folder, tmp_path, writer)
    slowest = store_results(state, [commit_id(200 + n) for n in range(30)])
    # The writer's busy timeout alone is 2 s: nothing waited for it.
    assert slowest < NEVER_WAITED, slowest
    assert runs_held(writer.path) == 0          # nothing written past the lock
    blocker.execute("ROLLBACK")
    blocker.close()
    wait_until(lambda: runs_held(writer.path) == 30, 20, what="the catch-up")
    assert reader_for(writer).test("t.T.test_a", branch="")["window"]["runs"] == 30


def test_a_full_pipe_drops_lines_and_the_store_catches_up(folder, writers, tmp_path):
    """The writer process is stopped (SIGSTOP): its stdin pipe fills, and
    further lines are dropped, never waited for; once it runs again it is
    told to catch up, and the store holds every result, also those whose
    lines were dropped."""
    writer = writers(folder)
    os.kill(writer.proc.pid, signal.SIGSTOP)
    state = dispatcher_state(folder, tmp_path, writer)
    slowest = store_results(state, [commit_id(300 + n) for n in range(5)])
    filler = outcome(commit_id(300), records(0))
    for _ in range(20_000):                 # 64 KiB of 48-byte lines fill it long before
        started = time.monotonic()
        writer.result_written(commit_id(300), filler)
        slowest = max(slowest, time.monotonic() - started)
        if writer.dropped:
            break
    assert writer.dropped, "the pipe never filled"
    late = [commit_id(400 + n) for n in range(5)]
    slowest = max(slowest, store_results(state, late, first=5))
    assert slowest < NEVER_WAITED, slowest
    os.kill(writer.proc.pid, signal.SIGCONT)
    # A ``catchup`` that fitted in the pipe's last bytes may have done the
    # work already: the supervisor's tick still sends its own, and clears the mark.
    wait_until(lambda: runs_held(writer.path) == 10 and not writer.dropped, 20,
               what="the catch-up")
    held = {r["commit"] for r in reader_for(writer).test("t.T.test_a", branch="")["recent"]}
    assert set(late) <= held


def test_a_killed_writer_is_restarted_and_catches_up(folder, writers, tmp_path, caplog):
    """The writer process dies (SIGKILL): results meanwhile still land in
    their files; the dispatcher starts a new writer, which catches up."""
    caplog.set_level(logging.ERROR, logger="ci.history.writer")
    writer = writers(folder)
    first = writer.proc
    state = dispatcher_state(folder, tmp_path, writer)
    store_results(state, [commit_id(500)])
    wait_until(lambda: runs_held(writer.path) == 1, 10, what="the first result")
    first.kill()
    first.wait(5)
    slowest = store_results(state, [commit_id(501 + n) for n in range(3)], first=1)
    assert slowest < NEVER_WAITED, slowest
    wait_until(lambda: writer.proc is not first and writer.proc.poll() is None, 10,
               what="a new writer")
    assert writer.restarts >= 1
    wait_until(lambda: runs_held(writer.path) == 4, 20, what="the catch-up")
    assert any("exited with status -9; restarting it" in r.getMessage()
               for r in caplog.records if r.name == "ci.history.writer"), caplog.text


def test_writer_process_exits_when_its_stdin_closes(folder, tmp_path):
    """A dispatcher SIGKILLed cannot stop its writer: the writer exits by
    itself once its stdin (the dispatcher's end of the pipe) closes."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ci.history.child", "--store",
         str(tmp_path / "state" / store.FILE_NAME), "--results-dir", str(folder)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        cwd=ROOT, start_new_session=True)
    try:
        assert proc.stdout.readline() == b"ready\n"
        write(folder, 1)
        proc.stdin.write(f"result {commit_id(1)}\nnonsense line\n".encode())
        proc.stdin.flush()
        wait_until(lambda: runs_held(str(tmp_path / "state" / store.FILE_NAME)) == 1, 10,
                   what="the result")
        proc.stdin.close()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_forgetting_many_runs_at_once_equals_a_store_without_them(folder, tmp_path):
    # Pruning drops runs a chunk at a time (issue 21): the totals must be
    # those of a store that never held the forgotten runs.
    base = time.time() - 1000
    commits = [write(folder, n, mtime=base + n) for n in range(9)]
    conn = store.open_store(str(tmp_path / "state" / "all.sqlite3"))
    store.catch_up(conn, str(folder))
    with store.transaction(conn):
        store.forget_commits(conn, commits[:6] + ["0" * 40])    # one it never had
    for commit in commits[:6]:
        os.unlink(os.path.join(folder, commit))
    fresh = store.open_store(str(tmp_path / "state" / "fresh.sqlite3"))
    store.catch_up(fresh, str(folder))
    query = "SELECT name, runs, failures, round(seconds, 6) FROM tests ORDER BY name"
    assert conn.execute(query).fetchall() == fresh.execute(query).fetchall()
    assert {r[0] for r in conn.execute("SELECT commit_id FROM runs")} == set(commits[6:])
    assert conn.execute("SELECT count(*) FROM records").fetchone()[0] == 3 * 4


def test_the_writer_waits_for_a_burst_to_end_but_never_longer_than_max_defer(tmp_path):
    """``_settle`` (on a fake clock): while lines keep coming less than
    SETTLE apart it waits, and it writes SETTLE after the last one, or once
    the oldest waiting line is MAX_DEFER old under a stream that never stops."""
    from ci.history import child

    class Clock:
        """Time moves only when the writer waits; every wait may bring a line."""
        def __init__(self):
            self.now, self.lines_until = 100.0, 0.0

        def wait(self, seconds):
            self.now += min(seconds, 0.05)
            if self.now < self.lines_until:
                writer.last_line = self.now     # the reader queued another line
            return False

        def is_set(self):
            return False

    clock = Clock()
    writer = child.StoreWriter(str(tmp_path / "h.sqlite3"), str(tmp_path))
    writer.clock, writer.stop_event = (lambda: clock.now), clock
    # A burst of 3 s: written SETTLE after its last line.
    writer.last_line, clock.lines_until = clock.now, clock.now + 3.0
    start = clock.now
    writer._settle(oldest=start)
    assert 3.0 + child.SETTLE - 0.06 <= clock.now - start <= 3.0 + child.SETTLE + 0.06
    # A stream that never stops: written once the oldest line is MAX_DEFER old.
    writer.last_line, clock.lines_until = clock.now, float("inf")
    start = clock.now
    writer._settle(oldest=start)
    assert abs(clock.now - start - child.MAX_DEFER) < 0.06
    # Nothing came for SETTLE: no wait at all.
    writer.last_line = clock.now - child.SETTLE
    before = clock.now
    writer._settle(oldest=before - 1)
    assert clock.now == before


def test_the_writer_waits_while_the_dispatcher_stores_a_result(folder, writers):
    """The child looks at the dispatcher's result gate (a shared page)
    before each transaction: while a result is being stored it writes
    nothing (at most a second a batch: held for ever, the history still
    follows), then goes on."""
    from ci.retention.gate import ResultGate
    gate = ResultGate(longest=30.0)
    if gate.share() < 0:
        pytest.skip("no memfd on this system")
    writer = writers(folder, gate=gate)
    commit = write(folder, 1)
    with gate:
        writer.result_written(commit, None)
        deadline = time.monotonic() + 0.8      # SETTLE is 0.2 s; the wait at most 1 s
        while time.monotonic() < deadline:
            assert runs_held(writer.path) == 0
            time.sleep(0.05)
    wait_until(lambda: runs_held(writer.path) == 1, 10, what="the run written after the gate")


def test_pruned_runs_are_dropped_after_the_pass_and_a_retest_keeps_its_run(folder, writers):
    """``forget`` lines wait until none came for FORGET_SETTLE seconds (a
    pass is over), then the runs go oldest first; a commit retested after
    its prune (``forget`` then ``result``) keeps its new run."""
    from ci.history import child
    commits = [write(folder, n, mtime=1000.0 + n) for n in range(1, 5)]
    writer = writers(folder)
    assert runs_held(writer.path) == 4
    for commit in commits[:3]:
        os.unlink(os.path.join(folder, commit))
        os.unlink(os.path.join(folder, commit + ".xml"))
    writer.forget(commits[:3])
    write(folder, 3)                                # commit 3 retested after its prune
    writer.result_written(commits[2], None)
    sent = time.monotonic()
    while time.monotonic() - sent < child.FORGET_SETTLE * 0.5:
        assert runs_held(writer.path) == 4          # nothing dropped while forgets may come
        time.sleep(0.05)

    def held() -> set:
        conn = sqlite3.connect(f"file:{writer.path}?mode=ro", uri=True)
        try:
            return {row[0] for row in conn.execute("SELECT commit_id FROM runs")}
        finally:
            conn.close()
    wait_until(lambda: held() == {commits[2], commits[3]}, 20, what="the pruned runs dropped")


def test_forget_lines_go_whole_lines_in_writes_no_longer_than_pipe_buf():
    """A pass's batch of forgets is a few writes, not one a commit; each is
    all or nothing on a non-blocking pipe (at most PIPE_BUF) and holds
    whole lines, in order."""
    from ci.history.writer import PIPE_BUF, pipe_chunks
    lines = [f"forget {commit_id(n)}\n".encode() for n in range(200)]
    chunks = pipe_chunks(lines)
    assert b"".join(chunks) == b"".join(lines)
    assert all(len(c) <= PIPE_BUF and c.endswith(b"\n") for c in chunks)
    assert len(chunks) == -(-len(b"".join(lines)) // (PIPE_BUF // len(lines[0]) * len(lines[0])))
    assert pipe_chunks([]) == []


def test_a_batch_of_forgets_longer_than_one_write_drops_every_run(folder, writers):
    """200 forgets (three writes) reach the child whole: every run goes."""
    commits = [write(folder, n, fail_every=0) for n in range(1, 201)]
    writer = writers(folder)
    assert runs_held(writer.path) == 200
    for commit in commits[:-1]:
        os.unlink(os.path.join(folder, commit))
        os.unlink(os.path.join(folder, commit + ".xml"))
    writer.forget(commits[:-1])
    wait_until(lambda: runs_held(writer.path) == 1, 30, what="199 pruned runs dropped")
    assert not writer.dropped
