"""Elementwise passes over a block of a weight fused into one loop on a CPU, compiled by ``torch.compile``.

Masked LoRA's block of ``W + ΔW`` is ``W + (s·B A) ⊙ M`` with ``M = W != 0``, and its gradient needs
``G ⊙ M``. In eager PyTorch that is one pass writing ``M`` (as 0/1 in the activations' dtype) and one
pass per use reading it back, each over a whole block read from memory. ``where_kept`` does each
use in one loop that reads ``W`` and the other operand and tests ``W != 0`` as it goes: no mask is
written at all. SPP's block is ``W + W ⊙ (α b ⊙ R(A))``; eager PyTorch writes the change ``α b ⊙ R(A)``
with a GEMM against a one-hot group matrix and reads it back; ``row_scaled`` makes each element's
change inside the loop from ``α b_i`` and the row of ``A`` its row's group uses.

torch.compile's C++ backend generates the loops (vectorized, and threaded as torch's own ops are)
the first time a dtype is seen, a few seconds each, and their results equal the eager ops' bit for
bit (finite values; where ``W`` is 0 ``where_kept`` writes 0 even if the update there is not finite).
``row_scaled`` is for bf16 / fp16 only: in fp32 the eager ``addcmul`` is one fused multiply-add,
which the compiled CPU loop does not reproduce (it rounds the product first).

A loop applies on a CPU, to blocks of at least ``MIN_ELEMENTS`` elements (on smaller ones the eager
ops are as fast and nothing is compiled), unless ``SPARSE_PEFT_CPU_FUSION=0`` or the caller is itself
being compiled (then that compile fuses the eager ops). Elsewhere, or if compiling fails (no C++
compiler, say: a warning says so once), the functions return False and the caller runs the eager
ops, as they do under ``torch.inference_mode`` (evaluation), on inference tensors and on a
non-contiguous weight. On a GPU the same code would generate Triton kernels; that has not been
measured, so GPUs keep the eager ops.

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

#: Set to ``0`` to keep the eager ops everywhere (``1``, the default, or unset: the fused loops).
ENV_SWITCH = "SPARSE_PEFT_CPU_FUSION"

_LOW_PRECISION = (torch.bfloat16, torch.float16)

_failed = False  # compiling failed once: the eager ops from then on


def _kept_sum(weight: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    # W in out's dtype first, then the sum rounded once: what addcmul(W.to(dtype), values, M) gives.
    out.copy_(torch.where(weight != 0, weight.to(out.dtype) + values, 0))


def _kept_values(weight: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(torch.where(weight != 0, values, 0))


def _row_scaled_sum(weight_rows, row_scale, A, groups, out) -> None:
    # The change rounded to out's dtype as the GEMM writes it; W + W ⊙ change in fp32, rounded once.
    change = (row_scale[:, None] * A[groups]).float()
    weight_rows = weight_rows.to(out.dtype).float()
    out.copy_((weight_rows + weight_rows * change).to(out.dtype))


def _row_scaled_change(weight_rows, row_scale, A, groups, out) -> None:
    out.copy_(weight_rows.to(out.dtype) * (row_scale[:, None] * A[groups]))


_LOOPS = {"kept_sum": _kept_sum, "kept_values": _kept_values,
          "row_scaled_sum": _row_scaled_sum, "row_scaled_change": _row_scaled_change}


@functools.lru_cache(maxsize=None)
def _compiled(name: str) -> Callable[..., None]:
    # dynamic: one loop for every block shape (blocks of whole rows vary with the layer and the tail).
    # emulate_precision_casts: keep each rounding to a low precision the eager ops make (of W to out's
    # dtype, of SPP's change), which inductor drops by default (then an fp32 W with bf16 activations
    # gave other sums than the eager ops).
    return torch.compile(_LOOPS[name], dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})


def _switched_on() -> bool:
    value = os.environ.get(ENV_SWITCH) or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_SWITCH} must be 0 (eager ops) or 1 (fused CPU loops, the default), not {value!r}")
    return value == "1"


def applies(weight_rows: torch.Tensor) -> bool:
    """Whether a fused loop would compute for a block of this weight (the caller may then skip forming
    a mask). Not under ``torch.inference_mode``: there torch 2.13's compiler failed on the workspace's
    views (an internal error), so evaluation keeps the eager ops."""
    return (weight_rows.device.type == "cpu" and weight_rows.numel() >= MIN_ELEMENTS and not _failed
            and weight_rows.is_contiguous() and not weight_rows.is_inference()
            and not torch.is_inference_mode_enabled() and _switched_on() and not torch.compiler.is_compiling())


def _takes(weight_rows: torch.Tensor, *operands: torch.Tensor) -> bool:
    """``applies`` to the weight's block, and every other operand contiguous and no inference tensor."""
    return applies(weight_rows) and all(t.is_contiguous() and not t.is_inference() for t in operands)


def _run(name: str, *args: torch.Tensor) -> bool:
    global _failed
    try:
        with torch.no_grad():  # never differentiated; one grad mode, one compiled variant
            _compiled(name)(*args)
    except Exception as error:  # compiling failed: nothing was written, the eager ops do it
        _failed = True
        first_line = str(error).splitlines()[0] if str(error) else ""
        warnings.warn(f"sparse_peft: torch.compile could not build a fused CPU loop over weight blocks "
                      f"({type(error).__name__}: {first_line}); using eager PyTorch ops, which give the same "
                      f"results more slowly. Set {ENV_SWITCH}=0 to skip the attempt.", RuntimeWarning, stacklevel=3)
        return False
    return True


def where_kept(weight_rows: torch.Tensor, values: torch.Tensor, out: torch.Tensor, with_base: bool = False) -> bool:
    """``out = W + values`` (``with_base``) or ``out = values`` where ``W != 0``, and 0 where ``W`` is 0,
    in ``out``'s dtype, ``W`` being ``weight_rows``; ``out`` may be ``values``. False when it does not
    apply (``applies``; all three contiguous, none an inference tensor) or compiling failed: the caller
    computes it with eager ops."""
    if not _takes(weight_rows, values, out):
        return False
    # Flat: the loop is the same for every block shape, and one symbolic size means one compiled variant.
    return _run("kept_sum" if with_base else "kept_values", weight_rows.view(-1), values.view(-1), out.view(-1))


def row_scaled(weight_rows: torch.Tensor, row_scale: torch.Tensor, A: torch.Tensor, groups: torch.Tensor,
               out: torch.Tensor, with_base: bool) -> bool:
    """``out = W + W ⊙ C`` (``with_base``) or ``W ⊙ C`` with ``C[i] = row_scale[i] · A[groups[i]]``
    rounded to ``out``'s dtype, as SPP's eager ops give it; ``row_scale`` and ``A`` in ``out``'s dtype,
    bf16 or fp16 (in fp32 it returns False, see the module docstring). False when it does not apply
    (as for ``where_kept``) or compiling failed: the caller computes it with eager ops."""
    if out.dtype not in _LOW_PRECISION or not _takes(weight_rows, row_scale, A, groups, out):
        return False
    return _run("row_scaled_sum" if with_base else "row_scaled_change", weight_rows, row_scale, A, groups, out)
