"""Sparsity schedules for gradual pruning."""

from __future__ import annotations

import math
import numbers


def _check_sparsity(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 <= float(value) < 1.0):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def cubic_sparsity(step: int, total_steps: int, final_sparsity: float, initial_sparsity: float = 0.0,
                   start_step: int = 0) -> float:
    """Cubic sparsity schedule of Zhu & Gupta (2017).

    ``s_t = s_f + (s_0 - s_f) * (1 - t / T) ** 3`` with ``t = step - start_step`` and
    ``T = total_steps``: sparsity rises fast at first (while the network has redundant weights to
    spare) and flattens out as it reaches ``s_f``. Before ``start_step`` it is ``s_0``; from
    ``start_step + total_steps`` on it is ``s_f``.

    Raises ValueError for sparsities outside [0, 1), ``initial_sparsity > final_sparsity``,
    ``total_steps < 1``, ``start_step < 0`` or a non-integer step.
    """
    s_f = _check_sparsity(final_sparsity, "final_sparsity")
    s_0 = _check_sparsity(initial_sparsity, "initial_sparsity")
    if s_0 > s_f:
        raise ValueError(f"initial_sparsity={s_0} is above final_sparsity={s_f}: the schedule only rises")
    total = _check_int(total_steps, "total_steps", 1)
    start = _check_int(start_step, "start_step", 0)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise ValueError(f"step must be an integer, got {step!r}")
    t = min(max(int(step) - start, 0), total)
    sparsity = s_f + (s_0 - s_f) * (1.0 - t / total) ** 3
    # Guard the end points against rounding so callers can compare with s_f exactly.
    if t == total:
        return s_f
    return min(max(sparsity, s_0), s_f) if math.isfinite(sparsity) else s_f
