"""SEFT's math: the effective weight of a sparse delta, its autograd, and the sparse-set helpers.

Positions are flat indices ``i * in_features + j`` into a layer's (out, in) weight. Everything that
is kept between steps is O(|A|) (indices and values); the dense (out, in) tensors built here are
transient: they live inside one forward or one backward and are freed after it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def effective_weight(base_weight: torch.Tensor, delta_index: torch.Tensor, delta: torch.Tensor,
                     frozen_index: torch.Tensor, frozen_delta: torch.Tensor,
                     removed_index: torch.Tensor) -> torch.Tensor:
    """``(W + F + Δ) ⊙ M`` in fp32 (or wider), as a new (out, in) tensor.

    ``M`` is the base's mask with ``removed_index`` switched off (switched-on positions have
    ``W = 0`` and get their value from ``F`` or ``Δ``, so they need no work here).
    """
    # fp32 at least (a bf16 base plus a small fp32 delta), fp64 when given fp64 (gradcheck).
    dtype = torch.promote_types(torch.promote_types(base_weight.dtype, delta.dtype), torch.float32)
    weight = base_weight.detach().to(dtype).clone()
    flat = weight.view(-1)
    if frozen_index.numel():
        flat.index_add_(0, frozen_index, frozen_delta.detach().to(dtype))
    if delta_index.numel():
        flat.index_add_(0, delta_index, delta.detach().to(dtype))
    if removed_index.numel():
        flat.index_fill_(0, removed_index, 0.0)
    return weight


def sddmm_reference(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """``(grad_outᵀ x)`` at ``flat_index`` (fp32). The dense product is transient: on a CPU one GEMM
    plus a gather is cheaper than gathering (tokens x |A|) rows; on a GPU ``sparse_peft.ops.sddmm``
    computes only the sampled entries."""
    dtype = torch.promote_types(torch.promote_types(grad_out_2d.dtype, x_2d.dtype), torch.float32)
    dense = grad_out_2d.to(dtype).t() @ x_2d.to(dtype)
    return dense.view(-1)[flat_index]


def _sddmm(grad_out_2d, x_2d, flat_index):
    if not grad_out_2d.is_cuda:  # the reference's one GEMM + gather is the fast path on a CPU
        return sddmm_reference(grad_out_2d, x_2d, flat_index)
    from ... import ops  # Triton's sampled product on a GPU (sparse_peft.ops dispatches)

    return ops.sddmm(grad_out_2d, x_2d, flat_index)


class SparseDeltaLinear(torch.autograd.Function):
    """``y = x · ((W + F + Δ) ⊙ M)ᵀ`` with the gradient of ``Δ`` computed only at its positions.

    Nothing dense is saved for the backward: the effective weight is rebuilt there (for ``dx``), and
    ``dΔ`` is a sampled product. When ``grad_sink`` is collecting (the few steps before a topology
    update), the backward also adds the dense weight gradient into ``grad_sink.grad_accum``.
    """

    @staticmethod
    def forward(ctx, x, delta, base_weight, delta_index, frozen_index, frozen_delta, removed_index, grad_sink):
        weight = effective_weight(base_weight, delta_index, delta, frozen_index, frozen_delta, removed_index)
        ctx.save_for_backward(x, delta, base_weight, delta_index, frozen_index, frozen_delta, removed_index)
        ctx.grad_sink = grad_sink
        return F.linear(x, weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        x, delta, base_weight, delta_index, frozen_index, frozen_delta, removed_index = ctx.saved_tensors
        out_features, in_features = base_weight.shape
        grad_2d = grad_y.reshape(-1, out_features)
        x_2d = x.reshape(-1, in_features)
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            weight = effective_weight(base_weight, delta_index, delta, frozen_index, frozen_delta, removed_index)
            grad_x = (grad_2d @ weight.to(grad_2d.dtype)).view(x.shape)
        sink = ctx.grad_sink
        if sink is not None and sink.collecting:
            dense_grad = grad_2d.to(torch.float32).t() @ x_2d.to(torch.float32)
            sink.accumulate(dense_grad)
            if ctx.needs_input_grad[1]:
                grad_delta = dense_grad.view(-1)[delta_index]
        elif ctx.needs_input_grad[1]:
            grad_delta = _sddmm(grad_2d, x_2d, delta_index)
        if grad_delta is not None:
            grad_delta = grad_delta.to(delta.dtype)
        return grad_x, grad_delta, None, None, None, None, None, None


def sparse_delta_linear(x, delta, base_weight, delta_index, frozen_index, frozen_delta, removed_index,
                        grad_sink: Optional[object] = None) -> torch.Tensor:
    return SparseDeltaLinear.apply(x, delta, base_weight, delta_index, frozen_index, frozen_delta,
                                   removed_index, grad_sink)


# --- small sets of flat positions ------------------------------------------------------------------


def coalesce(index: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum values that share a position; positions come back sorted (deterministic on every rank)."""
    if index.numel() == 0:
        return index, values
    unique, inverse = torch.unique(index, sorted=True, return_inverse=True)
    summed = torch.zeros(unique.numel(), dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    return unique, summed


def without(index: torch.Tensor, values: Optional[torch.Tensor], drop: torch.Tensor):
    """``index`` (and its ``values``) without the positions in ``drop``."""
    keep = ~torch.isin(index, drop)
    return index[keep], (values[keep] if values is not None else None)


def smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest scores; ties go to the lower index (stable), so every rank agrees."""
    return torch.argsort(scores, stable=True)[:k]


def largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.argsort(scores, descending=True, stable=True)[:k]
