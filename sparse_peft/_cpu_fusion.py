"""Masking a block of a weight-sized tensor in one loop on a CPU, compiled by ``torch.compile``.

Masked LoRA's block of ``W + ΔW`` is ``W + (s·B A) ⊙ M`` with ``M = W != 0``, and its gradient needs
``G ⊙ M``. In eager PyTorch that is one pass writing ``M`` (as 0/1 in the activations' dtype) and one
pass per use reading it back, each over a whole block read from memory. ``where_kept`` does each
use in one loop that reads ``W`` and the other operand and tests ``W != 0`` as it goes: no mask is
written at all. torch.compile's C++ backend generates the loop (vectorized, multi-threaded as torch's
own ops are) the first time a dtype is seen; the results equal the eager ops' bit for bit.

It applies on a CPU, to blocks of at least ``MIN_ELEMENTS`` elements (on smaller ones the eager ops
are as fast and nothing is compiled), unless ``SPARSE_PEFT_CPU_FUSION=0`` or the caller is itself
being compiled (then that compile fuses the eager ops). Elsewhere, or if compiling fails (no C++
compiler, say: a warning says so once), ``where_kept`` returns False and the caller runs the eager
ops. On a GPU it would generate a Triton kernel; that has not been measured, so GPUs keep the eager
ops.

This module is in the foundation layer: it imports nothing of the package.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch

#: Smallest block (elements) worth a compiled loop: below it the eager ops cost about as much as the
#: compiled function's call.
MIN_ELEMENTS = 1 << 18

#: Set to ``0`` to keep the eager ops everywhere.
ENV_SWITCH = "SPARSE_PEFT_CPU_FUSION"

_failed = False  # compiling failed once: the eager ops from then on


def _kept_sum(weight_rows: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    # W in out's dtype first, then the sum rounded once: what addcmul(W.to(dtype), values, M) gives.
    out.copy_(torch.where(weight_rows != 0, weight_rows.to(out.dtype) + values, 0))


def _kept_values(weight_rows: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(torch.where(weight_rows != 0, values, 0))


@functools.lru_cache(maxsize=None)
def _compiled(with_base: bool) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]:
    # dynamic: one loop for every block shape (blocks of whole rows vary with the layer and the tail).
    # emulate_precision_casts: keep the rounding of W to out's dtype, which inductor drops by default
    # (an fp32 W with bf16 activations then gave other sums than the eager ops).
    return torch.compile(_kept_sum if with_base else _kept_values, dynamic=True, fullgraph=True,
                         options={"emulate_precision_casts": True})


def applies(weight_rows: torch.Tensor) -> bool:
    """Whether ``where_kept`` would compute for a block of this weight (the caller may then skip
    forming a mask)."""
    return (weight_rows.device.type == "cpu" and weight_rows.numel() >= MIN_ELEMENTS and not _failed
            and os.environ.get(ENV_SWITCH, "1") != "0" and not torch.compiler.is_compiling())


def where_kept(weight_rows: torch.Tensor, values: torch.Tensor, out: torch.Tensor, with_base: bool = False) -> bool:
    """``out = W + values`` (``with_base``) or ``out = values`` where ``W != 0``, and 0 where ``W`` is 0,
    in ``out``'s dtype, ``W`` being ``weight_rows``; ``out`` may be ``values``. False when it does not
    apply (``applies``) or compiling failed: the caller computes it with eager ops."""
    global _failed
    if not applies(weight_rows):
        return False
    try:
        _compiled(with_base)(weight_rows, values, out)
    except Exception as error:  # compiling failed: nothing was written, the eager ops do it
        _failed = True
        warnings.warn(f"sparse_peft: torch.compile could not build the fused CPU loop for masking weights "
                      f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); using "
                      f"eager PyTorch ops, which give the same results more slowly. Set {ENV_SWITCH}=0 to "
                      f"skip the attempt.", RuntimeWarning, stacklevel=2)
        return False
    return True
