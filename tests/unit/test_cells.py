"""Matrix cells in the dispatcher's state (ci/dispatch/cells.py, in
process): one unit of work per cell, routed by labels (exclusive runners
too), a cell no runner can take waiting with its reason and then given
``error``, the commit's own result (worst cell, ``cells:``) beside the
cells' files, a retest of one cell or of the commit, and a restart with
cells half done testing every cell exactly once."""

from __future__ import annotations

import json
import os

import pytest

from ci import jobspec, matrix, results
from ci.dispatch import server
from ci.dispatch.journal import Journal
from ci.dispatch.runners import PingReply, Traits
from ci.dispatch.state import DispatcherState
from ci.dispatch.work import Meta
from ci.outcome import Outcome
from ci.retention import index
from ci.retention.tombstones import Tombstone, TombstoneFile
from ci.wire import Message, Reply

X, Y = "1" * 40, "2" * 40
RECIPE = "[ci]\nmatrix_python = 3.9 3.12 3.13\nmatrix_db = pg\n"
PLAN = matrix.Plan(tuple(matrix.expand(RECIPE)))
NAMES = ["py3.9-dbpg", "py3.12-dbpg", "py3.13-dbpg"]


def runner(port: int, *labels: str, exclusive: bool = False):
    return ("127.0.0.1", port), Traits(None, frozenset(labels), exclusive)


@pytest.fixture
def make_state(tmp_path):
    made = []

    def make(grace=0.0, tombstones=False):
        folder = tmp_path / "results"
        folder.mkdir(exist_ok=True)
        state = DispatcherState(str(folder), Journal(str(tmp_path / "journal")), 3)
        state.unroutable_timeout = 5.0
        if tombstones:      # --keep-results
            state.tombstones = TombstoneFile(str(tmp_path / "pruned-results"))
        state.recover(grace)
        made.append(state)
        return state
    yield make
    for state in made:
        state.journal.close()


def register(state, *specs):
    for i, (address, traits) in enumerate(specs):
        state.register(address, f"i{address[1]}", None, traits=traits)


def finish(state, job, verdict="passed"):
    return state.record_result(job.commit, job.token, None,
                               Outcome({"verdict": verdict, "tests": 2}, b"out\n"))


def take(state):
    """Every job the state hands out now, without blocking."""
    jobs = []
    for _ in range(100):
        with state.cond:
            if state._pick() is None:
                return jobs
        jobs.append(state.next_assignment())
    raise AssertionError("more jobs than a test makes")


def test_one_job_per_cell_routed_by_interpreter(make_state):
    state = make_state()
    register(state, runner(9001, "python3.12"), runner(9002, "python3.9", "python3.13"),
             runner(9003, "python3.13"))
    assert state.enqueue([X], {X: ("main", None)}, {X: PLAN}) == [X]
    jobs = {jobspec.parse(j.request).cell: j for j in take(state)}
    assert sorted(jobs) == sorted(NAMES)
    assert jobs["py3.12-dbpg"].runner == "127.0.0.1:9001"
    assert jobs["py3.9-dbpg"].runner == "127.0.0.1:9002"
    spec = jobspec.parse(jobs["py3.13-dbpg"].request)
    assert (spec.python, spec.env, spec.branch) == ("3.13", {"CI_DB": "pg"}, "main")


def test_the_commit_fails_with_its_worst_cell_and_names_it(make_state, tmp_path):
    state = make_state()
    state.result_index = str(tmp_path / index.FILE_NAME)
    register(state, *(runner(9001 + i, "python3.9", "python3.12", "python3.13")
                      for i in range(3)))
    told = []
    state.listeners.append(lambda commit, outcome: told.append((commit, outcome.verdict)))
    state.enqueue([X], {X: ("main", None)}, {X: PLAN})
    jobs = {jobspec.parse(j.request).cell: j for j in take(state)}
    assert finish(state, jobs["py3.12-dbpg"]) and finish(state, jobs["py3.13-dbpg"])
    assert not os.path.exists(tmp_path / "results" / X) and told == []
    assert state.is_pending(X)
    assert finish(state, jobs["py3.9-dbpg"], "failed")
    header = results.read_header(str(tmp_path / "results" / X))
    assert header["verdict"] == "failed" and header["branch"] == "main"
    assert header["cells"] == "py3.9-dbpg=failed py3.12-dbpg=passed py3.13-dbpg=passed"
    assert header["tests"] == "6" and "py3.9-dbpg (failed)" in header["reason"]
    cell = results.read_header(str(tmp_path / "results" / f"{X}.cell.py3.9-dbpg"))
    assert (cell["cell"], cell["python"], cell["axes"], cell["verdict"]) == \
        ("py3.9-dbpg", "3.9", "db=pg", "failed")
    assert told == [(X, "failed")] and not state.is_pending(X)
    # The result index has the commit's own file (its cells named), not
    # the cells' files: the pruner's plan only weighs whole commits.
    lines, count = index.load(state.result_index)
    assert count == 1 and lines[X][0] == index.stamp_of(os.stat(tmp_path / "results" / X))
    assert lines[X][1].cells == ("py3.9-dbpg", "py3.12-dbpg", "py3.13-dbpg")
    assert lines[X][1].verdict == "failed"


def test_labels_and_exclusive_runners(make_state):
    state = make_state()
    register(state, runner(9001, "big", "python3.12", exclusive=True))
    gpu = matrix.Plan(tuple(matrix.expand("[ci]\nmatrix_python = 3.12\nlabels = big\n")))
    state.enqueue([X])                       # no matrix, no labels
    assert take(state) == []                 # the exclusive runner ignores it
    state.enqueue([Y], None, {Y: gpu})
    (job,) = take(state)
    assert (job.commit, jobspec.parse(job.request).cell) == (Y, "py3.12")
    register(state, runner(9002))            # a plain runner takes the plain commit
    assert [j.commit for j in take(state)] == [X]


def test_a_cell_no_runner_can_take_waits_with_its_reason_then_errors(make_state, tmp_path):
    state = make_state()
    register(state, runner(9001, "python3.12", "python3.13"),
             runner(9002, "python3.12", "python3.13"))
    state.enqueue([X], None, {X: PLAN})
    assert len(take(state)) == 2
    status = state.status()
    assert status["waiting"] == 1
    assert status["waiting_for"] == f"{X}:py3.9-dbpg: waiting for a runner with python3.9"
    assert status["waiting_reasons"] == "waiting for a runner with python3.9 (1)"
    queue = json.loads(state.describe())["queue"]
    assert queue == [{"commit": X, "branch": None, "position": 1, "cell": "py3.9-dbpg",
                      "waiting": "waiting for a runner with python3.9"}]
    state.expire_unroutable(now=100.0)
    state.expire_unroutable(now=104.0)
    assert state.state_of(f"{X}:py3.9-dbpg").value == "queued"
    state.expire_unroutable(now=105.5)
    header = results.read_header(str(tmp_path / "results" / f"{X}.cell.py3.9-dbpg"))
    assert header["verdict"] == "error" and "python3.9" in header["reason"]
    assert "for 5s" in header["reason"]


def test_nothing_expires_while_no_runner_is_registered(make_state):
    state = make_state()
    state.enqueue([X])
    state.expire_unroutable(now=0.0)
    state.expire_unroutable(now=1000.0)
    assert state.state_of(X).value == "queued" and "waiting" not in state.status()


def test_an_unreadable_matrix_is_the_commits_error(make_state, tmp_path):
    state = make_state()
    bad = matrix.Plan((), "matrix_python: the axis is empty")
    assert state.enqueue([X], {X: ("main", None)}, {X: bad}) == [X]
    header = results.read_header(str(tmp_path / "results" / X))
    assert header["verdict"] == "error" and header["reason"] == bad.error
    assert not state.queue


def test_retest_one_cell_then_the_commit(make_state, tmp_path):
    state = make_state()
    register(state, *(runner(9001 + i, "python3.9", "python3.12", "python3.13")
                      for i in range(3)))
    state.enqueue([X], {X: ("main", None)}, {X: PLAN})
    for job in take(state):
        finish(state, job, "failed" if "3.9" in job.request.decode() else "passed")
    assert state.retest([f"{X}:py3.9-dbpg"]) == [f"{X}:py3.9-dbpg"]
    (job,) = take(state)
    assert jobspec.parse(job.request).python == "3.9"
    finish(state, job)
    header = results.read_header(str(tmp_path / "results" / X))
    assert header["verdict"] == "passed" and header["branch"] == "main"
    assert len(state.retest([X])) == 3 and len(take(state)) == 3
    with pytest.raises(Reply, match="has no cell"):
        state.retest([f"{X}:py2.7"])


def test_a_restart_with_cells_half_done_tests_each_cell_once(make_state, tmp_path):
    state = make_state()
    register(state, *(runner(9001 + i, "python3.9", "python3.12", "python3.13")
                      for i in range(2)))
    state.enqueue([X], None, {X: PLAN})
    first, second = take(state)
    finish(state, first)
    state.journal.close()                    # the dispatcher dies; `second` is lost
    restarted = make_state()
    register(restarted, *(runner(9101 + i, "python3.9", "python3.12", "python3.13")
                          for i in range(3)))
    again = take(restarted)
    done_cell = jobspec.parse(first.request).cell
    assert sorted(jobspec.parse(j.request).cell for j in again) == \
        sorted(n for n in NAMES if n != done_cell)
    for job in again:
        finish(restarted, job)
    header = results.read_header(str(tmp_path / "results" / X))
    assert header["verdict"] == "passed" and len(header["cells"].split()) == 3


def test_the_dispatch_body_carries_plans():
    line = f"{X} - main {matrix.encode_plan(PLAN)}\n{Y} - dev\n".encode()
    meta, plans = server.parse_dispatch_body(line, [X, Y])
    assert meta == {X: Meta("main", None), Y: Meta("dev", None)}
    assert plans[X] == PLAN and Y not in plans
    _, small = server.parse_dispatch_body(line, [X], max_cells=2)
    assert "3 cells, more than the 2 allowed" in small[X].error
    _, broken = server.parse_dispatch_body(f"{X} - main cells=!!\n".encode(), [X])
    assert "malformed matrix" in broken[X].error
    error = matrix.encode_plan(matrix.Plan((), "bad recipe"))
    assert server.parse_dispatch_body(f"{X} - main {error}".encode(), [X])[1][X].error == \
        "bad recipe"
    assert matrix.encode_plan(matrix.SINGLE_PLAN) == ""
    with pytest.raises(Reply):
        server.commit_list(Message("dispatch", f"{X}:py3.9"), "dispatch")
    assert server.commit_list(Message("retest", f"{X}:py3.9"), "retest", cells=True)


def test_the_commits_header_adds_up_its_cells_flaky_and_quarantined_tests(make_state,
                                                                        tmp_path):
    """A matrix commit's own header counts what its cells' headers count:
    flaky and quarantined tests too, and names every cell's failing
    quarantined tests (a commit must not hide an excused failure behind
    its cells)."""
    state = make_state()
    register(state, *(runner(9001 + i, "python3.9", "python3.12", "python3.13")
                      for i in range(3)))
    state.enqueue([X], {X: ("main", None)}, {X: PLAN})
    jobs = {jobspec.parse(j.request).cell: j for j in take(state)}
    extra = {"py3.9-dbpg": {"flaky": 1, "quarantined": 2, "quarantined_failed": 1,
                            "quarantined_failing": json.dumps(["m.T.test_q"])},
             "py3.12-dbpg": {"flaky": 2, "quarantined": 2, "quarantined_failed": 2,
                             "quarantined_failing": json.dumps(["m.T.test_q", "m.T.test_r"])},
             "py3.13-dbpg": {}}
    for name, job in jobs.items():
        assert state.record_result(job.commit, job.token, None, Outcome(
            {"verdict": "passed", "tests": 3, **extra[name]}, b"out\n"))
    header = results.read_header(str(tmp_path / "results" / X))
    assert header["verdict"] == "passed"
    assert (header["flaky"], header["quarantined"], header["quarantined_failed"]) == \
        ("3", "4", "3")
    assert results.named_failing(header["quarantined_failing"]) == ["m.T.test_q", "m.T.test_r"]


def test_a_matrix_summary_names_at_most_the_cap_of_quarantined_failing_tests():
    many = [f"m.T.test_{i:03}" for i in range(results.MAX_NAMED + 5)]
    headers = {"a": {"verdict": "passed",
                     "quarantined_failing": results.named_list(many[:15], more=3)},
               "b": {"verdict": "passed", "quarantined_failing": results.named_list(many[10:])},
               "c": {"verdict": "passed", "quarantined_failing": "not json"}}
    cells = {name: matrix.Cell(name) for name in headers}
    from ci.dispatch.cells import summary
    named = results.named_failing(summary(X, cells, headers).header["quarantined_failing"])
    assert named[:results.MAX_NAMED] == many[:results.MAX_NAMED]
    # Those past the cap, and those a cell itself could not name, are counted.
    assert named[results.MAX_NAMED:] == ["+8 more"]
    assert "quarantined_failing" not in summary(X, {"c": cells["c"]}, {"c": headers["c"]}).header


def test_a_cell_is_sharded_only_over_idle_runners_that_fit_it(make_state, tmp_path):
    """Sharding composes with the matrix: the 3.12 cell is split over the
    two 3.12 runners (never the 3.9 one), each shard's job names the cell,
    and the merged shards are that cell's result."""
    state = make_state()
    state.max_shards = 4
    register(state, runner(9001, "python3.9"),
             *(runner(9002 + i, "python3.12") for i in range(3)))
    # The 3.12 cell first: four runners are free, but only three fit it,
    # and one of those is kept for the cell queued behind it: two shards.
    plan = matrix.Plan(tuple(matrix.expand("[ci]\nmatrix_python = 3.12 3.9\n")))
    state.enqueue([X], {X: ("main", None)}, {X: plan})
    jobs = take(state)
    specs = {(jobspec.parse(j.request).cell, j.shard, j.shards): j for j in jobs}
    assert sorted(specs) == [("py3.12", 1, 2), ("py3.12", 2, 2), ("py3.9", 0, 0)]
    assert specs[("py3.9", 0, 0)].runner == "127.0.0.1:9001"
    assert {specs[("py3.12", i, 2)].runner for i in (1, 2)} <= {"127.0.0.1:9002",
                                                                "127.0.0.1:9003",
                                                                "127.0.0.1:9004"}
    assert all(jobspec.parse(j.request).shard.index == j.shard for j in jobs if j.shards)
    finish(state, specs[("py3.9", 0, 0)])
    for shard in (1, 2):
        job = specs[("py3.12", shard, 2)]
        assert state.record_result(job.commit, job.token, None, Outcome(
            {"verdict": "failed" if shard == 2 else "passed", "tests": 2,
             "failures": int(shard == 2), "errors": 0, "skipped": 0,
             "shards": f"{shard}/2"}, b"out\n"))
    cell = results.read_header(str(tmp_path / "results" / f"{X}.cell.py3.12"))
    assert (cell["cell"], cell["python"], cell["shards"], cell["tests"], cell["verdict"]) == \
        ("py3.12", "3.12", "2", "4", "failed")
    header = results.read_header(str(tmp_path / "results" / X))
    assert header["cells"] == "py3.12=failed py3.9=passed" and header["verdict"] == "failed"


def test_a_recipe_with_labels_and_no_matrix_is_one_labelled_commit(make_state, tmp_path):
    """``labels = gpu`` without a matrix: one unit of work keyed by the
    commit (no cell files), routed only to a runner with the label, the
    labels kept across a restart and by a retest; the observer's field for
    it is no malformed matrix."""
    cells = matrix.expand("[ci]\nlabels = gpu\n")
    field = matrix.encode_plan(matrix.Plan(tuple(cells)))
    plan = matrix.decode_plan(field, 64)
    assert plan.error is None and plan.cells == (matrix.Cell("", labels=frozenset({"gpu"})),)
    state = make_state()
    register(state, runner(9001, "python3.12"))
    state.enqueue([X], {X: ("main", None)}, {X: plan})
    assert take(state) == []
    assert state.status()["waiting_for"] == f"{X}: waiting for a runner with gpu"
    state.journal.close()                    # the dispatcher restarts: still needs gpu
    state = make_state()
    register(state, runner(9001, "python3.12"), runner(9002, "gpu"))
    (job,) = take(state)
    assert (job.commit, job.runner, jobspec.parse(job.request).cell) == (X, "127.0.0.1:9002", "")
    finish(state, job)
    header = results.read_header(str(tmp_path / "results" / X))
    assert header["verdict"] == "passed" and header["labels"] == "gpu" and "cells" not in header
    assert sorted(os.listdir(tmp_path / "results")) == [X]
    assert not state.is_pending(X) and not state.groups
    assert state.retest([X]) == [X]
    (again,) = take(state)
    assert again.runner == "127.0.0.1:9002"


def test_an_unnamed_cell_beside_others_is_refused():
    cells = [{"name": "", "python": None, "axes": "", "labels": "gpu"},
             {"name": "py3.12", "python": "3.12", "axes": "", "labels": ""}]
    field = matrix.CELLS_FIELD + matrix._b64(json.dumps(cells).encode())
    assert "not the commit's only one" in matrix.decode_plan(field, 64).error


def test_status_names_every_distinct_reason_cells_wait_for(make_state):
    """Two kinds of missing runner: ``status`` says both, with how many
    cells wait for each (``waiting_for`` still names the first)."""
    state = make_state()
    register(state, runner(9001, "python3.12", "python3.13"))
    gpu = matrix.Plan(tuple(matrix.expand("[ci]\nlabels = gpu\n")))
    z = "3" * 40
    state.enqueue([X], None, {X: gpu})
    state.enqueue([Y], None, {Y: gpu})
    state.enqueue([z], None, {z: PLAN})
    take(state)
    status = state.status()
    reasons = status["waiting_reasons"].split("; ")
    assert reasons[0] == "waiting for a runner with gpu (2)"
    assert reasons[1:] == ["waiting for a runner with python3.9 (1)"]
    assert status["waiting_for"] == f"{X}: waiting for a runner with gpu"


def test_reason_counts_is_one_bounded_line():
    from ci.dispatch.views import MAX_REASONS, reason_counts
    text = reason_counts([f"waiting for a runner with l{n}" for n in range(25)] + ["x", "x"])
    assert text.startswith("x (2); waiting for a runner with l0 (1)")
    assert text.endswith(f"; and {26 - MAX_REASONS} more")     # 26 distinct reasons
    assert "\n" not in text


def test_a_retested_cell_after_a_restart_completes_the_commit_from_every_cell(make_state,
                                                                              tmp_path):
    """The commit's own result had replayed its cells' records away, and a
    retest journalled the retested cell only: after a restart the commit
    was summed up from that cell alone (passed, where another failed)."""
    state = make_state()
    register(state, *(runner(9001 + i, "python3.9", "python3.12", "python3.13")
                      for i in range(3)))
    state.enqueue([X], {X: ("main", None)}, {X: PLAN})
    for job in take(state):
        finish(state, job, "failed" if jobspec.parse(job.request).python == "3.12" else "passed")
    assert results.read_header(str(tmp_path / "results" / X))["verdict"] == "failed"
    assert state.retest([f"{X}:py3.9-dbpg"]) == [f"{X}:py3.9-dbpg"]
    state.journal.close()                 # SIGKILLed before the cell ran
    restarted = make_state()
    register(restarted, runner(9101, "python3.9", "python3.12", "python3.13"))
    (job,) = take(restarted)
    assert jobspec.parse(job.request).cell == "py3.9-dbpg"
    assert finish(restarted, job, "passed")
    header = results.read_header(str(tmp_path / "results" / X))
    assert header["verdict"] == "failed"
    assert header["cells"] == "py3.9-dbpg=passed py3.12-dbpg=failed py3.13-dbpg=passed"


def test_a_pruned_matrix_commit_is_not_tested_again_after_a_restart(make_state, tmp_path):
    """A tombstone names the commit, not its cells: a restart before the
    journal was compacted queued every cell again (and without their
    interpreters, whose records the commit's result had replayed away)."""
    state = make_state(tombstones=True)
    register(state, *(runner(9001 + i, "python3.9", "python3.12", "python3.13")
                      for i in range(3)))
    state.enqueue([X], {X: ("main", None)}, {X: PLAN})
    for job in take(state):
        finish(state, job)
    state.tombstones.append([Tombstone(X, "passed", 0.0, 0.0, None, "main")])

    def remove(picked):
        for name in os.listdir(tmp_path / "results"):
            if name.startswith(X):
                os.unlink(tmp_path / "results" / name)
        return [None] * len(picked)
    assert state.remove_pruned([X], remove, lambda removed: None) == [X]
    state.journal.close()
    restarted = make_state(tombstones=True)
    assert not restarted.queue and not restarted.work
    register(restarted, runner(9101, "python3.9", "python3.12", "python3.13"))
    assert take(restarted) == []


def test_a_cells_lost_runs_still_count_after_a_restart(make_state):
    """A lost run was journalled under the commit, and recovery reads
    losses by the cell's key: each restart gave a cell that kills its
    runners the whole --max-attempts again."""
    state = make_state()
    plan = matrix.Plan(tuple(matrix.expand("[ci]\nmatrix_python = 3.12\n")))
    state.enqueue([X], {X: ("main", None)}, {X: plan})
    for port in (9001, 9002):
        register(state, runner(port, "python3.12"))
        (job,) = take(state)
        state.ping_result(job.runner, PingReply("refused"), 3)
    assert state.work[f"{X}:py3.12"].losses == 2
    state.journal.close()
    assert make_state().work[f"{X}:py3.12"].losses == 2


def test_finished_cells_waiting_on_a_scarce_one_do_not_make_every_result_compact(
        make_state, monkeypatch):
    """60 cells pass while one waits for a label no runner has: their
    records stay pending (the commit is not finished), so a rewrite keeps
    them.  Compacting once most of the journal was superseded since the
    last rewrite rewrites it a few times; judged by the active work alone
    (one cell), every result rewrote and fsynced it under the lock."""
    from ci.dispatch import finish as finishing
    monkeypatch.setattr(finishing, "COMPACT_AFTER", 20)
    state = make_state()
    rewrites = []
    rewrite = state.journal.rewrite
    monkeypatch.setattr(state.journal, "rewrite",
                        lambda lines: (rewrites.append(len(lines)), rewrite(lines)))
    cells = tuple(matrix.Cell(f"c{n}", labels=frozenset({"a"})) for n in range(60))
    plan = matrix.Plan(cells + (matrix.Cell("scarce", labels=frozenset({"gpu"})),))
    register(state, runner(9001, "a"))
    state.enqueue([X], {X: ("main", None)}, {X: plan})
    for _ in range(60):
        [job] = take(state)
        assert finish(state, job) is True
    assert 0 < len(rewrites) <= 6, rewrites
    # Each rewrite kept every finished cell: a restart still knows them.
    restarted = make_state()
    assert list(restarted.work) == [f"{X}:scarce"]


def test_a_retest_never_guesses_a_cell_whose_file_is_gone(make_state, tmp_path):
    """A pass cut short after moving a cell's file, before the commit's own:
    the commit lists a cell nothing says the interpreter of.  A retest is
    refused, with the reason, not run on the runner's own Python and filed
    as that cell; once its tombstone keeps the cells, it runs each as it was."""
    state = make_state()
    register(state, *(runner(9001 + i, "python3.9", "python3.12", "python3.13")
                      for i in range(3)))
    state.enqueue([X], {X: ("main", None)}, {X: PLAN})
    for job in take(state):
        finish(state, job)
    os.unlink(tmp_path / "results" / results.result_name(X, "py3.9-dbpg"))
    restarted = make_state(tombstones=True)
    with pytest.raises(Reply, match="cannot be run as it was"):
        restarted.retest([X])
    assert not take(restarted)
    # The pass wrote the tombstone first; after a restart the commit's own
    # file says it is not pruned, and the tombstone is looked up all the same.
    restarted.tombstones.append([Tombstone(X, "passed", 0.0, 0.0, None, "main",
                                           matrix.encode_plan(PLAN))])
    restarted = make_state(tombstones=True)
    assert len(restarted.retest([X])) == 3
    register(restarted, *(runner(9001 + i, "python3.9", "python3.12", "python3.13")
                          for i in range(3)))
    jobs = take(restarted)
    assert sorted(jobspec.parse(job.request).python for job in jobs) == ["3.12", "3.13", "3.9"]
