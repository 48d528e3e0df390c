"""SPP's delta path as plain functions (the PyTorch reference).

Per target linear with weight ``W`` (out x in), SPP trains ``A`` (r x in) and ``b`` (out x 1):

    R(A)[i] = A[group(i)],   group(i) = floor(i * r / out)
    ΔW      = R(A) ⊙ b ⊙ W
    delta   = α · x ΔWᵀ

``ΔW`` is zero wherever ``W`` is, so the update can never leave the pruned topology.

Training runs through ``sparse_peft.delta_linear``, which never keeps a dense ``ΔW`` (or any out x in
tensor) alive across the forward/backward gap: it saves ``x`` and references to ``W``, ``A``, ``b``
and rebuilds ``ΔW`` a block of rows at a time inside the backward. On a GPU the fused Triton kernel
(``sparse_peft.ops.spp_linear``) computes the same without forming any block.
"""

from __future__ import annotations

import torch

from ...delta_linear import RowScaleUpdate, delta_linear


def row_groups(out_features: int, r: int, device=None) -> torch.Tensor:
    """Which row of ``A`` each output row uses: ``floor(i * r / out_features)`` (int64, length out).

    Consecutive output rows share a row of ``A``; when ``r`` does not divide ``out_features`` the
    groups differ in size by at most one row (sizes ``floor(out/r)`` or ``ceil(out/r)``), and every
    row of ``A`` is used as long as ``r <= out_features``.
    """
    return torch.arange(out_features, device=device, dtype=torch.int64) * r // out_features


def expand_rows(A: torch.Tensor, out_features: int) -> torch.Tensor:
    """``R(A)``: ``A``'s rows repeated along the output dimension so it has ``out_features`` rows."""
    return A.index_select(0, row_groups(out_features, A.shape[0], A.device))


def spp_delta_weight(weight: torch.Tensor, A: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``α · R(A) ⊙ b ⊙ W`` as a dense tensor in ``A``'s dtype (for merging, inspection and tests).

    Exactly zero wherever ``W`` is zero.
    """
    dtype = torch.promote_types(weight.dtype, A.dtype)
    scale = expand_rows(A.to(dtype), weight.shape[0]) * (b.to(dtype) * alpha)
    return scale * weight.to(dtype)


def merge_factor(weight_shape: torch.Size, A: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``α · R(A) ⊙ b`` (out x in): the relative change SPP makes to every weight; merging multiplies
    ``W`` by ``1 + `` the sum of these over the merged adapters."""
    return expand_rows(A, weight_shape[0]) * (b * alpha)


def _check_shapes(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, b: torch.Tensor) -> None:
    if weight.dim() != 2 or A.dim() != 2 or A.shape[1] != weight.shape[1] or tuple(b.shape) != (weight.shape[0], 1):
        raise ValueError(f"SPP shapes do not fit: weight {tuple(weight.shape)}, A {tuple(A.shape)}, "
                         f"b {tuple(b.shape)} (need A: r x in, b: out x 1)")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"SPP input has {x.shape[-1]} features, the weight expects {weight.shape[1]}")


def spp_delta_reference(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, b: torch.Tensor,
                        alpha: float) -> torch.Tensor:
    """SPP's delta path ``α · x (R(A) ⊙ b ⊙ W)ᵀ`` in ``x``'s dtype, through ``sparse_peft.delta_linear``.

    Args:
        x: input activations (..., in), any float dtype; the output has the same dtype.
        weight: the frozen pruned base weight (out x in), or a function returning it (dequantized per call).
        A: (r x in), ``r <= out``; ``b``: (out x 1). Usually fp32.
        alpha: scaling.
    """
    if callable(weight):  # a quantized base's dequantizing function: delta_linear checks what it returns
        return delta_linear(x, weight, None, RowScaleUpdate(A, b, alpha), with_base=False)
    _check_shapes(x, weight, A, b)
    return delta_linear(x, weight.detach(), None, RowScaleUpdate(A, b, alpha), with_base=False)


