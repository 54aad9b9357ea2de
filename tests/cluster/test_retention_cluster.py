"""Retention through the real daemons: a dispatcher with --keep-results
prunes what the policy lets go (result file, JUnit XML, history rows) and
keeps the branch's latest verdict and the commits that broke and fixed it;
SIGKILLed and restarted, it does not test a pruned commit again although
its journal still names it; the dashboard says the commit was pruned."""

from __future__ import annotations

import os
import signal
import sqlite3

from support.cluster import dispatch, wait_until
from support.procs import children_of
from support.dashboard import Dashboard, red_green_history

from ci.dispatch.journal import done_record, meta_record, queue_record
from ci.history import store
from ci.results import TestRecord
from ci.junit_xml import format_junit
from ci.retention import tombstones


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def seed(cluster) -> list[str]:
    """Five finished commits on main (pass, broke, fail, fixed, pass) with
    their XML, and a journal that still names them (as before compaction)."""
    os.makedirs(cluster.results)
    os.makedirs(cluster.state)
    commits = red_green_history(cluster.results)
    lines = []
    for i, commit in enumerate(commits):
        with open(os.path.join(cluster.results, commit + ".xml"), "wb") as handle:
            handle.write(format_junit([TestRecord("t", "test_one", "passed")], name=commit))
        lines += [queue_record(commit), meta_record(commit, "main", commits[i - 1] if i else None),
                  done_record(commit)]
    with open(os.path.join(cluster.state, "journal"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return commits


def history_runs(cluster) -> set[str]:
    path = os.path.join(cluster.state, store.FILE_NAME)
    if not os.path.exists(path):
        return set()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {row[0] for row in conn.execute("SELECT commit_id FROM runs")}
    except sqlite3.Error:
        return set()          # the store is still being created
    finally:
        conn.close()


def test_prune_keeps_what_matters_and_survives_sigkill(cluster, fake_runner, tmp_path):
    commits = seed(cluster)
    first, broke, failing, fixed, latest = commits
    pruned, kept = {first, failing}, {broke, fixed, latest}
    dispatcher = cluster.start_dispatcher("--keep-results", "1", "--prune-interval", "0.2")
    # The XMLs go in the pass's second sweep, after every result file.
    wait_until(lambda: set(cluster.result_files()) == kept and not any(
        os.path.exists(cluster.result_path(commit) + ".xml") for commit in pruned), 20,
        what="pruning")
    for commit in kept:
        assert os.path.exists(cluster.result_path(commit) + ".xml")
    wait_until(lambda: history_runs(cluster) == kept, 20, what="history rows pruned")
    assert set(tombstones.read(os.path.join(cluster.state, tombstones.FILE_NAME))) == pruned

    # The pruner's worker process goes with a dispatcher SIGKILLed mid-life.
    workers = [pid for pid in children_of(dispatcher.pid) if b"ci.retention.worker" in cmdline(pid)]
    assert len(workers) == 1
    dispatcher.stop(signal.SIGKILL)
    wait_until(lambda: not os.path.exists(f"/proc/{workers[0]}") or
               b"ci.retention.worker" not in cmdline(workers[0]), 10,
               what="the worker to exit with its dispatcher")
    cluster.start_dispatcher()            # no --keep-results: recovery alone
    runner = fake_runner()
    runner.register(cluster.dispatcher_port)
    dispatch(cluster, first)              # the observer sending it again: skipped
    new = "ab" * 20
    dispatch(cluster, new)
    wait_until(lambda: runner.received(), 10, what="an assignment")
    # Recovered commits would be queued before the new one: none were.
    assert runner.received() == [new]
    assert cluster.status()["pruned"] == "2"

    board = Dashboard(tmp_path, cluster.results, cluster.dispatcher_address)
    cluster.closers.append(board)
    item = board.json(f"/api/commits/{first}")
    assert (item["status"], item["verdict"], item["branch"]) == ("pruned", "passed", "main")
    code, _, page = board.get(f"/commit/{first}")
    assert code == 200 and b"result pruned" in page and b"No result" not in page
    main = next(b for b in board.json("/api/status")["branches"] if b["branch"] == "main")
    assert (main["pruned"], main["oldest_kept"]) == (2, broke)
    # The fixed commit keeps its mark: its predecessor's verdict is a tombstone's.
    assert board.json(f"/api/commits/{fixed}")["mark"] == "fixed"
