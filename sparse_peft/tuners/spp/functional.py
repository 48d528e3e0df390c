"""SPP's math as plain functions: which row of ``A`` each output row uses (``R(A)``), and the dense
update that merging and inspection use.

Per target linear with weight ``W`` (out x in), SPP trains ``A`` (r x in) and ``b`` (out x 1):

    R(A)[i] = A[group(i)],   group(i) = floor(i * r / out)
    ΔW      = R(A) ⊙ b ⊙ W
    delta   = α · x ΔWᵀ

``ΔW`` is zero wherever ``W`` is, so the update can never leave the pruned topology.

Training runs through ``sparse_peft.ops`` (``spp_linear``: base and update in one op; ``spp_delta``:
the update alone), which never keeps a dense ``ΔW`` (or any out x in tensor) alive across the
forward/backward gap: the PyTorch twin saves ``x`` and references to ``W``, ``A``, ``b`` and rebuilds
``ΔW`` a block of rows at a time inside the backward (``sparse_peft.delta_linear``); the fused Triton
kernel computes the same without forming any block.
"""

from __future__ import annotations

import torch


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
