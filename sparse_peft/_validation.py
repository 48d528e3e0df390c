"""Checks of scalar options shared by configs, pruners and schedules.

``bool`` is an ``int`` subclass in Python, so ``True`` would pass a plain ``isinstance(x, int)``
check as 1; every check here refuses it. Integers and reals are read through ``numbers`` so that
NumPy scalars count as well.

This module is the foundation layer: it imports nothing from the package.
"""

from __future__ import annotations

import math
import numbers


def is_int(value) -> bool:
    """True for an integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """True for a finite real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def check_int(value, name: str, minimum: int | None = None) -> int:
    """``value`` as an ``int``; ValueError naming ``name`` and the value if it is not an integer
    (or is below ``minimum``)."""
    if not is_int(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
    return int(value)


def check_sparsity(value, name: str = "sparsity") -> float:
    """``value`` as a ``float`` in [0, 1); ValueError naming ``name`` and the value otherwise."""
    if not is_real(value) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)
