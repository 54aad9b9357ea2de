"""The benchmarks' interleaved comparison (benchmarks/interleave.py): the
rise of the median while a process works and its interval, resampled a
cycle at a time."""

from __future__ import annotations

import importlib.util
import os
import random

from support.cluster import ROOT


def load_interleave():
    """benchmarks/ is a folder of scripts, not a package."""
    spec = importlib.util.spec_from_file_location(
        "interleave", os.path.join(ROOT, "benchmarks", "interleave.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


interleave = load_interleave()


def timed_run(cycles: int, cost: float, drift: float = 0.0, per_half: int = 30,
              seed: int = 7) -> list:
    """Samples of 2 ms (+ noise) in alternating halves; ``cost`` added
    while working; ``drift`` a random level per cycle that both of its
    halves share (the machine's speed wandering)."""
    draw = random.Random(seed)
    timed, now = [], 0.0
    for _ in range(cycles):
        level = draw.uniform(-drift, drift)
        for working in (True, False):
            for _ in range(per_half):
                now += 0.025
                took = 0.002 + level + draw.gauss(0, 0.0002) + (cost if working else 0.0)
                timed.append((now, took, working))
    return [(0.0, 0.002, None)] + timed            # a sample before the worker was found


def test_halves_cut_the_run_where_the_state_changes():
    cut = interleave.halves(timed_run(3, 0.0, per_half=4))
    assert [state for state, _ in cut] == [True, False] * 3
    assert all(len(got) == 4 for _, got in cut)


def test_a_real_cost_is_found_and_its_interval_leaves_out_zero():
    rise, low, high, cycles = interleave.rise_interval(timed_run(20, 0.0005))
    assert cycles == 20
    assert 0.0004 < rise < 0.0006 and 0 < low <= rise <= high


def test_no_cost_gives_an_interval_around_zero_even_with_drift():
    rise, low, high, _ = interleave.rise_interval(timed_run(20, 0.0, drift=0.001))
    assert low < 0 < high and abs(rise) < 0.0005
    assert "95% interval" in interleave.describe_rise(timed_run(20, 0.0))


def test_too_few_cycles_give_no_interval():
    assert interleave.rise_interval(timed_run(3, 0.001)) is None
    assert interleave.describe_rise(timed_run(3, 0.001)) == "too few cycles for an interval"
