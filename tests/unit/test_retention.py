"""Retention (--keep-results): the policy's parsing and plan (what is
always kept, what goes), tombstone lines, and a pass of the pruner over a
real results folder with the dispatcher's state in-process: files, XML
and history rows go, and the state and its recovery count a pruned
commit as finished."""

from __future__ import annotations

import os
import threading
import time
import types

import pytest

from ci.config import ConfigError
from ci import matrix
from ci.dispatch.journal import Journal, cell_record, done_record, meta_record, queue_record
from ci.dispatch.state import DispatcherState
from ci.dispatch.work import Meta, WorkState, work_key
from ci.history import store
from ci.outcome import Outcome
from ci.results import TestRecord
from ci.retention import tombstones
from ci.retention.policy import Entry, KeepPolicy, parse_keep, plan
from ci.retention.gate import PAUSE, QUIET_PAUSE, REST_CAP, Pacer, rest_after
from ci.retention.pruner import Pruner
from ci.retention.tombstones import Tombstone, TombstoneFile
from ci.retention.worker import TRASH


def cid(n: int) -> str:
    return f"{n:040x}"


STARTED: list[Pruner] = []


def pruner_for(state, rules: KeepPolicy, **options) -> Pruner:
    """A pruner whose worker process the fixture below ends."""
    pruner = Pruner(state, state.tombstones, rules, **options)
    STARTED.append(pruner)
    return pruner


@pytest.fixture(autouse=True)
def stop_pruners():
    yield
    while STARTED:
        pruner = STARTED.pop()
        proc = pruner.worker.proc
        pruner.stop()
        assert proc is None or proc.poll() is not None


# ---- the policy ----------------------------------------------------------

def test_parse_keep_count_age_both():
    assert parse_keep("50") == KeepPolicy(50, None)
    assert parse_keep("30d") == KeepPolicy(None, 30 * 86400)
    assert parse_keep("12h,7") == KeepPolicy(7, 12 * 3600)
    for bad in ("0", "", "5x", "1,2", "1d,2d", "-3", "50,", "d"):
        with pytest.raises(ConfigError):
            parse_keep(bad)


def chain(branch: str, verdicts: str, start: int = 0, t0: float = 1000.0) -> dict:
    """One branch's commits in order, each naming the one before;
    verdicts as letters (p passed, f failed)."""
    names = {"p": "passed", "f": "failed", "e": "error"}
    out, previous = {}, None
    for i, letter in enumerate(verdicts):
        commit = cid(start + i + 1)
        out[commit] = Entry(commit, branch, previous, names[letter], t0 + i)
        previous = commit
    return out


def test_count_keeps_newest_latest_and_changes():
    # p p f f f p p p: commit 3 broke it, commit 6 fixed it.
    entries = chain("main", "ppfffppp")
    doomed = plan(entries, KeepPolicy(count=2), now=2000.0)
    assert doomed == [cid(1), cid(2), cid(4), cid(5)]   # oldest first
    assert cid(3) not in doomed and cid(6) not in doomed   # broke, fixed
    assert cid(7) not in doomed and cid(8) not in doomed   # newest two


def test_latest_of_every_branch_kept_even_past_age():
    entries = {**chain("main", "ppp"), **chain("dev", "p", start=100, t0=10.0)}
    doomed = plan(entries, KeepPolicy(age=60.0), now=5000.0)
    assert cid(3) not in doomed and cid(101) not in doomed
    assert doomed == [cid(1), cid(2)]


def test_both_rules_keep_the_union():
    entries = chain("main", "pppppp", t0=0.0)       # finished at 0..5
    assert plan(entries, KeepPolicy(count=2, age=10.0), now=13.5) == [cid(1), cid(2), cid(3), cid(4)]
    assert plan(entries, KeepPolicy(count=2, age=10.0), now=12.5) == [cid(1), cid(2), cid(3)]
    assert plan(entries, KeepPolicy(count=5, age=1.0), now=100.0) == [cid(1)]


def test_change_against_a_pruned_predecessor_is_still_kept():
    entries = chain("main", "fpp")
    del entries[cid(1)]           # pruned before: its verdict is a tombstone's
    assert cid(2) in plan(entries, KeepPolicy(count=1), now=0.0)
    assert cid(2) not in plan(entries, KeepPolicy(count=1), now=0.0,
                              pruned_verdicts={cid(1): "failed"})


def test_branch_head_kept_when_an_old_commit_was_retested_last():
    entries = chain("main", "ppp")
    entries[cid(1)] = Entry(cid(1), "main", None, "passed", 9999.0)   # retested last
    doomed = plan(entries, KeepPolicy(count=1), now=10000.0)
    assert doomed == [cid(2)]     # cid(1) newest, cid(3) the head


def test_the_tip_stays_after_a_retest_of_a_commit_whose_successor_was_pruned(tmp_path):
    """Heads were found from the result files alone: with c3 pruned, a
    retest of c2 (now the newest) left c2 named by no result, so c2 passed
    for the head too, and the real tip c4 was pruned."""
    entries = chain("main", "ppp", start=1)              # c2, c3, c4
    del entries[cid(3)]                                    # pruned before
    entries[cid(2)] = Entry(cid(2), "main", cid(1), "passed", 9_000_000.0)   # retested
    stones = TombstoneFile(str(tmp_path / "pruned"))
    stones.append([Tombstone(cid(3), "passed", 1001.0, 2000.0, cid(2), "main")])
    follower = tombstones.VerdictFollower(stones.path)
    verdicts = follower.verdicts()
    assert follower.named == {("main", cid(2))}
    month = KeepPolicy(age=30 * 86400)
    assert cid(4) in plan(entries, month, now=9_000_001.0, pruned_verdicts=verdicts)
    assert plan(entries, month, now=9_000_001.0, pruned_verdicts=verdicts,
                pruned_named=follower.named) == []


def test_the_commit_after_a_running_retest_is_kept():
    """Judged against the retest's old verdict, c3 changed nothing and was
    pruned; the retest then failed, which made c3 the commit that fixed main."""
    doomed = plan(chain("main", "ppppp"), KeepPolicy(count=1), now=0.0, pending=[cid(2)])
    assert cid(2) not in doomed and cid(3) not in doomed and doomed == [cid(1), cid(4)]


def test_a_matrix_commits_cells_are_not_tested_again_after_a_crash_mid_prune(tmp_path):
    """A pass moves a matrix commit's cell files before its own: killed
    between, a restart found the commit done (its file) and not pruned,
    its cells neither, and queued every cell again."""
    folder = tmp_path / "results"
    folder.mkdir()
    m = cid(1)
    header = {"verdict": "passed", "tests": 1, "failures": 0, "errors": 0, "skipped": 0,
              "branch": "main", "commit": m, "cells": "py39=passed py312=passed"}
    Outcome(header, b"output\n").write(str(folder), m)      # the cells' files moved
    TombstoneFile(str(tmp_path / tombstones.FILE_NAME)).append(
        [Tombstone(m, "passed", 1.0, 2.0, None, "main")])
    records = []
    for cell in ("py39", "py312"):
        key = f"{m}:{cell}"
        records += [queue_record(key), cell_record(key, matrix.Cell(cell)),
                    meta_record(key, "main", None), done_record(key)]
    (tmp_path / "journal").write_text("\n".join(records + [done_record(m)]) + "\n")
    state = DispatcherState(str(folder), Journal(str(tmp_path / "journal")), 3)
    state.tombstones = TombstoneFile(str(tmp_path / tombstones.FILE_NAME))
    try:
        state.recover()
        assert not state.work and not state.queue
    finally:
        state.journal.close()


def test_a_pruned_commit_whose_file_a_batch_is_still_moving_keeps_its_meta(tmp_path):
    """A retest read the tombstone only once the file was gone; while a
    batch was still moving it, it read neither (the file is gone by the
    time the retest's wait for the batch ends) and ran without branch or
    previous."""
    folder = tmp_path / "results"
    folder.mkdir()
    write_results(folder, chain("main", "pp"))
    state = new_state(tmp_path)
    state.tombstones.append([Tombstone(cid(2), "passed", 1001.0, 2000.0, cid(1), "main")])
    with state.cond:
        assert state._mark_unlinking(work_key(cid(2)))      # a batch is moving it
    try:
        stone = state.pruned_stones([cid(2)])[cid(2)]
        assert Meta(stone.branch, stone.previous) == Meta("main", cid(1))
    finally:
        state.journal.close()


def test_a_retest_of_a_pruned_matrix_commit_runs_its_cells_again(tmp_path):
    """The tombstone kept no cells: once the cell files were pruned, a
    retest of the commit ran one plain job on the runner's own Python,
    and a retest of one cell was refused ("has no cell")."""
    folder = tmp_path / "results"
    m = write_matrix_chain(folder, {"py39": "3.9", "py312": "3.12"})
    state = new_state(tmp_path)
    assert pruner_for(state, KeepPolicy(count=1)).run_once().pruned == 2
    assert not any(name.startswith(m) for name in os.listdir(folder))
    assert sorted(state.retest([f"{m}:py39"])) == [f"{m}:py39"]
    assert state.work[f"{m}:py39"].cell.python == "3.9"
    assert state.work[f"{m}:py39"].meta.branch == "main"
    assert state.retest([m]) == [f"{m}:py312"]      # py39 is queued already
    assert state.work[f"{m}:py312"].cell.python == "3.12"


def test_a_retest_of_a_pruned_labelled_commit_asks_for_its_labels_again(tmp_path):
    """A commit without a matrix whose recipe asked for ``labels = gpu``:
    once pruned, its tombstone keeps the labels, and a retest goes to a
    runner with them again; the tombstone kept nothing, so the retest ran
    on any runner (its labels were read from the file that was gone)."""
    folder = tmp_path / "results"
    folder.mkdir()
    entries = chain("main", "ppp")
    write_results(folder, entries)
    labelled = cid(1)
    header = {"verdict": "passed", "tests": 1, "failures": 0, "errors": 0, "skipped": 0,
              "branch": "main", "commit": labelled, "labels": "gpu big"}
    Outcome(header, b"output\n").write(str(folder), labelled)
    os.utime(folder / labelled, (entries[labelled].finished,) * 2)
    state = new_state(tmp_path)
    assert pruner_for(state, KeepPolicy(count=1)).run_once().pruned == 2
    assert not os.path.exists(folder / labelled)
    stone = tombstones.read(str(tmp_path / tombstones.FILE_NAME))[labelled]
    assert stone.cells and not tombstones.read(str(tmp_path / tombstones.FILE_NAME))[cid(2)].cells
    assert state.retest([labelled]) == [labelled]
    assert state.work[labelled].cell.labels == frozenset({"gpu", "big"})
    assert state.work[labelled].meta.branch == "main"
    assert state.retest([cid(2)]) == [cid(2)]
    assert state.work[cid(2)].cell.labels == frozenset()


# ---- tombstones ------------------------------------------------------------

def test_tombstone_lines_round_trip_and_damage_is_skipped(tmp_path):
    t = Tombstone(cid(1), "failed", 100.0, 200.0, cid(2), "feature/x")
    assert tombstones.parse_line(tombstones.format_line(t)) == t
    matrix_commit = Tombstone(cid(4), "passed", 1.0, 2.0, None, "main", "cells=W3siIjoiIn1d")
    assert tombstones.parse_line(tombstones.format_line(matrix_commit)) == matrix_commit
    bare = Tombstone(cid(3), "passed", 1.0, 2.0, None, None)
    data = (tombstones.format_line(t) + "\ngarbage line\n" + tombstones.format_line(bare)
            + "\n" + tombstones.format_line(t)[:30]).encode()
    assert tombstones.parse_lines(data) == {cid(1): t, cid(3): bare}


def test_a_torn_tombstone_is_never_read_even_when_it_parses(tmp_path):
    """A crash cut a matrix commit's tombstone before its cells: what was
    left parsed, so the commit counted as pruned with no cells to test
    again (though its files were never removed: the line was not fsynced)."""
    stone = Tombstone(cid(4), "passed", 1.0, 2.0, None, "main", "cells=W3siIjoiIn1d")
    whole = tombstones.format_line(stone)
    torn = whole[:whole.index(" cells=")]
    assert tombstones.parse_line(torn) is not None
    path = tmp_path / tombstones.FILE_NAME
    path.write_bytes(torn.encode())
    f = TombstoneFile(str(path))
    assert f.load() == {} and f.find(cid(4)) is None and f.find_many([cid(4)]) == {}


def test_a_tombstone_appended_after_a_torn_line_is_read(tmp_path):
    """A crash mid-append tore the last line; the next batch's first
    tombstone was appended straight after it, glued and unreadable, while
    its commit's files were removed: neither a result nor a tombstone."""
    path = tmp_path / tombstones.FILE_NAME
    first = Tombstone(cid(1), "passed", 1.0, 2.0, None, "main")
    path.write_bytes((tombstones.format_line(first) + "\n"
                      + tombstones.format_line(first)[:50]).encode())
    second = Tombstone(cid(2), "failed", 3.0, 4.0, cid(1), "main")
    TombstoneFile(str(path)).append([second])
    f = TombstoneFile(str(path))
    assert f.load() == {cid(1): first, cid(2): second}
    assert f.find(cid(2)) == second


def test_tombstone_file_stays_bounded(tmp_path):
    f = TombstoneFile(str(tmp_path / "pruned"), limit=8)
    for n in range(20):
        f.append([Tombstone(cid(n + 1), "passed", n, n, None, "main")])
    kept = TombstoneFile(str(tmp_path / "pruned")).load()
    assert len(kept) <= 8
    assert cid(20) in kept and cid(1) not in kept     # the oldest go first


# ---- a pass over a real folder, the state in-process -------------------------

def write_results(folder, entries: dict, records: bool = True) -> None:
    for commit, e in entries.items():
        header = {"verdict": e.verdict, "tests": 1, "failures": int(e.verdict != "passed"),
                  "errors": 0, "skipped": 0, "branch": e.branch, "commit": commit}
        if e.previous:
            header["previous"] = e.previous
        recs = [TestRecord("t", "test_one", "passed" if e.verdict == "passed" else "failed")]
        Outcome(header, b"output\n", recs if records else None).write(str(folder), commit)
        os.utime(folder / commit, (e.finished, e.finished))


def write_matrix_chain(folder, cells: dict[str, str]) -> str:
    """Three passed commits on main, the first a matrix commit with
    ``cells`` (name -> python) and their files; the matrix commit."""
    folder.mkdir()
    entries = chain("main", "ppp")
    write_results(folder, entries)
    commit = cid(1)
    header = {"verdict": "passed", "tests": 1, "failures": 0, "errors": 0, "skipped": 0,
              "branch": "main", "commit": commit,
              "cells": " ".join(f"{name}=passed" for name in cells)}
    for name, python in cells.items():
        cell_header = {k: v for k, v in header.items() if k != "cells"}
        Outcome({**cell_header, "cell": name, "python": python}, b"out\n",
                [TestRecord("t", "test_one")]).write(str(folder), commit, name)
    Outcome(header, b"output\n").write(str(folder), commit)
    os.utime(folder / commit, (entries[commit].finished,) * 2)
    return commit


def new_state(tmp_path) -> DispatcherState:
    state = DispatcherState(str(tmp_path / "results"), Journal(str(tmp_path / "journal")), 3)
    state.tombstones = TombstoneFile(str(tmp_path / tombstones.FILE_NAME))
    state.recover()
    return state


def test_pass_prunes_files_xml_history_and_state_remembers(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    entries = chain("main", "pfppp")     # 2 broke, 3 fixed
    write_results(folder, entries)
    state = new_state(tmp_path)
    # Commit 1 is being retested: pending, so kept whatever the policy says.
    assert state.retest([cid(1)]) == [cid(1)]
    conn = store.open_store(str(tmp_path / "history.sqlite3"))
    store.catch_up(conn, str(folder))
    forgotten = []

    def forget(commits):
        forgotten.extend(commits)
        for commit in commits:
            store.forget_commit(conn, commit)
    pruner = pruner_for(state, KeepPolicy(count=1), forget=forget)
    report = pruner.run_once()
    assert (report.results, report.pruned) == (5, 1)
    assert forgotten == [cid(4)]
    assert not (folder / cid(4)).exists() and not (folder / (cid(4) + ".xml")).exists()
    for kept in (1, 2, 3, 5):
        assert (folder / cid(kept)).exists() and (folder / (cid(kept) + ".xml")).exists()
    runs = {row[0] for row in conn.execute("SELECT commit_id FROM runs")}
    assert cid(4) not in runs and cid(5) in runs
    assert state.state_of(cid(4)) is WorkState.DONE
    assert state.enqueue([cid(4), cid(9)]) == [cid(9)]
    # A restart: the journal still names commit 4 (queued, never compacted
    # away); its tombstone keeps it finished.
    state.journal.append([f"Q {cid(4)}"], sync=True)
    state.journal.close()
    again = new_state(tmp_path)
    assert cid(4) not in {w.commit for w in again.work.values()}
    assert again.state_of(cid(4)) is WorkState.DONE
    assert again.status()["pruned"] == 1
    assert pruner.run_once().pruned == 0      # nothing more to do


def test_retest_of_a_pruned_commit_is_queued(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    write_results(folder, chain("main", "ppp"))
    state = new_state(tmp_path)
    pruner_for(state, KeepPolicy(count=1)).run_once()
    assert state.status()["pruned"] == 2
    assert state.retest([cid(1)]) == [cid(1)]
    assert state.state_of(cid(1)) is WorkState.QUEUED
    assert state.status()["pruned"] == 1
    # The retest keeps the branch and predecessor of the first run, read
    # from the tombstone (the result file is gone), in memory and journalled.
    assert state.retest([cid(2)]) == [cid(2)]
    assert state.work[work_key(cid(2))].meta == Meta("main", cid(1))
    # A commit never pruned does not send a retest through the whole
    # tombstone file (up to 500,000 lines) looking for it.
    looked = []
    state.tombstones.find = looked.append
    assert state.retest([cid(7)]) == [cid(7)]
    assert looked == []
    state.journal.close()
    again = new_state(tmp_path)
    assert again.work[work_key(cid(2))].meta == Meta("main", cid(1))


def test_a_retest_that_finishes_during_a_pass_ends_it(tmp_path):
    """The plan weighed commit 3 as passed; its retest fails after the plan:
    commit 3 now broke the branch and commit 4 fixed it, which the plan did
    not know, so the pass stops before it removes anything more."""
    folder = tmp_path / "results"
    folder.mkdir()
    write_results(folder, chain("main", "ppppp"))
    state = new_state(tmp_path)
    state.register(("127.0.0.1", 9), "r1", None)
    pruner = pruner_for(state, KeepPolicy(count=1))
    planned = pruner.worker.plan

    def plan_then_retest(pending):
        made = planned(pending)
        assert state.retest([cid(3)]) == [cid(3)]
        job = state.next_assignment()
        assert state.record_result(job.commit, job.token, None, Outcome(
            {"verdict": "failed", "tests": 1, "failures": 1}, b"out\n"))
        return made
    pruner.worker.plan = plan_then_retest
    report = pruner.run_once()
    assert report.pruned == 0
    assert all((folder / cid(n)).exists() for n in range(1, 6))
    assert state.status()["pruned"] == 0
    # The next pass weighs the new verdict: 3 broke the branch, 4 fixed it.
    pruner.worker.plan = planned
    assert pruner.run_once().pruned == 2
    assert sorted(n for n in range(1, 6) if (folder / cid(n)).exists()) == [3, 4, 5]


def test_unlinks_are_done_without_the_lock_and_a_retest_waits_for_them(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    write_results(folder, chain("main", "ppp"))
    state = new_state(tmp_path)
    seen = {}

    def remove(commits):
        (commit,) = commits
        # Another thread can take the dispatcher's lock meanwhile (a result
        # is never held up by an unlink), and a retest of this commit
        # waits until its files are gone.
        got = []

        def take():
            got.append(state.cond.acquire(timeout=5))
            if got[0]:
                state.cond.release()
        taker = threading.Thread(target=take)
        taker.start()
        taker.join(10)
        seen["lock free"] = got == [True]
        retest = threading.Thread(target=state.retest, args=([commit],))
        retest.start()
        retest.join(0.3)
        seen["retest waited"] = retest.is_alive()
        seen["retest"] = retest
        os.unlink(folder / (commit + ".xml"))
        os.unlink(folder / commit)
        return [None]

    assert state.remove_pruned([cid(1)], remove, lambda commits: None) == [cid(1)]
    seen["retest"].join(10)
    assert seen["lock free"] and seen["retest waited"]
    assert state.state_of(cid(1)) is WorkState.QUEUED
    assert work_key(cid(1)) not in state.pruned and not state.unlinking


def test_a_pass_moves_result_files_then_the_xml_each_in_the_folders_order(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    write_results(folder, chain("main", "p" * 30))
    listed = os.listdir(folder)
    state = new_state(tmp_path)
    pruner = pruner_for(state, KeepPolicy(count=1))
    removed, dropped = [], []
    remove, drop = pruner.worker.remove, pruner.worker.drop
    pruner.worker.remove = lambda batch: removed.extend(batch) or remove(batch)
    pruner.worker.drop = lambda batch: dropped.extend(batch) or drop(batch)
    report = pruner.run_once()
    assert report.pruned == 29
    assert [names for names in removed] == [[n] for n in listed if n in
                                             {c[0] for c in removed}]
    assert len(removed) == 29 and not any(n.endswith(".xml") for names in removed for n in names)
    assert [names[0] for names in dropped] == [n for n in listed if n.endswith(".xml")
                                               and n != cid(30) + ".xml"]
    assert sorted(os.listdir(folder)) == [TRASH, cid(30), cid(30) + ".xml"]


def test_an_xml_a_pass_left_is_dropped_by_the_next_unless_its_commit_runs_again(tmp_path):
    """A pass that ended between its sweeps (here: told not to make the
    second) leaves pruned commits' XMLs; the next plan finds them.  An XML
    whose commit is being tested again, or that is not pruned (a result
    being stored writes its XML first), stays."""
    folder = tmp_path / "results"
    folder.mkdir()
    write_results(folder, chain("main", "p" * 6))
    state = new_state(tmp_path)
    pruner = pruner_for(state, KeepPolicy(count=1))
    second_sweep = pruner._drop_leftovers
    pruner._drop_leftovers = lambda: None
    assert pruner.run_once().pruned == 5
    assert all((folder / (cid(n) + ".xml")).exists() and not (folder / cid(n)).exists()
               for n in range(1, 6))
    assert state.retest([cid(2)]) == [cid(2)]
    (folder / (cid(40) + ".xml")).write_bytes(b"<testsuites/>")
    pruner._drop_leftovers = second_sweep
    pruner.run_once()
    assert sorted(os.listdir(folder)) == sorted(
        [TRASH, cid(6), cid(6) + ".xml", cid(2) + ".xml", cid(40) + ".xml"])
    assert not state.unlinking


def test_trimmed_tombstones_are_forgotten_in_memory_too(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    write_results(folder, chain("main", "p" * 12))
    state = new_state(tmp_path)
    state.tombstones.limit = 4
    pruner = pruner_for(state, KeepPolicy(count=1))
    pruner.run_once()
    on_file = TombstoneFile(state.tombstones.path).load()
    assert len(on_file) <= 4
    assert set(state.pruned) == set(on_file)
    # The worker's next plan judges against the trimmed file's verdicts.
    assert set(tombstones.VerdictFollower(state.tombstones.path).verdicts()) == set(on_file)


def test_pending_commits_kept_and_still_judge_their_successor():
    entries = chain("main", "pfppp")
    doomed = plan(entries, KeepPolicy(count=1), now=0.0, pending=[cid(1)])
    assert doomed == [cid(4)]     # 1 pending, 2 broke (against 1), 3 fixed, 5 newest


def test_a_plan_calls_its_pace_before_every_entry_and_decides_the_same():
    entries = chain("main", "p" * 300)
    calls = []
    doomed = plan(entries, KeepPolicy(count=1), now=0.0, pace=lambda: calls.append(1))
    assert doomed == plan(entries, KeepPolicy(count=1), now=0.0)
    assert len(doomed) == 299
    # each of its four loops over the entries: the predecessors named, the
    # protected set, the grouping by branch, the ranking
    assert len(calls) >= 4 * 300


def test_a_pacer_looks_at_the_gate_every_step_and_rests_between_every_few(monkeypatch):
    rests, synced, looks = [], [], []
    monkeypatch.setattr(time, "sleep", rests.append)
    gate = types.SimpleNamespace(wait_clear=lambda: looks.append(1))
    pacer = Pacer(gate, 1.0, every=4, before_rest=lambda: synced.append(len(looks)))
    for _ in range(9):
        pacer.step()
    # a rest before the 5th and the 9th step, each after a look at the gate
    # and the fsync (``before_rest``) that the 4 steps before it called for
    assert len(looks) == 9 + 2 and len(rests) == 2 and synced == [5, 10]
    assert all(0 <= rest <= REST_CAP for rest in rests)
    rests.clear()
    pacer = Pacer(gate, 0.0, every=4)
    for _ in range(9):
        pacer.step()
    assert rests == [0.0, 0.0]                   # --prune-rest 0: no rest


def test_a_pruned_matrix_commit_takes_its_cell_files_with_it(tmp_path):
    """A matrix commit's cells lie beside it (<commit>.cell.<name> and its
    .xml): pruning the commit removes them too, not only its own files."""
    folder = tmp_path / "results"
    matrix_commit = write_matrix_chain(folder, {"py3.9": "3.9", "py3.12": "3.12"})
    cell_files = [n for n in os.listdir(folder) if ".cell." in n]
    assert len(cell_files) == 4, cell_files
    state = new_state(tmp_path)
    report = pruner_for(state, KeepPolicy(count=1)).run_once()
    assert report.pruned == 2                 # the matrix commit and the next; the head kept
    assert sorted(os.listdir(folder)) == [TRASH, cid(3), cid(3) + ".xml"]
    # Moved into the trash (freed later, in a quiet moment): only these.
    expected = {*cell_files, matrix_commit, matrix_commit + ".xml", cid(2), cid(2) + ".xml"}
    assert set(os.listdir(folder / TRASH)) <= expected


def test_a_pass_gives_way_to_a_result_being_stored(tmp_path):
    """While a ``results`` handler holds the gate, the pass waits before
    its next step (its worker reads no header and removes nothing
    meanwhile); once the result is stored it goes on.  A gate held for
    ever delays the pass only ``longest`` per step."""
    folder = tmp_path / "results"
    folder.mkdir()
    write_results(folder, chain("main", "pppp"))
    state = new_state(tmp_path)
    gate = state.result_gate
    gate.longest = 30.0
    pruner = pruner_for(state, KeepPolicy(count=1))
    reports = []
    with gate:
        worker = threading.Thread(target=lambda: reports.append(pruner.run_once()))
        worker.start()
        worker.join(1.5)
        assert worker.is_alive() and not reports
        assert all((folder / cid(n)).exists() for n in (1, 2, 3, 4))
    worker.join(30)
    assert reports and reports[0].pruned == 3
    assert not (folder / cid(3)).exists() and (folder / cid(4)).exists()
    # A gate that never clears: each step waits ``longest``, then goes on.
    write_results(folder, {cid(7): Entry(cid(7), "other", None, "passed", 2000.0),
                           cid(8): Entry(cid(8), "other", cid(7), "passed", 2001.0)})
    state.journal.close()
    state = new_state(tmp_path)
    state.result_gate.longest = 0.05
    with state.result_gate:
        assert pruner_for(state, KeepPolicy(count=1)).run_once().pruned == 1
    assert not (folder / cid(7)).exists()


def test_the_pass_rests_after_every_batch_as_long_as_it_took_within_bounds():
    assert rest_after(0.02, 1.0) == 0.02
    assert rest_after(0.02, 2.0) == 0.04
    assert rest_after(0.001, 1.0) == PAUSE                  # at least the pause
    assert rest_after(10.0, 1.0) == REST_CAP                # a stalled batch: not seconds
    assert rest_after(0.02, 0.0) == min(PAUSE, QUIET_PAUSE)  # --prune-rest 0
