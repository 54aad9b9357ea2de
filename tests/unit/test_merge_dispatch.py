"""Merged results on the dispatcher's side (issue 22): the dispatch line's
key=value fields, their journal record, the ``conflict`` verdict written
without a run (also after a restart), the merge header fields, the job's
``rules``, a runner never sending ``conflict``, and the ``verdicts``
answer's pure parts."""

from __future__ import annotations

import os

import pytest

from ci import jobspec, matrix, mergeinfo, results, verdicts
from ci.dispatch import journal, server
from ci.dispatch.journal import Journal, parse_record, replay_lines
from ci.dispatch.runners import Traits
from ci.dispatch.state import DispatcherState
from ci.dispatch.work import Meta
from ci.outcome import Outcome
from ci.wire import ProtocolError, encode_fields

X, Y, H, T = "1" * 40, "2" * 40, "3" * 40, "4" * 40
MERGE = mergeinfo.MergeInfo(H, T, "main")
MERGE_FIELD = mergeinfo.encode_merge_field(MERGE)
CONFLICT_FIELD = mergeinfo.encode_conflicts(["a.py", "dir/b c.txt"])


def body(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


# ---- the dispatch line ---------------------------------------------------

def test_a_conflict_has_an_id_of_its_own_for_each_head_and_target():
    """Never the head's id (a plain test of the head is another verdict),
    the same for the same merge, another for another target or commit,
    and as long as the head's (SHA-256 repositories too)."""
    own = mergeinfo.conflict_id(MERGE)
    assert own == mergeinfo.conflict_id(mergeinfo.MergeInfo(H, T, "main"))
    assert own not in (H, T) and len(own) == 40 and int(own, 16) >= 0
    others = {mergeinfo.conflict_id(mergeinfo.MergeInfo(H, T, "release")),
              mergeinfo.conflict_id(mergeinfo.MergeInfo(H, X, "main")),
              mergeinfo.conflict_id(mergeinfo.MergeInfo(X, T, "main"))}
    assert len(others) == 3 and own not in others
    long_id = mergeinfo.conflict_id(mergeinfo.MergeInfo("5" * 64, "6" * 64, "main"))
    assert len(long_id) == 64 and results.result_name(long_id) == long_id


def test_merge_and_conflict_fields_in_any_order_unknown_keys_ignored():
    meta, plans = server.parse_dispatch_body(body(
        f"{X} - feature/a future=1 {MERGE_FIELD} other=x",
        f"{Y} {X} feature/b {CONFLICT_FIELD} {MERGE_FIELD}"), [X, Y])
    assert meta[X] == Meta("feature/a", None, MERGE, None) and X not in plans
    assert meta[Y] == Meta("feature/b", X, MERGE, ("a.py", "dir/b c.txt")) and Y not in plans


def test_a_bad_merge_field_is_no_merge_info_and_a_lone_conflict_is_ignored():
    bad = [f"merge={H}:{T}", f"merge={H}:{T[:-1]}:main", f"merge={H}:{T}:ma~in",
           f"merge={H}:{T}:a:b", "merge=", f"merge={H[:39]}:{T}:main"]
    for field in bad:
        meta, _ = server.parse_dispatch_body(body(f"{X} - feature/a {field}"), [X])
        assert meta[X] == Meta("feature/a", None), field
    meta, _ = server.parse_dispatch_body(body(f"{X} - feature/a {CONFLICT_FIELD}"), [X])
    assert meta[X] == Meta("feature/a", None)


def test_an_undecodable_conflict_is_still_a_conflict_naming_no_path():
    meta, _ = server.parse_dispatch_body(body(f"{X} - f {MERGE_FIELD} conflict=!!"), [X])
    assert meta[X].merge == MERGE and meta[X].conflicts == ()


def test_plans_still_travel_beside_merge_fields_but_never_with_a_conflict():
    plan = matrix.Plan(tuple(matrix.expand("[ci]\nmatrix_python = 3.9 3.12\n")))
    field = matrix.encode_plan(plan)
    meta, plans = server.parse_dispatch_body(body(
        f"{X} - f {MERGE_FIELD} {field}", f"{Y} - f {field} {MERGE_FIELD} {CONFLICT_FIELD}"),
        [X, Y])
    assert plans[X] == plan and meta[X].merge == MERGE
    assert Y not in plans and meta[Y].conflicts == ("a.py", "dir/b c.txt")


# ---- the journal -----------------------------------------------------------

def test_the_meta_record_keeps_merge_info_and_old_records_still_read():
    line = journal.meta_record(X, "feature/a", Y, MERGE, ("a.py",))
    assert parse_record(line).value == ("feature/a", Y, MERGE, ("a.py",))
    assert parse_record(journal.meta_record(X, "f", None, MERGE)).value == \
        ("f", None, MERGE, None)
    # A journal written before issue 22, and a record with a bad merge field.
    assert parse_record(f"M {X} - main").value == ("main", None, None, None)
    assert parse_record(f"M {X} - main merge=nonsense").value == ("main", None, None, None)
    got = replay_lines(f"Q {X}\nM {X} {Y} dev\n".encode())
    assert Meta(*got.meta[X]) == Meta("dev", Y)


# ---- the dispatcher's state --------------------------------------------------

@pytest.fixture
def make_state(tmp_path):
    made = []

    def make():
        folder = tmp_path / "results"
        folder.mkdir(exist_ok=True)
        state = DispatcherState(str(folder), Journal(str(tmp_path / "journal")), 3)
        state.recover(0.0)
        made.append(state)
        return state
    yield make
    for state in made:
        state.journal.close()


def header(tmp_path, commit):
    return results.read_header(str(tmp_path / "results" / commit))


def test_a_conflict_gets_its_verdict_without_a_run(make_state, tmp_path):
    state = make_state()
    told = []
    state.listeners.append(lambda commit, outcome: told.append((commit, outcome.verdict)))
    state.register(("127.0.0.1", 9001), "i1", None, traits=Traits(None, frozenset(), False))
    meta = {H: Meta("feature/a", None, MergeInfo_head(H), ("a.py", "b%c.txt"))}
    assert state.enqueue([H], meta) == [H]
    got = header(tmp_path, H)
    assert got["verdict"] == "conflict" and got["runner"] == "dispatcher"
    assert got["merged_into"] == f"main {T}" and got["merge_head"] == H
    assert mergeinfo.parse_paths(got["conflicts"]) == ("a.py", "b%c.txt")
    assert got["branch"] == "feature/a" and "a.py" in got["reason"]
    with open(tmp_path / "results" / H, "rb") as handle:
        assert b"a.py" in results.parse_result(handle.read())[1]
    assert not state.queue and not state.is_pending(H)
    from support.cluster import wait_until
    wait_until(lambda: told == [(H, "conflict")], 5)


def MergeInfo_head(head):
    return mergeinfo.MergeInfo(head, T, "main")


def test_a_journalled_conflict_is_written_at_restart_never_run(make_state, tmp_path):
    with open(tmp_path / "journal", "w") as handle:
        handle.write(f"Q {H}\n" + journal.meta_record(H, "feature/a", None,
                                                       MergeInfo_head(H), ("x.py",)) + "\n")
    state = make_state()
    assert header(tmp_path, H)["verdict"] == "conflict"
    assert not state.queue and not state.work
    again = make_state()                          # and a second restart changes nothing
    assert not again.queue and header(tmp_path, H)["conflicts"] == "x.py"


def test_a_merge_commit_job_names_the_target_as_rules_and_its_header_the_merge(
        make_state, tmp_path):
    state = make_state()
    state.register(("127.0.0.1", 9001), "i1", None, traits=Traits(None, frozenset(), False))
    state.enqueue([X, Y], {X: Meta("feature/a", None, MERGE), Y: Meta("main", None)})
    jobs = {job.commit: job for job in (state.next_assignment(), )}
    job = jobs[X]
    assert jobspec.parse(job.request).rules == T
    assert state.record_result(X, job.token, None, Outcome({"verdict": "passed"}, b"ok\n"))
    got = header(tmp_path, X)
    assert (got["merged_into"], got["merge_head"]) == (f"main {T}", H)
    assert "conflicts" not in got
    plain = state.next_assignment()
    assert plain.commit == Y and jobspec.parse(plain.request).rules is None


def test_the_merge_survives_a_restart(make_state, tmp_path):
    state = make_state()
    state.enqueue([X], {X: Meta("feature/a", None, MERGE)})
    state.journal.close()
    again = make_state()
    again.register(("127.0.0.1", 9001), "i1", None, traits=Traits(None, frozenset(), False))
    assert jobspec.parse(again.next_assignment().request).rules == T


def test_a_retest_of_a_merge_keeps_its_rules(make_state, tmp_path):
    state = make_state()
    state.register(("127.0.0.1", 9001), "i1", None, traits=Traits(None, frozenset(), False))
    state.enqueue([X], {X: Meta("feature/a", None, MERGE)})
    job = state.next_assignment()
    state.record_result(X, job.token, None, Outcome({"verdict": "failed"}, b""))
    assert state.retest([X]) == [X]
    assert jobspec.parse(state.next_assignment().request).rules == T


# ---- runners may not send it ---------------------------------------------------

def test_a_runner_can_never_send_conflict():
    ok = Outcome({"verdict": "passed"}, b"").to_body()
    assert Outcome.from_body(ok).verdict == "passed"
    forged = encode_fields({"verdict": "conflict", "conflicts": "x"}) + b"\nout"
    with pytest.raises(ProtocolError, match="verdict must be one of"):
        Outcome.from_body(forged)
    assert "conflict" in results.VERDICTS and "conflict" not in results.RUNNER_VERDICTS


# ---- the job's rules -----------------------------------------------------------

def test_rules_travel_in_the_job_and_must_be_a_full_id():
    spec = jobspec.parse(jobspec.encode(jobspec.JobSpec(branch="feature/a", rules=T)))
    assert spec.rules == T and spec.branch == "feature/a"
    assert jobspec.parse(jobspec.encode(jobspec.JobSpec(branch="feature/a"))).rules is None
    with pytest.raises(ValueError):
        jobspec.encode(jobspec.JobSpec(branch="f", rules="abc"))
    with pytest.raises(ValueError, match="rules"):
        jobspec.parse(b"branch: f\ntrusted: no\nrules: 1234\n")


# ---- verdicts: the pure parts ------------------------------------------------------

def test_verdicts_request_and_reply_round_trip():
    assert verdicts.parse_request(f"{X} {Y} {X}") == [X, Y]
    for bad in ("", "abc", " ".join([X] * 201), f"{X} {X[:-1]}"):
        with pytest.raises(verdicts.VerdictsError):
            verdicts.parse_request(bad)
    data = verdicts.format_reply([(X, "failed", "2 failures: a.T.test_x\nb"),
                                  (Y, "queued", ""), (H, "conflict", "x" * 400)])
    got = verdicts.parse_reply(data + f"{T} pruned:failed x\nnonsense\n".encode())
    assert got[X] == ("failed", "2 failures: a.T.test_x b") and got[Y] == ("queued", "-")
    assert got[H] == ("conflict", "x" * 300) and T not in got
    with pytest.raises(verdicts.VerdictsError):
        verdicts.format_line(X, "pruned:failed")


def test_verdict_reasons():
    assert verdicts.reason_of({"verdict": "passed"}) == "-"
    assert verdicts.reason_of({"verdict": "conflict", "conflicts": "a.py b%20c"}) == "a.py b c"
    assert verdicts.reason_of({"verdict": "failed", "failures": "2"},
                              ["t.T.a", "t.T.b"]) == "2 failures: t.T.a, t.T.b"
    assert verdicts.reason_of({"verdict": "failed", "failures": "3", "errors": "1"}) == \
        "3 failures, 1 errors"
    assert verdicts.reason_of({"verdict": "error", "reason": "checkout failed"}) == \
        "checkout failed"


def test_the_verdicts_answer(make_state, tmp_path):
    state = make_state()
    state.register(("127.0.0.1", 9001), "i1", None, traits=Traits(None, frozenset(), False))
    state.enqueue([X, Y, H], {H: Meta("f", None, MergeInfo_head(H), ("a.py",))})
    job = state.next_assignment()
    assert job.commit == X
    rows = {c: (s, r) for c, s, r in state.verdicts([X, Y, H, T])}
    assert rows == {X: ("running", "-"), Y: ("queued", "-"), H: ("conflict", "a.py"),
                    T: ("unknown", "-")}
    state.record_result(X, job.token, None, Outcome({"verdict": "passed"}, b""))
    assert state.verdicts([X]) == [(X, "passed", "-")]


# ---- every consumer counts a conflict as red ----------------------------------------

def test_consumers_treat_conflict_as_red():
    from ci.dashboard import assets, index, pages
    from ci.dashboard.app import Dashboard as App
    from ci.notify import decider, events
    from ci.retention import policy
    assert decider.classify("passed", "conflict") == "broken"
    assert decider.classify("conflict", "passed") == "fixed"
    assert decider.result_from_fields(X, {"verdict": "conflict"}).verdict == "conflict"
    event = {"commit": X, "subject": "", "author": "", "failures": 0, "errors": 0,
             "tests": 0, "verdict": "conflict", "reason": "merge conflict with main: a.py",
             "event": "broken", "branch": "feature/a", "retest": False, "url": ""}
    assert "verdict conflict: merge conflict with main: a.py" in events.event_text(event)
    assert pages.verdict_class("conflict") == "conflict" and ".v-conflict" in assets.CSS
    assert "conflict" in index.RED
    assert App._filters({"verdict": "conflict"})["verdict"] == "conflict"
    entries = {c: policy.Entry(c, "feature/a", p, v, t) for c, p, v, t in (
        (X, None, "passed", 1.0), (Y, X, "conflict", 2.0), (H, Y, "conflict", 3.0),
        (T, H, "conflict", 4.0))}
    assert policy.protected(entries, {}) == {Y, T}    # broke it; the newest


# ---- the runner reads the target's quarantine --------------------------------------

def test_the_target_quarantine_is_read_from_git_or_empty(tmp_path):
    from ci.runner import recipe, rules
    from support.cluster import Upstream
    repo = Upstream(tmp_path / "repo")
    target = repo.commit({".ci.ini": "[ci]\nquarantine = tests.test_a.T.test_x\n"})
    bare = repo.commit({".ci.ini": None, "x.txt": "x\n"})
    broken = repo.commit({".ci.ini": "[ci]\nnonsense = 1\n"})
    limits = recipe.Limits()
    got, note = rules.target_quarantine(repo.path, target, limits)
    assert got == ("tests.test_a.T.test_x",) and "target's rules" in note
    assert rules.target_quarantine(repo.path, bare, limits)[0] == ()
    for unreadable in (broken, "9" * 40):
        got, note = rules.target_quarantine(repo.path, unreadable, limits)
        assert got == () and "cannot be read" in note and "no test is quarantined" in note


def test_an_oversized_target_recipe_is_never_read_whole(tmp_path):
    """The runner read ``<rules>:.ci.ini`` whole (a pushed 200 MB recipe
    packs into some 224 KB) only to refuse it as too large; its size is
    asked first, and the quarantine is empty, saying why."""
    from ci.runner import recipe, rules
    from support.cluster import Upstream
    from support.procs import run_measured
    repo = Upstream(tmp_path / "repo")
    target = repo.commit({".ci.ini": b"[ci]\nquarantine = tests.test_a.T.test_x\n"
                                     + b"#" * (32 << 20)})
    script = ("import sys; from ci.runner import recipe, rules; "
              "print(rules.target_quarantine(sys.argv[1], sys.argv[2], recipe.Limits()))")
    printed, peak_mb = run_measured(script, repo.path, target, timeout=60, cwd=os.path.dirname(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert printed.startswith("((), ") and "(.ci.ini is larger than 65536 bytes)" in printed
    assert peak_mb < 48, f"{peak_mb:.0f} MB to refuse one oversized recipe"
    got, note = rules.target_quarantine(repo.path, target, recipe.Limits())
    assert got == () and "no test is quarantined" in note
