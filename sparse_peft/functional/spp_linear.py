"""PyTorch twin of ``kernels/spp_linear.py``: SPP's layer ``y = x (W ⊙ (1 + α R(A) ⊙ b))ᵀ + bias``, and
its update alone ``α · x (R(A) ⊙ b ⊙ W)ᵀ``.

``A`` is (r x in), ``b`` (out x 1), ``R(A)[i] = A[i * r // out]``: out/r consecutive output rows share
one row of ``A``. Both run through ``sparse_peft.delta_linear`` (``RowScaleUpdate``), which builds the
effective weight (or the update) a block of rows at a time in the forward and again in the backward,
so nothing of the weight's size is kept between the two.

``spp_linear_reference`` is the kernel's twin. ``spp_delta_reference`` is for a layer whose base runs
itself (dropout on the update's input, hooks on the base, a quantized base): the kernel fuses the
base GEMM into the same pass, so the update alone has no kernel.
"""

from __future__ import annotations

import torch

from ..delta_linear import RowScaleUpdate, delta_linear
from ..kernels._checks import check_spp_linear


def spp_linear_reference(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, b: torch.Tensor, alpha: float,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (W + α R(A) ⊙ b ⊙ W)ᵀ + bias`` through ``delta_linear`` (one GEMM per block of rows of the
    effective weight, nothing of the weight's size kept for the backward)."""
    check_spp_linear(x, weight, A, b, bias)
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("spp_linear keeps the base weight frozen, but weight.requires_grad is True "
                         "(freeze it, or detach it, before calling)")
    return delta_linear(x, weight, bias, RowScaleUpdate(A, b, alpha))


def _check_update_shapes(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, b: torch.Tensor) -> None:
    if weight.dim() != 2 or A.dim() != 2 or A.shape[1] != weight.shape[1] or tuple(b.shape) != (weight.shape[0], 1):
        raise ValueError(f"SPP shapes do not fit: weight {tuple(weight.shape)}, A {tuple(A.shape)}, "
                         f"b {tuple(b.shape)} (need A: r x in, b: out x 1)")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"SPP input has {x.shape[-1]} features, the weight expects {weight.shape[1]}")


def spp_delta_reference(x: torch.Tensor, weight, A: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """SPP's update alone, ``α · x (R(A) ⊙ b ⊙ W)ᵀ`` in ``x``'s dtype, through ``delta_linear``.

    Args:
        x: input activations (..., in), any float dtype; the output has the same dtype.
        weight: the frozen pruned base weight (out x in), or a function returning it (dequantized per call).
        A: (r x in), ``r <= out``; ``b``: (out x 1). Usually fp32.
        alpha: scaling.
    """
    if callable(weight):  # a quantized base's dequantizing function: delta_linear checks what it returns
        return delta_linear(x, weight, None, RowScaleUpdate(A, b, alpha), with_base=False)
    _check_update_shapes(x, weight, A, b)
    return delta_linear(x, weight.detach(), None, RowScaleUpdate(A, b, alpha), with_base=False)
