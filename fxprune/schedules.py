"""Sparsity goal as a pure function of time.

``t`` is an epoch number. Every schedule is piecewise constant: the goal only
changes at update points ``start, start + frequency, start + 2*frequency, ...``
and at ``end`` itself, so the target is reached exactly at ``end`` whatever the
frequency (the seed's schedule could miss it when ``end - start`` was not a
multiple of ``frequency``). Before ``start`` the goal is 0; from ``end`` on it
is the target.
"""
from __future__ import annotations

import math
from typing import Callable

__all__ = ["sparsity_at", "last_update_point", "SCHEDULES"]


def last_update_point(t: int, start: int, end: int, frequency: int) -> int:
    """The latest update point ``<= t`` inside ``[start, end]`` (requires ``start <= t``)."""
    if t >= end:
        return end
    return start + ((t - start) // frequency) * frequency


def _linear(progress: float, init: float, target: float) -> float:
    """The seed's schedule: the goal rises linearly from ``init`` to ``target``."""
    return init + (target - init) * progress


def _cubic(progress: float, init: float, target: float) -> float:
    """Zhu & Gupta 2017, "To prune, or not to prune", eq. 1:
    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3 -- fast early, gentle late."""
    return target + (init - target) * (1.0 - progress) ** 3


def _oneshot(progress: float, init: float, target: float) -> float:
    """Jump straight to the target at ``start``."""
    return target


SCHEDULES: dict[str, Callable[[float, float, float], float]] = {
    "linear": _linear,
    "cubic": _cubic,
    "oneshot": _oneshot,
}


def sparsity_at(
    t: int,
    *,
    start: int,
    end: int,
    frequency: int,
    init: float,
    target: float,
    schedule: str = "linear",
) -> float:
    """The sparsity goal in force at time ``t``.

    ``start == end`` is a one-shot schedule: the goal is ``target`` from ``start`` on.
    """
    if t < start:
        return 0.0
    point = last_update_point(t, start, end, frequency)
    if point >= end:
        return float(target)
    progress = (point - start) / (end - start)
    value = SCHEDULES[schedule](progress, float(init), float(target))
    # Guard against float drift so that goals stay within [init, target].
    return float(min(max(value, min(init, target)), max(init, target))) if math.isfinite(value) else float(target)
