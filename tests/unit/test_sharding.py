"""Sharding as pure functions (the split, the shard's command, the merge)
and the dispatcher's state machine with shards, in-process: when a commit
is split, that a lost shard alone runs again, that the result is written
once when every shard has reported, and what a restart does."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings, strategies as st

from ci import jobspec
from ci.outcome import Outcome
from ci import results
from ci import sharding
from ci.dispatch.runners import IDLE, OCCUPIED, RUNNING, PingReply
from ci.dispatch.state import DispatcherState
from ci.dispatch.work import WorkState
from ci.dispatch.journal import Journal, replay_lines
from ci.wire import Reply

# Its tested pytest runs load no plugin of ours (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quiet_pytest")

X, Y = "1" * 40, "2" * 40


# ---- the split ---------------------------------------------------------

def loads(shards, weights):
    return sorted(sum(weights[p] for p in shard) for shard in shards)


def test_split_balances_known_durations_longest_first():
    weights = {"a": 4.0, "b": 3.0, "c": 3.0, "d": 2.0, "e": 2.0, "f": 2.0}
    shards = sharding.split([(p, 10, w) for p, w in weights.items()], 2)
    assert loads(shards, weights) == [8.0, 8.0]
    assert sorted(p for s in shards for p in s) == sorted(weights)


def test_split_of_eight_equal_files_over_four_gives_two_each():
    shards = sharding.split([(f"t{i}", 100, 1.0) for i in range(8)], 4)
    assert [len(s) for s in shards] == [2, 2, 2, 2]


def test_split_is_deterministic_whatever_the_order():
    items = [(f"tests/test_{i}.py", 50 + i % 3, [None, 1.0, 2.0][i % 3]) for i in range(20)]
    first = sharding.split(items, 4)
    for seed in range(5):
        shuffled = list(items)
        random.Random(seed).shuffle(shuffled)
        assert sharding.split(shuffled, 4) == first


def test_split_by_size_when_nothing_is_known():
    sizes = {"big": 9000, "mid1": 4000, "mid2": 4000, "small": 1000}
    shards = sharding.split([(p, s, None) for p, s in sizes.items()], 2)
    assert sorted(shards) == [["big"], ["mid1", "mid2", "small"]]


def test_unknown_files_weigh_their_size_at_the_known_rate():
    # 1000 bytes took 10 s: an unknown 1000-byte file counts as 10 s.
    items = [("known", 1000, 10.0), ("new", 1000, None), ("quick", 1000, 0.1)]
    shards = sharding.split(items, 2)
    assert sorted(shards) == [["known"], ["new", "quick"]]


def test_fewer_files_than_shards_leaves_empty_shards():
    shards = sharding.split([("a", 1, None), ("b", 1, None)], 4)
    assert sorted(len(s) for s in shards) == [0, 0, 1, 1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.one_of(st.none(),
                                                            st.floats(0, 100))),
                max_size=30),
       st.integers(1, 6))
def test_split_is_a_partition_and_greedy_bound_holds(specs, total):
    items = [(f"f{i:02d}", size, seconds) for i, (size, seconds) in enumerate(specs)]
    shards = sharding.split(items, total)
    assert len(shards) == total
    assert sorted(p for s in shards for p in s) == sorted(p for p, _, _ in items)
    if all(s is not None for _, s in specs) and specs:
        weights = {p: s for p, _, s in items}
        got = loads(shards, weights)
        # Longest-first greedy: the fullest shard exceeds the emptiest by
        # at most the largest single file.
        assert got[-1] - got[0] <= max(weights.values()) + 1e-9


def test_known_seconds_matches_classnames_of_the_file():
    table = sharding.prefix_seconds({"test_a.TestOne": 1.5, "test_a.TestTwo": 0.5,
                                     "test_ab.TestX": 9.0, "tests.test_b": 2.0})
    assert sharding.known_seconds("tests/test_a.py", "test_a", table) == 2.0
    assert sharding.known_seconds("tests/test_b.py", "test_b", table) == 2.0
    assert sharding.known_seconds("tests/test_c.py", "test_c", table) is None


def test_durations_are_learned_per_classname_and_bounded():
    durations = sharding.Durations(limit=3)
    durations.learn([results.TestRecord("m.A", "t1", duration=1.0),
                     results.TestRecord("m.A", "t2", duration=2.0),
                     results.TestRecord("n.B", "t", duration=0.5)])
    assert dict(durations.table) == {"m.A": 3.0, "n.B": 0.5}
    durations.learn([results.TestRecord("o.C", "t", duration=1.0),
                     results.TestRecord("p.D", "t", duration=1.0)])
    assert list(durations.table) == ["n.B", "o.C", "p.D"]
    spec = jobspec.parse(jobspec.encode(jobspec.JobSpec(
        sharding.parse_shard("2/3", sharding.encode_table(durations.table))))).shard
    assert spec == sharding.ShardSpec(2, 3, {"n.B": 0.5, "o.C": 1.0, "p.D": 1.0})


@pytest.mark.parametrize("body", [b"shard: 0/2\n\n", b"shard: 3/2\n\n", b"shards: 1/2\n\n",
                                  b"shard: 1/x\n\n", b"garbage"])
def test_bad_runtest_bodies_are_refused(body):
    with pytest.raises(ValueError):
        jobspec.parse(body)


def test_empty_body_is_a_whole_commit_and_bad_table_lines_are_skipped():
    assert jobspec.parse(b"").shard is None
    spec = jobspec.parse(b"shard: 1/2\n\nnan? x\n-1 y\n1.5 ok.Key\n\x00\n").shard
    assert spec.durations == {"ok.Key": 1.5}


# ---- which files, which command ------------------------------------------

def write(root, files):
    for name, text in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(text)


def test_unittest_modules_follow_discovery(tmp_path):
    write(tmp_path, {"tests/test_a.py": "", "tests/helper.py": "", "tests/test-bad.py": "",
                     "tests/sub/__init__.py": "", "tests/sub/test_b.py": "",
                     "tests/plain/test_c.py": ""})
    assert sharding.unittest_modules(str(tmp_path)) == [
        ("tests/sub/test_b.py", "sub.test_b"), ("tests/test_a.py", "test_a")]
    assert [m for _, m in sharding.unittest_modules(str(tmp_path), package_root=True)] == [
        "tests.sub.test_b", "tests.test_a"]


@pytest.mark.parametrize("init, plain", [
    ("", True), ('"""Tests."""\n__all__ = ["a"]\n__version__: str = "1"\npass\n', True),
    ("from __future__ import annotations\n", True),
    ("import os\n", False), ("from .base import Base\n", False),
    ("load_tests = None\n", False), ("__path__ = []\n", False), ("X = make()\n", False),
    ("def load_tests(loader, tests, pattern):\n    return tests\n", False),
    ("class T:\n    pass\n", False), ("x = (\n", False)])
def test_only_a_package_that_binds_constants_is_split(tmp_path, init, plain):
    """Discovery imports each package's __init__.py and runs what it
    holds; a shard imports only its modules."""
    write(tmp_path, {"tests/__init__.py": "", "tests/test_a.py": "", "tests/sub/__init__.py": init,
                     "tests/sub/test_b.py": ""})
    files, why = sharding.discovery(str(tmp_path), package_root=True)
    assert [m for _, m in files] == ["tests.sub.test_b", "tests.test_a"]
    assert (why == "") == plain, why
    if not plain:
        assert why.startswith("tests/sub/__init__.py holds more than constants")


def test_default_command_shards_by_module_names(tmp_path):
    write(tmp_path, {f"tests/test_{c}.py": "x" * n for c, n in zip("abcd", (40, 30, 20, 10))})
    command = ["python", "-m", "unittest", "discover", "-s", "tests"]
    runs = [sharding.shard_run(str(tmp_path), None, command,
                               sharding.ShardSpec(i, 2, {}), True) for i in (1, 2)]
    assert [r.command[3:] for r in runs] == [["test_a", "test_d"], ["test_b", "test_c"]]
    assert all(r.path_first == "tests" and r.label == "" for r in runs)
    empty = sharding.shard_run(str(tmp_path), None, command, sharding.ShardSpec(5, 5, {}), True)
    assert empty.command is None and empty.label == "empty"


def test_pytest_command_runs_as_it_is_custom_command_runs_whole(tmp_path):
    write(tmp_path, {"tests/test_a.py": "xx", "tests/b_test.py": "x", "tests/conftest.py": ""})
    # pytest keeps the share itself (ci_shard.py), whatever its flags and config.
    for command in (["python", "-m", "pytest", "-q", "tests"], ["pytest", "-k", "slow", "tests"],
                    ["pytest", "--ignore=tests/test_a.py", "tests"], ["pytest", "-q"]):
        run = sharding.shard_run(str(tmp_path), command, command, sharding.ShardSpec(2, 2, {}),
                                 False)
        assert (run.command, run.label, run.in_pytest) == (command, "", True), command
    custom = ["make", "test"]
    one = sharding.shard_run(str(tmp_path), custom, custom, sharding.ShardSpec(1, 3, {}), False)
    two = sharding.shard_run(str(tmp_path), custom, custom, sharding.ShardSpec(2, 3, {}), False)
    assert (one.command, one.label) == (custom, "whole") and "neither" in one.note
    assert (two.command, two.label) == (None, "skipped")
    placeholder = ["runtests", "{tests}", "--fast"]
    run = sharding.shard_run(str(tmp_path), placeholder, placeholder,
                             sharding.ShardSpec(1, 1, {}), False)
    assert run.command == ["runtests", "tests/test_a.py", "--fast"]


def load_plugin():
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "ci_support", "ci_shard.py")
    spec = importlib.util.spec_from_file_location("ci_shard_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.one_of(st.none(), st.floats(0, 100))),
                max_size=20),
       st.integers(1, 5), st.sets(st.integers(0, 19), max_size=3))
def test_the_pytest_plugin_splits_as_the_runner_does(specs, total, pinned):
    """ci_support/ci_shard.py runs under the tested commit's Python and
    imports nothing of ours: its own copy of ``split`` must agree."""
    plugin = load_plugin()
    items = [(f"tests/test_{i:02d}.py", size, seconds) for i, (size, seconds) in enumerate(specs)]
    pins = frozenset(f"tests/test_{i:02d}.py" for i in pinned)
    assert plugin.split(items, total, pins) == sharding.split(items, total, pins)


# ---- the merge -------------------------------------------------------------

def part(verdict, tests=2, failures=0, errors=0, skipped=0, runner="r", shards="1/3",
         records=None, output=b"", **extra):
    fields = {"verdict": verdict, "tests": tests, "failures": failures, "errors": errors,
              "skipped": skipped, "runner": runner, "shards": shards, "duration": "1.000",
              "exit_code": 0 if verdict == "passed" else 1, **extra}
    return Outcome(fields, output, records)


@pytest.mark.parametrize("verdicts, merged", [
    (("passed", "passed", "passed"), "passed"),
    (("passed", "failed", "passed"), "failed"),
    (("failed", "timeout", "passed"), "timeout"),
    (("timeout", "failed", "error"), "error"),
])
def test_merged_verdict_is_the_worst(verdicts, merged):
    parts = {i + 1: part(v, shards=f"{i + 1}/3", output=b"out\n")
             for i, v in enumerate(verdicts)}
    assert sharding.merge(3, parts).verdict == merged


def test_merge_sums_counts_and_names_each_shard_and_runner():
    parts = {1: part("passed", 3, runner="127.0.0.1:9001", shards="1/3", output=b"...\nOK\n"),
             2: part("failed", 4, 1, 1, 1, runner="127.0.0.1:9002", shards="2/3",
                     reason="x", output=b"F.E\nFAILED\n"),
             3: part("passed", 0, runner="127.0.0.1:9003", shards="3/3 empty",
                     output=b"none\n")}
    merged = sharding.merge(3, parts)
    fields, output = merged.header, merged.output
    assert {k: fields[k] for k in sharding.COUNTS} == {"tests": 7, "failures": 1,
                                                       "errors": 1, "skipped": 1}
    assert fields["verdict"] == "failed" and fields["shards"] == "3"
    assert fields["reason"] == "shard 2/3: x"
    assert fields["runner"] == "127.0.0.1:9001, 127.0.0.1:9002, 127.0.0.1:9003"
    text = output.decode()
    assert text.index("===== shard 1/3 on 127.0.0.1:9001: passed (3 tests") < \
        text.index("===== shard 2/3 on 127.0.0.1:9002: failed (4 tests, 1 failures") < \
        text.index("===== shard 3/3 on 127.0.0.1:9003: empty")
    assert "FAILED" in text


def test_an_import_error_in_one_shard_makes_the_merge_error():
    parts = {1: part("passed", shards="1/2"),
             2: part("error", 1, 0, 1, shards="2/2",
                     reason="test modules could not be imported (see output)")}
    fields = sharding.merge(2, parts).header
    assert fields["verdict"] == "error" and "imported" in fields["reason"]
    assert fields["errors"] == 1 and fields["tests"] == 3


def test_empty_shards_count_nothing():
    parts = {1: part("passed", 2, shards="1/2"),
             2: part("error", 5, 0, 5, shards="2/2 empty")}
    fields = sharding.merge(2, parts).header
    assert fields["verdict"] == "passed" and fields["tests"] == 2


def test_shards_that_ran_no_test_make_no_pass():
    """worst([]) is 'passed': shards that all said 'empty', or whose
    records held no test, passed the commit with 0 tests."""
    empty = {i: part("passed", 0, shards=f"{i}/2 empty") for i in (1, 2)}
    fields = sharding.merge(2, empty).header
    assert (fields["verdict"], fields.get("reason"), fields["tests"]) == \
        ("error", "no tests ran", 0)
    none = {i: part("passed", 0, shards=f"{i}/2", records=[]) for i in (1, 2)}
    assert sharding.merge(2, none).header["verdict"] == "error"
    # Without records the counts are the summaries', which may be unknown.
    unknown = {i: part("passed", 0, shards=f"{i}/2") for i in (1, 2)}
    assert sharding.merge(2, unknown).header["verdict"] == "passed"


def test_a_whole_run_by_shard_one_is_the_result_and_disagreement_is_an_error():
    whole = {1: part("failed", 9, 2, shards="1/2 whole", output=b"all\n"),
             2: part("passed", 0, shards="2/2 skipped")}
    merged = sharding.merge(2, whole)
    assert (merged.header["verdict"], merged.header["tests"], merged.output) == \
        ("failed", 9, b"all\n")
    disagree = {1: part("passed", 3, shards="1/2"),
                2: part("passed", 0, shards="2/2 skipped")}
    fields = sharding.merge(2, disagree).header
    assert fields["verdict"] == "error" and "disagree" in fields["reason"]


def test_records_merge_into_one_junit_with_the_header_counts():
    r1 = [results.TestRecord("test_a.T", "t1"), results.TestRecord("test_a.T", "t2",
                                                                   results.FAILED)]
    r2 = [results.TestRecord("test_b.T", "t1", results.SKIPPED)]
    parts = {1: part("failed", 2, 1, records=r1, shards="1/2"),
             2: part("passed", 1, 0, 0, 1, records=r2, shards="2/2")}
    merged = sharding.merge(2, parts)
    assert list(merged.records) == r1 + r2
    assert results.count_records(merged.records) == \
        {k: merged.header[k] for k in sharding.COUNTS}
    parts[2] = part("passed", 1, shards="2/2", junit="missing")
    merged = sharding.merge(2, parts)
    assert merged.records is None and merged.header["junit"] == "missing"


# ---- the state machine -------------------------------------------------------

RUNNERS = [("127.0.0.1", 9001 + i) for i in range(4)]


@pytest.fixture
def make_state(tmp_path):
    def make(max_shards=4, runners=4, grace=0.0):
        folder = tmp_path / "results"
        folder.mkdir(exist_ok=True)
        state = DispatcherState(str(folder), Journal(str(tmp_path / "journal")), 3)
        state.max_shards = max_shards
        state.recover(grace)
        for address in RUNNERS[:runners]:
            state.register(address, f"i{address[1]}", None)
        return state
    return make


def take_all(state):
    jobs = []
    while state.queue or state.shard_queue:
        if not any(r.free for r in state.runners.values()):
            break
        jobs.append(state.next_assignment())
    return jobs


def report(state, job, verdict="passed", tests=2, shards=None):
    fields = {"verdict": verdict, "tests": tests, "failures": int(verdict == "failed"),
              "errors": 0, "skipped": 0, "runner": job.runner,
              "shards": shards or f"{job.shard}/{job.shards}"}
    return state.record_result(job.commit, job.token, None, Outcome(fields, b"out\n"))


def result_file(state, commit):
    path = os.path.join(state.results_dir, commit)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as handle:
        return results.parse_result(handle.read())


def test_one_commit_and_four_free_runners_is_split_in_four(make_state):
    state = make_state()
    state.enqueue([X])
    jobs = take_all(state)
    assert sorted(j.shard for j in jobs) == [1, 2, 3, 4] and {j.shards for j in jobs} == {4}
    assert len({j.token for j in jobs}) == 4 and len({j.runner for j in jobs}) == 4
    assert all(jobspec.parse(j.request).shard.index == j.shard for j in jobs)
    for job in jobs[:3]:
        assert report(state, job) is True
        assert result_file(state, X) is None  # nothing before every shard is in
    assert report(state, jobs[3], "failed") is True
    fields, output = result_file(state, X)
    assert fields["verdict"] == "failed" and fields["tests"] == "8" and fields["shards"] == "4"
    assert output.count(b"===== shard ") == 4
    assert report(state, jobs[0]) is False  # a late duplicate changes nothing
    assert all(r.state == IDLE for r in state.runners.values())
    assert state.status()["running"] == 0 and not state.work


def test_a_burst_is_never_split(make_state):
    state = make_state()
    commits = [c * 40 for c in "3456789"]
    state.enqueue(commits)
    jobs = take_all(state)
    assert [j.shards for j in jobs] == [0, 0, 0, 0]


def test_two_commits_four_runners_split_three_and_one(make_state):
    state = make_state()
    state.enqueue([X, Y])
    jobs = take_all(state)
    assert sorted((j.commit, j.shard, j.shards) for j in jobs) == [
        (X, 1, 3), (X, 2, 3), (X, 3, 3), (Y, 0, 0)]


def test_max_shards_one_never_splits(make_state):
    state = make_state(max_shards=1)
    state.enqueue([X])
    jobs = take_all(state)
    assert [(j.shard, j.shards, j.request) for j in jobs] == [(0, 0, b"")]


def test_a_shard_whose_runtest_reply_was_lost_is_adopted_by_its_runners_word(make_state):
    state = make_state(max_shards=2, runners=2)
    state.enqueue([X])
    first, second = take_all(state)
    state.assignment_failed(second, "error")   # the reply never came
    assert list(state.shard_queue) == [(X, second.shard)]
    address = next(a for a in RUNNERS if f"127.0.0.1:{a[1]}" == second.runner)
    # Its heartbeat says it runs that shard, with the shard's token.
    assert state.register(address, f"i{address[1]}", X, second.token) == "known"
    assert not state.shard_queue and state.runners[second.runner].state == RUNNING
    assert state.runners[second.runner].job.shard == second.shard
    assert report(state, first) is True and report(state, second) is True
    assert result_file(state, X)[0]["tests"] == "4"


def test_a_lost_shard_alone_runs_again_and_counts_against_the_commit(make_state):
    state = make_state(max_shards=3, runners=4)
    state.enqueue([X])
    jobs = take_all(state)
    assert len(jobs) == 3
    lost = next(j for j in jobs if j.shard == 2)
    state.ping_result(lost.runner, PingReply("refused"), 2)   # its runner died
    assert list(state.shard_queue) == [(X, 2)] and state.work[X].losses == 1
    again = state.next_assignment()
    assert (again.commit, again.shard, again.shards) == (X, 2, 3)
    assert again.runner not in {j.runner for j in jobs}
    assert again.request == lost.request  # the same split
    with pytest.raises(Reply):
        state.progress(X, lost.token, None, b"x")  # no longer the assignment
    for job in (jobs[0], jobs[2], again):
        assert report(state, job) is True
    fields, _ = result_file(state, X)
    assert fields["verdict"] == "passed" and fields["tests"] == "6"
    journal = open(state.journal.path, "rb").read()
    assert journal.count(b"\nS " + X.encode()) + journal.startswith(b"S ") == 1


def test_the_dead_runners_late_result_wins_once_and_the_rerun_is_dropped(make_state):
    state = make_state(max_shards=2, runners=3)
    state.enqueue([X])
    first, second = take_all(state)
    state.expire_jobs(-1)   # both deadlines passed: both shards run again
    rerun = state.next_assignment()
    assert rerun.shard in (1, 2) and state.runners[rerun.runner].state == RUNNING
    late = first if first.shard == rerun.shard else second
    assert report(state, late) is True  # the first result of that shard counts
    assert state.runners[rerun.runner].state == OCCUPIED
    other = second if late is first else first
    assert report(state, other) is True
    assert result_file(state, X)[0]["tests"] == "4"
    assert report(state, rerun) is False


def test_poison_cap_counts_per_commit(make_state):
    state = make_state(max_shards=2, runners=4)
    state.enqueue([X])
    take_all(state)
    rounds = 0
    while not result_file(state, X) and rounds < 5:
        state.expire_jobs(-1)   # every running shard misses the job deadline
        rounds += 1
        # Lost shards run again as shards, never as the whole commit.
        assert all(j.shards == 2 for j in take_all(state))
    # Two shards lost per round: the third lost run (in round 2) gives up.
    assert rounds == 2
    fields, _ = result_file(state, X)
    assert fields["verdict"] == "error" and "gave up" in fields["reason"]
    assert not state.work and not state.shard_queue


def test_a_restart_runs_a_sharded_commit_again_and_drops_late_shard_results(
        make_state, tmp_path):
    state = make_state(max_shards=2, runners=2)
    state.enqueue([X])
    first, second = take_all(state)
    assert report(state, first) is True
    state.journal.close()
    assert X in replay_lines(open(state.journal.path, "rb").read()).sharded
    again = make_state(max_shards=2, runners=2, grace=30.0)
    assert again.state_of(X) is WorkState.QUEUED and list(again.queue) == [X]
    assert again.record_result(X, second.token, None, Outcome({"verdict": "passed"})) is False
    jobs = take_all(again)
    assert sorted(j.shard for j in jobs) == [1, 2]
    for job in jobs:
        report(again, job)
    assert result_file(again, X)[0]["tests"] == "4"


def test_a_failed_merged_write_is_retried_by_the_last_shards_resend(make_state):
    state = make_state(max_shards=2, runners=2)
    state.enqueue([X])
    first, second = take_all(state)
    assert report(state, first) is True
    real_write = state.write_result
    calls = []

    def failing_write(commit, outcome):
        calls.append(commit)
        if len(calls) == 1:
            raise OSError("disk full")
        real_write(commit, outcome)
    state.write_result = failing_write
    with pytest.raises(OSError):
        report(state, second)
    assert result_file(state, X) is None and state.state_of(X) is WorkState.SHARDED
    # Should its runner die before resending, the shard runs again.
    assert state.shard_queue[0] == (X, second.shard)
    assert report(state, second) is True   # the runner's outbox sends it again
    fields, output = result_file(state, X)
    assert fields["tests"] == "4" and output.count(b"===== shard ") == 2
    assert calls == [X, X] and not state.work and not state.shard_queue


# ---- the recorder runs a shard's modules as discovery would ---------------

ODD_MODULES = {
    "tests/test_ok.py": "import unittest\nimport tests_helper\n\nclass T(unittest.TestCase):\n"
                        "    def test_a(self):\n        self.assertEqual(tests_helper.VALUE, 1)\n"
                        "    def test_b(self):\n        self.fail('no')\n",
    "tests/tests_helper.py": "VALUE = 1\n",
    "tests/test_runtime.py": "raise RuntimeError('broken at import')\n",
    "tests/test_skipmod.py": "import unittest\nraise unittest.SkipTest('not here')\n",
    "tests/test_missing.py": "import no_such_module_anywhere\n",
    "tests/test_more.py": "import unittest\n\nclass U(unittest.TestCase):\n"
                          "    def test_c(self):\n        pass\n",
    # Discovery hands its pattern to a module's load_tests.
    "tests/test_pattern.py": "import fnmatch\nimport unittest\n\nclass P(unittest.TestCase):\n"
                             "    def test_p(self):\n        pass\n\n"
                             "def load_tests(loader, tests, pattern):\n"
                             "    assert fnmatch.fnmatch('test_pattern.py', pattern)\n"
                             "    return tests\n",
}


@pytest.mark.parametrize("package", [False, True])
def test_shards_of_odd_modules_add_up_to_discovery(tmp_path, package):
    import subprocess
    import sys

    from ci.runner import junit_capture
    from ci.runner.command_line import default_test_command
    from ci.runner.verdict import judge
    files = dict(ODD_MODULES)
    if package:
        files["tests/__init__.py"] = ""
        files["tests/test_ok.py"] = files["tests/test_ok.py"].replace(
            "import tests_helper", "from tests import tests_helper")
    write(tmp_path, files)
    repo = str(tmp_path)
    command = default_test_command(repo)

    def run(argv):
        proc = subprocess.run(argv, cwd=repo, capture_output=True, timeout=60)
        return judge(proc.returncode, False, proc.stdout + proc.stderr)
    verdict, counts, _ = run(command)
    assert verdict == "error" and (counts.tests, counts.errors, counts.skipped) == (7, 2, 1)
    verdicts, totals = [], {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for index in (1, 2, 3):
        shard = sharding.shard_run(repo, None, command, sharding.ShardSpec(index, 3, {}), True)
        argv = [sys.executable, junit_capture.RECORDER, str(tmp_path / f"{index}.xml"),
                "--shard", *(["--path-first", shard.path_first] if shard.path_first else []),
                *shard.command[3:]]
        v, c, _ = run(argv)
        verdicts.append(v)
        for name in totals:
            totals[name] += getattr(c, name)
    assert sharding.worst(verdicts) == verdict
    assert totals == {"tests": counts.tests, "failures": counts.failures,
                      "errors": counts.errors, "skipped": counts.skipped}


def test_known_short_suites_are_not_split(make_state):
    """What earlier runs taught decides how far splitting pays: a suite
    of one test class, or of a second in all, goes whole (a burst's tail
    of such commits got slower split); a long one is split as far as each
    shard still gets --min-shard-seconds of tests."""
    state = make_state(max_shards=4)
    state.durations.learn([results.TestRecord("test_slow.TestSlow", "t", duration=1.0)])
    state.enqueue(["a" * 40])
    (job,) = take_all(state)
    assert job.shards == 0  # whole
    state.durations.learn([results.TestRecord(f"test_{i}.T", "t", duration=1.0)
                           for i in range(3)])
    state.enqueue(["b" * 40])
    jobs = take_all(state)
    assert [j.shards for j in jobs] == [3, 3, 3]  # 4 known seconds, 4 classes, 3 runners free
    state.min_shard_seconds = 2.0
    state.enqueue(["c" * 40])
    state.register(("127.0.0.1", 9100), "more", None)
    state.register(("127.0.0.1", 9101), "more2", None)
    assert state._shard_count() == 2  # 4 s known / 2 s per shard


def sharded_retest(make_state):
    """X tested whole (failed), then retested in two shards."""
    state = make_state(max_shards=1)
    state.enqueue([X])
    (whole,) = take_all(state)
    assert report(state, whole, "failed", shards="0") is True
    state.max_shards = 2
    state.retest([X])
    shards = take_all(state)
    assert sorted((j.commit, j.shard) for j in shards) == [(X, 1), (X, 2)]
    return state, shards


def test_a_compacted_journal_keeps_a_retests_shards_sharded(make_state):
    """The rewrite wrote S before R, and replaying R ends the round's
    sharding: after a restart, shard 1's resent result (its share of the
    tests, passed) became the commit's verdict, where the commit failed."""
    state, shards = sharded_retest(make_state)
    state.journal.rewrite(state._pending_records())      # a compaction
    state.journal.close()                                 # SIGKILLed
    restarted = make_state(grace=30.0)
    assert report(restarted, shards[0], "passed", tests=1) is False
    assert result_file(restarted, X)[0]["verdict"] == "failed"
    assert restarted.work[X].state is WorkState.QUEUED    # the commit runs again, whole


def test_a_compaction_while_the_merged_result_is_written_keeps_it_sharded(make_state, tmp_path,
                                                                          monkeypatch):
    """The last shard's result claims the commit (WRITING) and drops its
    split; a compaction (another result's) in that window journalled the
    shards' assignments without S, and after a crash there the last
    shard's resend was taken for the whole commit's result."""
    state, shards = sharded_retest(make_state)
    crash = tmp_path / "crash"
    write = state.write_result

    def compacted_then_crashed(key, outcome):
        state.journal.rewrite(state._pending_records())
        (crash / "results").mkdir(parents=True)
        for name in os.listdir(state.results_dir):
            with open(os.path.join(state.results_dir, name), "rb") as source:
                (crash / "results" / name).write_bytes(source.read())
        with open(state.journal.path, "rb") as source:
            (crash / "journal").write_bytes(source.read())
        write(key, outcome)
    monkeypatch.setattr(state, "write_result", compacted_then_crashed)
    assert report(state, shards[0], "failed") is True
    assert report(state, shards[1], "passed") is True
    assert (crash / "journal").exists() and result_file(state, X)[0]["verdict"] == "failed"
    restarted = DispatcherState(str(crash / "results"), Journal(str(crash / "journal")), 3)
    restarted.recover(30.0)
    try:
        assert report(restarted, shards[1], "passed") is False
        assert result_file(restarted, X)[0]["verdict"] == "failed"   # the first run's
        assert restarted.work[X].state is WorkState.QUEUED
    finally:
        restarted.journal.close()


# ---- the pytest plugin keeps a shard's share of what pytest collects --------

def test_pytest_shards_partition_the_collected_tests_with_the_pinned_files_first(tmp_path):
    """Each shard collects everything and keeps its files: together they
    are the whole run's tests, once each; the files holding the tests to
    run first are shard 1's; a file known to be slow is a shard of its own."""
    import subprocess
    import sys

    from ci.runner import ordering
    files = {f"tests/test_{n}.py": "".join(f"def test_{n}{i}():\n    pass\n" for i in range(3))
             for n in "abcdef"}
    write(tmp_path, files)
    spec = dict(durations={f"tests.test_{n}": 30.0 if n == "e" else 1.0 for n in "abcdef"},
                first=("tests.test_f.test_f1",))

    def collected(index: int | None) -> list[str]:
        args = []
        if index is not None:
            path = tmp_path / f"shard{index}"
            path.write_bytes(sharding.plugin_file(sharding.ShardSpec(index, 3, **spec)))
            args = ["-p", "ci_shard", f"--ci-shard={path}"]
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "--collect-only", *args, "tests"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": ordering.SUPPORT})
        return [line for line in proc.stdout.splitlines() if "::" in line]
    shards = [collected(i) for i in (1, 2, 3)]
    assert sorted(sum(shards, [])) == sorted(collected(None)) and len(collected(None)) == 18
    assert "tests/test_f.py::test_f1" in shards[0]
    assert [s for s in shards if "tests/test_e.py::test_e0" in s] == [
        ["tests/test_e.py::test_e0", "tests/test_e.py::test_e1", "tests/test_e.py::test_e2"]]
