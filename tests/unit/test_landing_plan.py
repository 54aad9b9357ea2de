"""The land queue's pure planner (ci/landing/plan.py): the speculative
chain, exclusion of red and conflicting entries, rebuilds when the target
moves, and landing only the front entry tested green on exactly the
target head; then a property test simulating random verdicts, conflicts
and target moves against the guarantees the queue gives."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ci.landing.plan import Build, Entry, Land, Mark, Reject, plan

T0 = "t" * 40


def e(id, tested=None, base=None, verdict=None, reason="", target="main"):
    return Entry(id, f"feature/{id}", target, f"h{id}", tested, base, verdict, reason)


def test_nothing_built_builds_the_front_on_the_target_and_the_rest_wait():
    assert plan([e(1), e(2), e(3)], T0, 3) == [Build(1, T0), Mark(2, "waiting"),
                                               Mark(3, "waiting")]


def test_a_speculative_chain_up_to_the_depth():
    entries = [e(1, "m1", T0), e(2, "m2", "m1"), e(3), e(4)]
    assert plan(entries, T0, 3) == [Mark(1, "testing"), Mark(2, "testing"), Build(3, "m2"),
                                    Mark(4, "waiting")]
    entries[2] = e(3, "m3", "m2")
    assert plan(entries, T0, 3) == [Mark(1, "testing"), Mark(2, "testing"),
                                    Mark(3, "testing"), Mark(4, "waiting")]


def test_the_front_lands_only_when_passed_on_the_target_head():
    entries = [e(1, "m1", T0, "passed"), e(2, "m2", "m1", "passed")]
    assert plan(entries, T0, 3) == [Land(1, T0, "m1"), Mark(2, "passed")]
    # After it landed the target head is m1, and entry 2 was tested on exactly that.
    assert plan(entries[1:], "m1", 3) == [Land(2, "m1", "m2")]


def test_a_passed_entry_behind_an_untested_one_waits():
    entries = [e(1, "m1", T0, "running"), e(2, "m2", "m1", "passed")]
    assert plan(entries, T0, 2) == [Mark(1, "testing"), Mark(2, "passed")]


def test_a_red_front_is_rejected_with_its_reason():
    entries = [e(1, "m1", T0, "failed", "2 failures: t.a, t.b")]
    assert plan(entries, T0, 3) == [Reject(1, "failed: 2 failures: t.a, t.b")]
    assert plan([e(1, "m1", T0, "timeout", "-")], T0, 3) == [Reject(1, "timeout")]


def test_a_red_entry_behind_the_front_is_excluded_and_those_behind_rebuilt_without_it():
    entries = [e(1, "m1", T0, "running"), e(2, "m2", "m1", "failed", "x"),
               e(3, "m3", "m2", "running")]
    assert plan(entries, T0, 3) == [Mark(1, "testing"), Mark(2, "failing"), Build(3, "m1")]


def test_an_excluded_entry_is_judged_when_it_reaches_the_front():
    # Entry 1 landed: entry 2 failed on exactly the new target head: rejected at once.
    assert plan([e(2, "m2", "m1", "failed", "x")], "m1", 3) == [Reject(2, "failed: x")]
    # Entry 1 was rejected: entry 2 failed on m1, which main never got: tested again.
    assert plan([e(2, "m2", "m1", "failed", "x")], T0, 3) == [Build(2, T0)]


def test_a_conflict_at_the_front_is_rejected_and_behind_it_is_blocked():
    assert plan([e(1, None, T0, "conflict", "a.py b.py")], T0, 3) == \
        [Reject(1, "conflict with main: a.py b.py")]
    entries = [e(1, "m1", T0, "running"), e(2, None, "m1", "conflict", "a.py"),
               e(3, "m3", "m1")]
    assert plan(entries, T0, 3) == [Mark(1, "testing"), Mark(2, "blocked"),
                                    Mark(3, "testing")]


def test_excluded_entries_do_not_take_a_place_in_the_window():
    entries = [e(1, "m1", T0), e(2, "m2", "m1", "failed"), e(3)]
    assert plan(entries, T0, 2) == [Mark(1, "testing"), Mark(2, "failing"), Build(3, "m1")]


def test_the_target_moved_rebuilds_from_the_front():
    entries = [e(1, "m1", T0, "passed"), e(2, "m2", "m1", "passed")]
    assert plan(entries, "other", 3) == [Build(1, "other"), Mark(2, "waiting")]


def test_a_green_entry_tested_on_an_old_head_never_lands():
    assert plan([e(1, "m1", "old", "passed")], T0, 1) == [Build(1, T0)]


def test_depth_one_tests_one_entry_at_a_time():
    entries = [e(1, "m1", T0, "running"), e(2)]
    assert plan(entries, T0, 1) == [Mark(1, "testing"), Mark(2, "waiting")]


def test_a_lower_depth_keeps_builds_made_but_builds_no_more():
    entries = [e(1, "m1", T0), e(2, "m2", "m1", "passed"), e(3)]
    assert plan(entries, T0, 1) == [Mark(1, "testing"), Mark(2, "passed"), Mark(3, "waiting")]


def test_depth_must_be_positive():
    with pytest.raises(ValueError):
        plan([], T0, 0)


def test_every_entry_gets_exactly_one_action_and_only_the_front_lands():
    verdicts = [None, "running", "passed", "failed", "conflict"]
    for combo in itertools.product(verdicts, repeat=3):
        entries, base = [], T0
        for i, verdict in enumerate(combo, 1):
            tested = None if verdict == "conflict" else f"m{i}"
            entries.append(e(i, tested, base if verdict else None, verdict))
            if verdict and verdict != "conflict":
                base = tested
        actions = plan(entries, T0, 2)
        assert [a.id for a in actions] == [1, 2, 3]
        assert all(not isinstance(a, Land) for a in actions[1:])


# --------------------------------------------------------------------------
# The property test: a simulated target branch, test runs finishing with
# random verdicts, entries conflicting at random, the target moved by
# someone else, and lease pushes losing a race.


class Simulation:
    def __init__(self, depth: int):
        self.depth = depth
        self.target = "c0"
        self.parents = {"c0": None}     # commit -> first parent
        self.tested_on = {}             # merge commit -> (entry id, base)
        self.verdicts = {}              # merge commit -> final verdict
        self.entries: dict[int, Entry] = {}
        self.kinds = {}                 # entry id -> "ok" | "stacked-conflict" | "conflict"
        self.landed_ids: list[int] = []
        self.moved_by_others: set[str] = set()
        self.rejected: dict[int, str] = {}
        self.ids = itertools.count(1)
        self.commits = itertools.count(1)
        self.race = False

    def commit(self, parent: str) -> str:
        name = f"c{next(self.commits)}"
        self.parents[name] = parent
        return name

    def ask(self, kind: str) -> None:
        id = next(self.ids)
        self.entries[id] = Entry(id, f"b{id}", "main", f"h{id}")
        self.kinds[id] = kind

    def under_test(self) -> list[str]:
        return sorted(x.tested for x in self.entries.values()
                      if x.tested and x.verdict is None)

    def finish(self, pick: int, passed: bool) -> None:
        pending = self.under_test()
        if pending:
            tested = pending[pick % len(pending)]
            self.verdicts[tested] = "passed" if passed else "failed"
            for id, x in self.entries.items():
                if x.tested == tested:
                    self.entries[id] = Entry(**{**x.__dict__, "verdict": self.verdicts[tested],
                                                "reason": "" if passed else "boom"})

    def move(self) -> None:
        self.target = self.commit(self.target)
        self.moved_by_others.add(self.target)

    def step(self) -> None:
        for _ in range(200):
            active = sorted(self.entries.values(), key=lambda x: x.id)
            actions = plan(active, self.target, self.depth)
            assert [a.id for a in actions] == [x.id for x in active]
            busy = [a for a in actions if not isinstance(a, Mark)]
            if not busy:
                return
            for action in busy:
                self.apply(action)
        raise AssertionError("the planner never settled")

    def apply(self, action) -> None:
        x = self.entries[action.id]
        if isinstance(action, Build):
            kind = self.kinds[x.id]
            if kind == "conflict" or (kind == "stacked-conflict" and action.base != self.target):
                self.entries[x.id] = Entry(x.id, x.branch, x.target, x.head, None, action.base,
                                           "conflict", "f.py")
            else:
                tested = self.commit(action.base)
                self.tested_on[tested] = (x.id, action.base)
                self.entries[x.id] = Entry(x.id, x.branch, x.target, x.head, tested,
                                           action.base)
        elif isinstance(action, Land):
            assert action.id not in self.landed_ids, "an entry landed twice"
            assert action.new == x.tested
            if self.race:       # someone pushed between plan and push: the lease fails
                self.race = False
                self.move()
                return
            assert action.old == self.target, "the lease names a head that is not the target's"
            assert self.verdicts.get(action.new) == "passed", "landed a commit not tested green"
            assert self.parents[action.new] == self.target, "landed commit not on the target"
            assert self.tested_on[action.new] == (x.id, self.target)
            self.target = action.new
            self.landed_ids.append(x.id)
            del self.entries[x.id]
        elif isinstance(action, Reject):
            self.rejected[x.id] = action.reason
            del self.entries[x.id]

    def check_first_parent_line(self) -> None:
        commit = self.target
        while commit != "c0":
            parent = self.parents[commit]
            if commit not in self.moved_by_others:
                assert self.verdicts[commit] == "passed"
                assert self.tested_on[commit][1] == parent
            commit = parent


operations = st.lists(st.one_of(
    st.tuples(st.just("ask"), st.sampled_from(["ok", "ok", "ok", "stacked-conflict",
                                               "conflict"])),
    st.tuples(st.just("finish"), st.integers(0, 10), st.booleans()),
    st.tuples(st.just("move")),
    st.tuples(st.just("race")),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4), operations)
def test_nothing_lands_untested_twice_or_off_the_target(depth, ops):
    sim = Simulation(depth)
    for op in ops:
        if op[0] == "ask":
            sim.ask(op[1])
        elif op[0] == "finish":
            sim.finish(op[1], op[2])
        elif op[0] == "move":
            sim.move()
        else:
            sim.race = True
        sim.step()
        sim.check_first_parent_line()
    # Liveness: with every test from now on green and no more moves, the
    # queue drains: each entry lands or is rejected, none is stuck.
    sim.race = False
    for _ in range(100):
        sim.step()
        if not sim.entries:
            break
        while sim.under_test():
            sim.finish(0, True)
    assert not sim.entries, sim.entries
    sim.check_first_parent_line()
    assert len(set(sim.landed_ids)) == len(sim.landed_ids)
    for id, kind in sim.kinds.items():
        if kind == "conflict":
            assert id in sim.rejected and sim.rejected[id].startswith("conflict")
