"""The ``runtest`` body's branch and trust: the codec's round trip, the
bodies older dispatchers send, malformed bodies refused; the runner's
reading of a ``runtest``; and the dispatcher's state putting the branch
and trust into every job it hands out: a whole commit, a shard, a retest,
a job recovered from the journal after a restart."""

from __future__ import annotations

import json

import pytest

from ci.dispatch import register, server
from ci.dispatch.runners import Traits
from ci.runner.jobs import parse_runtest
from ci import jobspec, matrix, sharding, state_schema
from ci.dispatch.journal import Journal
from ci.dispatch.state import DispatcherState
from ci.outcome import Outcome
from ci.runner import environments
from ci.config import ConfigError
from ci.wire import Message, Reply

X, Y, Z = "1" * 40, "2" * 40, "3" * 40
TOKEN = "ab" * 16
RUNNERS = [("127.0.0.1", 9001 + i) for i in range(3)]
TABLE = b"1.500 tests.test_a\n0.250 tests.test_b\n"


@pytest.mark.parametrize("branch, trusted, shard, table", [
    (None, False, None, b""),
    ("main", True, None, b""),
    ("feature/x", False, None, b""),
    ("feature/\u00e9t\u00e9", False, (2, 3), TABLE),
    (None, False, (1, 2), TABLE),
    ("release/1.0", True, (3, 3), b""),
])
def test_the_body_round_trips(branch, trusted, shard, table):
    sent = jobspec.JobSpec(shard and sharding.parse_shard(f"{shard[0]}/{shard[1]}", table),
                           branch, trusted)
    spec = jobspec.parse(jobspec.encode(sent))
    assert spec == sent
    assert (spec.branch, spec.trusted) == (branch, trusted)
    if shard is None:
        assert spec.shard is None
    else:
        expected = sharding.parse_shard(f"{shard[0]}/{shard[1]}", table)
        assert spec.shard == expected and (spec.shard.index, spec.shard.total) == shard


def test_an_older_dispatchers_bodies_keep_their_meaning():
    assert jobspec.encode(jobspec.JobSpec()) == b""   # a whole commit of no known branch: as before
    assert jobspec.parse(b"") == jobspec.JobSpec(None, None, False)
    old = jobspec.parse(b"shard: 2/3\n\n" + TABLE)
    assert (old.shard.index, old.shard.total, old.branch, old.trusted) == (2, 3, None, False)
    assert old.shard.durations == {"tests.test_a": 1.5, "tests.test_b": 0.25}


RULES = "c" * 40


@pytest.mark.parametrize("body", [
    b"",                                                     # a whole commit, as before
    b"shard: 2/3\n\n" + TABLE,                               # an older dispatcher's shard
    b"shard: 1/2\n\n",                                       # a shard with no durations
    b"branch: main\ntrusted: yes\n",
    b"branch: feature/x\ntrusted: no\nfailing_first: 2\n\ntests.a.A.t\ntests.b.B.t[x y]\n",
    b"shard: 3/3\nbranch: main\ntrusted: no\nfailing_first: 1\n\ntests.a.A.t\n" + TABLE,
    b"cell: py3.12-dbpg\npython: 3.12\naxes: db=pg\nbranch: main\ntrusted: yes\n",
    b"cell: extraa\naxes: extra=a\n",
    b"branch: feature/y\ntrusted: no\nrules: " + RULES.encode() + b"\n",
])
def test_encode_gives_back_the_body_parse_read(body):
    """The one job description: what a runner reads of a body is all the
    dispatcher needs to send it again, byte for byte (old bodies too)."""
    assert jobspec.encode(jobspec.parse(body)) == body


def test_each_field_keeps_its_meaning():
    spec = jobspec.parse(b"shard: 3/3\nbranch: main\ntrusted: no\nfailing_first: 1\n\n"
                         b"tests.a.A.t\n" + TABLE)
    assert spec == jobspec.JobSpec(
        sharding.ShardSpec(3, 3, {"tests.test_a": 1.5, "tests.test_b": 0.25}, ("tests.a.A.t",)),
        "main", False, failing_first=("tests.a.A.t",))
    assert jobspec.parse(jobspec.encode(spec)) == spec


@pytest.mark.parametrize("body, reason", [
    (b"trusted: yes\n", "trusted without a branch"),
    (b"branch: main\ntrusted: maybe\n", "trusted must be yes or no"),
    (b"branch: two words\n", "invalid branch name"),
    (b"branch: main\ntrusted: yes\nscope: any\n", "unknown field 'scope'"),
    (b"branch: main\n\n1.0 tests.test_a\n", "durations table without a shard"),
    (b"shard: 4/3\n\n", "does not exist"),
    (b"branch main\n", "malformed field line"),
])
def test_malformed_bodies_are_refused_with_the_reason(body, reason):
    with pytest.raises(ValueError, match=reason):
        jobspec.parse(body)


def test_encode_refuses_what_parse_would():
    with pytest.raises(ValueError):
        jobspec.encode(jobspec.JobSpec(trusted=True))
    with pytest.raises(ValueError):
        jobspec.encode(jobspec.JobSpec(branch="a b"))
    with pytest.raises(ValueError, match="without a cell"):
        jobspec.encode(jobspec.JobSpec(python="3.12"))


def test_trusted_branches_match_patterns():
    patterns = ("main", "release/*")
    assert jobspec.trusted_branch("main", patterns)
    assert jobspec.trusted_branch("release/2.0", patterns)
    assert not jobspec.trusted_branch("Main", patterns)
    assert not jobspec.trusted_branch("feature/main", patterns)
    assert not jobspec.trusted_branch(None, ("*",))
    assert server.trusted_patterns(None) == ("main", "master")
    assert server.trusted_patterns(["trunk", "trunk", "rel/*"]) == ("trunk", "rel/*")
    with pytest.raises(ConfigError, match="not a branch name"):
        server.trusted_patterns(["two words"])


def test_the_runner_reads_branch_and_trust_and_never_trusts_without_a_branch():
    job = parse_runtest(Message("runtest", f"{X} {TOKEN}",
                                jobspec.encode(jobspec.JobSpec(
                                    sharding.parse_shard("1/2", TABLE), "main", True))))
    assert (job.commit, job.token, job.spec.branch, job.spec.trusted) == (X, TOKEN, "main", True)
    assert job.spec.shard.index == 1 and job.scope is environments.TRUSTED_SCOPE
    feature = parse_runtest(Message("runtest", f"{X} {TOKEN}",
                                    jobspec.encode(jobspec.JobSpec(branch="feature/x"))))
    assert (feature.scope.label, feature.scope.name) == ("branch", "branch:feature/x")
    old = parse_runtest(Message("runtest", f"{X} {TOKEN}", b""))
    assert (old.spec.branch, old.spec.trusted, old.scope.label) == (None, False, "commit")
    with pytest.raises(Reply, match="trusted without a branch"):
        parse_runtest(Message("runtest", f"{X} {TOKEN}", b"trusted: yes\n"))
    with pytest.raises(Reply, match="usage"):
        parse_runtest(Message("runtest", X, b""))
    # A short id: its result could never be reported (results name full ids).
    with pytest.raises(Reply, match="full commit id"):
        parse_runtest(Message("runtest", f"{X[:12]} {TOKEN}", b""))


# ---- the dispatcher's jobs -------------------------------------------------

@pytest.fixture
def make_state(tmp_path):
    def make(max_shards=1, runners=1, grace=0.0, trusted=("main",)):
        folder = tmp_path / "results"
        folder.mkdir(exist_ok=True)
        state = DispatcherState(str(folder), Journal(str(tmp_path / "journal")), 3)
        state.max_shards = max_shards
        state.trusted_branches = trusted
        state.recover(grace)
        for address in RUNNERS[:runners]:
            state.register(address, f"i{address[1]}", None)
        return state
    return make


def sent(job):
    spec = jobspec.parse(job.request)
    return spec.branch, spec.trusted


def test_whole_commits_carry_their_branch_and_trust(make_state):
    state = make_state(runners=3)
    state.enqueue([X, Y, Z], {X: ("main", None), Y: ("feature/x", X)})
    jobs = {j.commit: j for j in (state.next_assignment() for _ in range(3))}
    assert sent(jobs[X]) == ("main", True)
    assert sent(jobs[Y]) == ("feature/x", False)
    assert jobs[Z].request == b"" and sent(jobs[Z]) == (None, False)


def test_shards_carry_them_too(make_state):
    state = make_state(max_shards=2, runners=2)
    state.enqueue([X], {X: ("feature/x", None)})
    jobs = [state.next_assignment() for _ in range(2)]
    assert {(j.shard, j.shards) for j in jobs} == {(1, 2), (2, 2)}
    assert all(sent(j) == ("feature/x", False) for j in jobs)
    assert all(jobspec.parse(j.request).shard.index == j.shard for j in jobs)


def test_a_retest_carries_the_branch_of_the_first_run(make_state):
    state = make_state()
    state.enqueue([X], {X: ("main", None)})
    job = state.next_assignment()
    assert state.record_result(X, job.token, None, Outcome({"verdict": "passed"}, b"out\n"))
    assert X not in state.work   # only the result file remembers the branch now
    assert state.retest([X]) == [X]
    assert sent(state.next_assignment()) == ("main", True)


def test_a_job_recovered_after_a_restart_carries_them(make_state):
    state = make_state()
    state.enqueue([X, Y], {X: ("feature/x", None), Y: ("main", None)})
    first = state.next_assignment()
    state.journal.close()
    # A restart (the runner never comes back: both run again), with
    # another --trusted-branch: trust is decided when the job is sent.
    restarted = make_state(runners=2, trusted=("feature/*",))
    jobs = {j.commit: j for j in (restarted.next_assignment() for _ in range(2))}
    assert first.commit == X and sent(jobs[X]) == ("feature/x", True)
    assert sent(jobs[Y]) == ("main", False)


# ---- matrix cells (issue 19) ---------------------------------------------

CELL = matrix.Cell("py3.12-django5.1", "3.12", (("django", "5.1"), ("db", "pg")))


def test_a_cell_round_trips_with_shard_and_branch():
    body = jobspec.encode(jobspec.JobSpec(sharding.parse_shard("1/2", TABLE), "main", True,
                                          CELL.name, CELL.python, CELL.axes))
    spec = jobspec.parse(body)
    assert (spec.cell, spec.python, spec.axes) == (CELL.name, "3.12", CELL.axes)
    assert spec.env == {"CI_DJANGO": "5.1", "CI_DB": "pg"}
    assert (spec.branch, spec.trusted, spec.shard.index) == ("main", True, 1)
    bare = jobspec.parse(jobspec.encode(jobspec.JobSpec(cell="extraa",
                                                        axes=(("extra", "a"),))))
    assert (bare.cell, bare.python, bare.env) == ("extraa", None, {"CI_EXTRA": "a"})


def test_a_single_cell_job_is_todays_body():
    assert jobspec.encode(jobspec.JobSpec(cell=matrix.SINGLE.name)) == b""
    assert jobspec.encode(jobspec.JobSpec(branch="main", trusted=True)) == \
        b"branch: main\ntrusted: yes\n"
    spec = jobspec.parse(b"branch: main\ntrusted: yes\n")
    assert (spec.cell, spec.python, spec.axes, spec.env) == ("", None, (), {})


@pytest.mark.parametrize("body, reason", [
    (b"python: 3.12\n", "python or axes without a cell"),
    (b"axes: a=1\n", "python or axes without a cell"),
    (b"cell: a/b\n", "invalid cell name"),
    (b"cell: x.xml\n", "invalid cell name"),
    (b"cell: py3\npython: 3\n", "not a version"),
    (b"cell: x\naxes: a=1 a=2\n", "given twice"),
    (b"cell: x\naxes: a=b/c\n", "is not axis=value"),
    (b"cell: x\naxes: python=3.12\n", "travels as python"),
])
def test_malformed_cells_are_refused(body, reason):
    with pytest.raises(ValueError, match=reason):
        jobspec.parse(body)
    with pytest.raises(ValueError):
        jobspec.encode(jobspec.JobSpec(cell="a/b"))


@pytest.mark.parametrize("fields, labels, exclusive", [
    ({}, frozenset(), False),
    ({"labels": "gpu python3.12", "exclusive": "no"}, {"gpu", "python3.12"}, False),
    ({"labels": "big", "exclusive": "yes"}, {"big"}, True),
])
def test_register_labels_and_exclusive(fields, labels, exclusive):
    traits = register.runner_traits(fields, 60.0)
    assert (traits.labels, traits.exclusive, traits.limit) == (labels, exclusive, 60.0)


@pytest.mark.parametrize("fields, reason", [
    ({"exclusive": "maybe"}, "exclusive must be yes or no"),
    ({"labels": "gp/u"}, "label 'gp/u'"),
    ({"exclusive": "yes"}, "exclusive runner needs labels"),
])
def test_odd_register_labels_are_refused(fields, reason):
    with pytest.raises(Reply, match=reason):
        register.runner_traits(fields, None)


def test_labels_show_in_state(make_state):
    state = make_state(runners=0)
    state.register(RUNNERS[0], "i0", None, traits=Traits(None, frozenset({"gpu", "a"}), True))
    state.register(RUNNERS[1], "i1", None)
    runners = {r.address: r for r in
               state_schema.State.from_json(json.loads(state.describe())).runners}
    assert (runners["127.0.0.1:9001"].labels, runners["127.0.0.1:9001"].exclusive) == \
        (["a", "gpu"], True)
    assert (runners["127.0.0.1:9002"].labels, runners["127.0.0.1:9002"].exclusive) == \
        ([], False)


def test_a_shard_sends_the_table_its_set_encoded_once():
    """The dispatcher encodes a split's durations table once (up to 2,000
    lines, under its lock) and every shard's body carries those bytes; the
    runner reads them back as the table."""
    table = sharding.encode_table({"tests.test_a": 1.5, "tests.test_b": 0.25})
    spec = jobspec.JobSpec(sharding.ShardSpec(2, 3, {}, (), table), "main", True)
    body = jobspec.encode(spec)
    assert body.endswith(b"\n" + table)
    parsed = jobspec.parse(body)
    assert parsed.shard.durations == {"tests.test_a": 1.5, "tests.test_b": 0.25}
    assert (parsed.shard.index, parsed.shard.total) == (2, 3)
