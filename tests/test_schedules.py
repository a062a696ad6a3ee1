"""Each schedule against its formula at every epoch (hypothesis over windows, frequencies and goals)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxprune.schedules import sparsity_at


def formula(schedule: str, t: int, start: int, end: int, freq: int, init: float, target: float) -> float:
    """The papers' formulas, written independently of fxprune.schedules.

    The goal changes only at update points start + i*freq (and at end); in
    between it holds the value of the last update point.
    """
    if t < start:
        return 0.0
    if t >= end:
        return target
    t0 = start + ((t - start) // freq) * freq
    if schedule == "oneshot":
        return target
    if schedule == "linear":
        return init + (target - init) * (t0 - start) / (end - start)
    # Zhu & Gupta 2017: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3, n dt = end - start.
    return target + (init - target) * (1 - (t0 - start) / (end - start)) ** 3


windows = st.tuples(st.integers(0, 6), st.integers(0, 12), st.integers(1, 5)).map(
    lambda w: (w[0], w[0] + w[1], w[2])
)
goals = st.tuples(st.floats(0.0, 0.9), st.floats(0.0, 0.99)).map(lambda g: (min(g), max(g)))


@pytest.mark.parametrize("schedule", ["linear", "cubic", "oneshot"])
@settings(max_examples=150, deadline=None)
@given(window=windows, goal=goals)
def test_schedule_matches_formula_at_every_epoch(schedule, window, goal):
    start, end, freq = window
    init, target = goal
    for t in range(end + 4):
        got = sparsity_at(t, start=start, end=end, frequency=freq, init=init, target=target, schedule=schedule)
        assert got == pytest.approx(formula(schedule, t, start, end, freq, init, target), abs=1e-12), t


@pytest.mark.parametrize("schedule", ["linear", "cubic", "oneshot"])
@settings(max_examples=150, deadline=None)
@given(window=windows, goal=goals)
def test_nothing_before_start_target_exactly_at_end_and_held(schedule, window, goal):
    start, end, freq = window
    init, target = goal
    at = lambda t: sparsity_at(t, start=start, end=end, frequency=freq, init=init, target=target, schedule=schedule)  # noqa: E731
    assert all(at(t) == 0.0 for t in range(start))
    assert at(end) == target  # exactly, even when freq does not divide end - start
    assert all(at(t) == target for t in range(end, end + 5))
    values = [at(t) for t in range(start, end + 1)]
    assert values == sorted(values)  # goals never go down inside the window
    if start < end:
        expected_first = target if schedule == "oneshot" else init
        assert at(start) == pytest.approx(expected_first)


def test_cubic_prunes_fast_early_and_gently_late():
    """The point of Zhu & Gupta's schedule: the first steps are the largest."""
    vals = [sparsity_at(t, start=0, end=10, frequency=1, init=0.0, target=0.9, schedule="cubic") for t in range(11)]
    steps = [b - a for a, b in zip(vals, vals[1:])]
    assert steps == sorted(steps, reverse=True) and steps[0] > 3 * steps[-1]
    assert vals[5] == pytest.approx(0.9 * (1 - 0.5**3))
