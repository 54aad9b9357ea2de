"""The broke/fixed decision (ci/notify/decider.py, pure): events in commit
order whatever the arrival order, red -> red -> green, retest flips, and
predecessors that are unknown, pending, not given yet or in a cycle."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings, strategies as st

from support.notify import chain, cid, pending_lookup

from ci.notify.decider import NOTIFY_ON, PENDING, UNKNOWN, Decider, Result


@pytest.mark.parametrize("notify_on, announced", [
    ("change", ["broken", "fixed"]),
    ("failure", ["broken", "still-failing", "fixed"]),
    ("all", ["passed", "broken", "still-failing", "fixed"]),
])
def test_red_red_green(notify_on, announced):
    results = chain(["passed", "failed", "timeout", "passed"])
    decider = Decider(NOTIFY_ON[notify_on])
    decisions = decider.add(results, pending_lookup(results))
    assert [d.kind for d in decisions] == ["passed", "broken", "still-failing", "fixed"]
    assert [d.kind for d in decisions if d.announce] == announced
    assert decisions[3].previous_verdict == "timeout"
    assert decisions[0].previous_verdict is None


def test_out_of_order_arrival_waits_for_the_earlier_commit():
    results = chain(["passed", "failed", "failed", "passed"])
    decider = Decider(NOTIFY_ON["all"])
    lookup = pending_lookup(results)
    for later in (results[3], results[1], results[2]):
        assert decider.add([later], lookup) == []
    assert decider.waiting()[results[1].commit] == results[0].commit
    decisions = decider.add([results[0]], lookup)
    assert [d.result.commit for d in decisions] == [r.commit for r in results]
    assert [d.kind for d in decisions] == ["passed", "broken", "still-failing", "fixed"]
    assert decider.waiting() == {}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["passed", "failed", "error"]), min_size=1, max_size=7),
       st.lists(st.sampled_from(["passed", "failed"]), min_size=1, max_size=4),
       st.randoms(use_true_random=False))
def test_any_arrival_order_gives_the_in_order_decisions(main, feature, rnd):
    results = chain(main) + chain(feature, "feature", first_previous=cid("main-0"))
    expected = Decider(NOTIFY_ON["all"]).add(results, pending_lookup(results))
    shuffled = list(results)
    rnd.shuffle(shuffled)
    decider = Decider(NOTIFY_ON["all"])
    lookup = pending_lookup(results)
    got = list(itertools.chain.from_iterable(decider.add([r], lookup) for r in shuffled))
    for branch in ("main", "feature"):
        mine = [(d.result.commit, d.kind, d.event_id) for d in got
                if d.result.branch == branch]
        assert mine == [(d.result.commit, d.kind, d.event_id) for d in expected
                        if d.result.branch == branch]


def test_retest_flip_emits_the_implied_event_and_a_new_id():
    results = chain(["passed", "failed"])
    decider = Decider()
    first = decider.add(results, pending_lookup(results))
    assert [d.kind for d in first] == ["passed", "broken"]
    flipped = Result(results[1].commit, "main", results[0].commit, "passed")
    (fixed,) = decider.add([flipped])
    assert (fixed.kind, fixed.retest, fixed.previous_verdict, fixed.n) == \
        ("fixed", True, "failed", 2)
    assert fixed.event_id != first[1].event_id
    assert decider.add([flipped]) == []  # the same verdict again decides nothing
    (again,) = decider.add([Result(results[1].commit, "main", results[0].commit, "error")])
    assert (again.kind, again.n) == ("broken", 3)


def test_unknown_previous_is_judged_alone_and_pending_waits():
    commit, previous = cid("x"), cid("gone")
    decider = Decider(NOTIFY_ON["failure"])
    (alone,) = decider.add([Result(commit, "main", previous, "failed")])
    assert (alone.kind, alone.announce) == ("failed", True)
    waiting = Result(cid("y"), "dev", cid("running"), "failed")
    assert decider.add([waiting], lambda c: PENDING) == []


def test_a_previous_result_not_given_yet_is_read_and_decided_first():
    base = Result(cid("base"), None, None, "passed")        # no branch: never announced
    one = Result(cid("one"), "main", base.commit, "failed")
    two = Result(cid("two"), "main", one.commit, "failed")
    files = {base.commit: base, one.commit: one}
    decisions = Decider(NOTIFY_ON["all"]).add(
        [two], lambda c: files.get(c, UNKNOWN))
    assert [(d.result.commit, d.kind) for d in decisions] == \
        [(one.commit, "broken"), (two.commit, "still-failing")]


def test_a_waiting_commit_is_released_by_a_result_without_branch():
    old, new = cid("old-style"), cid("new-style")
    decider = Decider()
    assert decider.add([Result(new, "main", old, "failed")], lambda c: PENDING) == []
    (decision,) = decider.add([Result(old, None, None, "passed")])
    assert (decision.result.commit, decision.kind) == (new, "broken")


def test_a_cycle_in_bad_metadata_does_not_hang():
    a, b = cid("a"), cid("b")
    decisions = Decider().add([Result(a, "main", b, "failed"), Result(b, "main", a, "passed")],
                              lambda c: PENDING)
    assert sorted(d.result.commit for d in decisions) == sorted([a, b])
