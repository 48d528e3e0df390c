"""Sparsity schedules for gradual pruning."""

from __future__ import annotations

import math

from .._validation import check_int, check_sparsity


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
    s_f = check_sparsity(final_sparsity, "final_sparsity")
    s_0 = check_sparsity(initial_sparsity, "initial_sparsity")
    if s_0 > s_f:
        raise ValueError(f"initial_sparsity={s_0} is above final_sparsity={s_f}: the schedule only rises")
    total = check_int(total_steps, "total_steps", minimum=1)
    start = check_int(start_step, "start_step", minimum=0)
    t = min(max(check_int(step, "step") - start, 0), total)
    sparsity = s_f + (s_0 - s_f) * (1.0 - t / total) ** 3
    # Guard the end points against rounding so callers can compare with s_f exactly.
    if t == total:
        return s_f
    return min(max(sparsity, s_0), s_f) if math.isfinite(sparsity) else s_f
