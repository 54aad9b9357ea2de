"""The dispatcher's ``state`` reply, defined once in ci/state_schema.py:
what ``DispatcherState.describe`` (ci/dispatch/state.py) builds reads
back as it was, an older dispatcher's reply (no ``held``, no ``shard``)
still reads, and the dashboard shows what the dispatcher sends (occupied
runners, shards, runner names)."""

from __future__ import annotations

import json

import pytest

from ci import state_schema as schema
from ci.dashboard import live, pages
from ci.dispatch import runners as dispatch_runners
from ci.dispatch.journal import Journal
from ci.dispatch.state import DispatcherState

A, B, C, D = "a" * 40, "b" * 40, "c" * 40, "d" * 40


@pytest.fixture
def state(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    made = DispatcherState(str(results), Journal(str(tmp_path / "journal")), 3)
    made.recover()
    yield made
    made.journal.close()


def test_a_full_state_round_trips():
    built = schema.State(
        queue=[schema.QueueEntry(A, "main", 1)],
        running=[schema.RunningJob(B, "dev", "runner1", 2.5, "1/2"),
                 schema.RunningJob(C, None, "127.0.0.1:9002", 0.0)],
        held=[schema.HeldCommit(D, "main", "127.0.0.1:9003")],
        runners=[schema.RunnerInfo("runner1", "127.0.0.1:9001", schema.RUNNING, B),
                 schema.RunnerInfo("127.0.0.1:9002", "127.0.0.1:9002", schema.OCCUPIED, C)],
        counts={"queued": 1, "running": 3})
    wire_text = json.dumps(built.to_json())
    assert schema.State.from_json(json.loads(wire_text)) == built


def test_what_describe_sends_reads_back_as_it_was(state):
    """The dispatcher builds its reply from the schema's records: read
    back, nothing is lost, renamed or left over."""
    state.register(("127.0.0.1", 9001), "i1", None)
    state.name_runner(("127.0.0.1", 9001), "runner1")
    state.register(("127.0.0.1", 9002), "i2", C)        # busy with work not ours
    state.enqueue([A, B])
    job = state.next_assignment()
    sent = json.loads(state.describe())
    read = schema.State.from_json(sent)
    assert read.to_json() == sent
    runners = {r.address: r for r in read.runners}
    assert runners["127.0.0.1:9001"].name == "runner1"
    assert runners["127.0.0.1:9002"].name == "127.0.0.1:9002"   # no name: its address
    assert runners["127.0.0.1:9002"].state == schema.OCCUPIED
    assert runners["127.0.0.1:9002"].commit == C
    assert [(j.commit, j.runner, j.shard) for j in read.running] == [(job.commit, "runner1",
                                                                       None)]
    assert [q.commit for q in read.queue] == [B] and read.counts["runners"] == 2


def test_an_older_dispatchers_state_reads_with_defaults():
    """Before ``held``, ``shard`` and counts as numbers; with a field a
    newer (or older) dispatcher sends that this dashboard does not know."""
    older = {"queue": [{"commit": A, "branch": "main", "position": 1}],
             "running": [{"commit": B, "branch": "main", "runner": "127.0.0.1:9001",
                          "elapsed": 4.0, "job": "7"}],
             "runners": [{"name": "127.0.0.1:9001", "address": "127.0.0.1:9001",
                          "state": "running", "commit": B}],
             "counts": {"queued": "1"}}
    read = schema.State.from_json(older)
    assert read.held == [] and read.running[0].shard is None
    assert read.runners[0].commit == B and read.counts == {"queued": "1"}
    shown = live.normalize_state(older)
    assert shown["running"] == [{"commit": B, "branch": "main", "runner": "127.0.0.1:9001",
                                 "elapsed": 4.0, "shard": None}]
    assert schema.State.from_json({}) == schema.State()


def test_bad_values_are_dropped_or_left_out():
    read = schema.State.from_json({
        "queue": [{"commit": "../etc"}, {"commit": A, "position": "NaN"}, "x"],
        "running": {"not": "a list"},
        "runners": [{"name": "r\n1", "state": "x" * 100, "commit": "zz"}],
        "counts": {"n": True, "m": 2.5}})
    assert read.queue == [schema.QueueEntry(A)]
    assert read.running == []
    assert read.runners == [schema.RunnerInfo("r 1", None, "x" * 32, None)]
    assert read.counts == {"n": "True", "m": "2.5"}
    with pytest.raises(ValueError):
        schema.State.from_json(["not", "an", "object"])


# ---- the dashboard's view of it (ci/dashboard/live.py)

def test_normalize_state_keeps_only_expected_shapes():
    state = live.normalize_state({
        "queue": [{"commit": A, "branch": "main", "position": 1}, {"commit": "../x"}, 7],
        "running": [{"commit": B, "branch": None, "runner": "r\n1", "elapsed": "2.5",
                     "job": 3}],
        "runners": [{"name": "r1", "address": "127.0.0.1:1", "state": "running", "commit": B}],
        "counts": {"queued": 1}, "extra": "ignored"})
    assert state["queue"] == [{"commit": A, "branch": "main", "position": 1}]
    assert state["running"] == [{"commit": B, "branch": None, "runner": "r 1",
                                 "elapsed": 2.5, "shard": None}]
    assert state["runners"][0]["commit"] == B and "extra" not in state
    with pytest.raises(ValueError):
        live.normalize_state([])


def test_normalize_state_held_without_runner_and_infinite_numbers():
    """json.loads takes Infinity and NaN; a held commit may name no runner."""
    state = live.normalize_state(json.loads(
        '{"queue": [{"commit": "%s", "position": Infinity}, {"commit": "%s", "position": NaN}],'
        ' "running": [{"commit": "%s", "elapsed": -Infinity}], "held": [{"commit": "%s"}]}'
        % (A, B, C, D)))
    assert [j["position"] for j in state["queue"]] == [None, None]
    rows = {r["commit"]: r for r in state["running"]}
    assert rows[C]["elapsed"] is None and rows[D]["runner"] == "waiting for ?"


def test_a_sharded_commit_is_one_running_row_and_held_commits_show():
    """The dispatcher lists each shard of a commit as a running job, and
    the commits it holds for their runners after a restart apart."""
    state = live.normalize_state({
        "running": [{"commit": "a" * 40, "branch": "main", "runner": "r1", "elapsed": 2.0,
                     "shard": "1/2"},
                    {"commit": "a" * 40, "branch": "main", "runner": "r2", "elapsed": 3.5,
                     "shard": "2/2"},
                    {"commit": "b" * 40, "branch": "main", "runner": "r3", "elapsed": 1.0}],
        "held": [{"commit": "c" * 40, "branch": "main", "runner": "127.0.0.1:8901"}]})
    rows = {r["commit"][0]: r for r in state["running"]}
    assert rows["a"]["runner"] == "r1 (shard 1/2), r2 (shard 2/2)"
    assert rows["a"]["elapsed"] == 3.5 and rows["a"]["shard"] == "1/2, 2/2"
    assert rows["b"]["runner"] == "r3"
    assert rows["c"]["runner"] == "waiting for 127.0.0.1:8901" and rows["c"]["elapsed"] is None


def test_the_dispatchers_runner_states_are_the_schemas():
    assert (dispatch_runners.IDLE, dispatch_runners.RUNNING, dispatch_runners.OCCUPIED,
            dispatch_runners.SUSPECT) == schema.RUNNER_STATES
    # Every state the dispatcher sets has its colour, none is a warning but suspect.
    assert set(pages.RUNNER_CLASSES) == set(schema.RUNNER_STATES)
    assert pages.RUNNER_CLASSES[schema.OCCUPIED] != pages.RUNNER_CLASSES[schema.SUSPECT]


@pytest.mark.parametrize("name", ["runner1", "ci-box_2.local", "x" * 64])
def test_runner_names_allowed(name):
    assert schema.check_runner_name(name) == name


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "r\n1", "ü", "a/b", None])
def test_runner_names_refused_with_the_rule(name):
    with pytest.raises(ValueError, match="letters, digits"):
        schema.check_runner_name(name)


def test_matrix_keys_read_back_and_are_left_out_when_unset():
    built = schema.State(
        queue=[schema.QueueEntry(A, "main", 1, "py3.9", "waiting for a runner with python3.9")],
        running=[schema.RunningJob(B, "main", "r1", 1.0, None, "py3.12")],
        held=[schema.HeldCommit(C, "main", "r2", "py3.13")],
        runners=[schema.RunnerInfo("r1", "127.0.0.1:1", schema.RUNNING, B,
                                   ["gpu", "python3.12"], True)])
    assert schema.State.from_json(json.loads(json.dumps(built.to_json()))) == built
    assert "cell" not in schema.QueueEntry(A).to_json()
    odd = schema.RunnerInfo.from_json({"name": "r", "labels": ["ok", "n/o", 3], "exclusive": 1})
    assert (odd.labels, odd.exclusive) == (["ok"], None)
