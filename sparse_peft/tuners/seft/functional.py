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
    # contiguous: the flat positions index it row-major (a Conv1D base arrives as a transposed view).
    weight = base_weight.detach().to(dtype).clone(memory_format=torch.contiguous_format)
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


# --- N:M layers: every change of the topology stays inside one group ---------------------------------
# A flat position p lies in group p // m (rows are a multiple of m long, so groups never straddle rows).


def grow_within_groups(grow_score: torch.Tensor, active: torch.Tensor, staying: torch.Tensor, k: int,
                       m: int) -> torch.Tensor:
    """The ``k`` positions with the largest ``grow_score`` such that every group can give up one active
    position for each pruned position grown in it (so its count of nonzeros, N, is kept).

    ``grow_score`` is ``-inf`` where growing is not allowed (the old ``A``); ``active`` is the current
    topology (bool, flat); ``staying`` the positions that stay in ``A``. A group's partners are its
    active positions outside the new ``A``: active, not ``staying`` and not grown this time (so a
    just-dropped position may be switched off, as in the unstructured case). Returned in descending
    score. Needs at least ``k`` active positions outside ``A`` (the layer makes sure: ``|A| <= nnz/2``).
    """
    score = grow_score.clone()
    groups = active.numel() // m
    free = active.clone()
    free[staying] = False
    free_per_group = free.view(groups, m).sum(dim=1)
    while True:
        grown = largest(score, k)
        grown = grown[score[grown] > float("-inf")]
        is_regrown = ~active[grown]
        group = grown // m
        regrown_per_group = torch.bincount(group[is_regrown], minlength=groups)
        partners = free_per_group - torch.bincount(group[~is_regrown], minlength=groups)
        allowed = partners.clamp(min=0)
        if bool((regrown_per_group <= allowed).all()):
            break
        # Keep the best `allowed` re-grown positions of each over-full group; rule the rest out and
        # choose again (each round removes at least one candidate, so this ends).
        candidates, candidate_group = grown[is_regrown], group[is_regrown]
        order = torch.argsort(candidate_group, stable=True)  # grown is by descending score already
        sorted_group = candidate_group[order]
        first_of_group = torch.searchsorted(sorted_group, sorted_group, side="left")
        rank_in_group = torch.arange(order.numel(), device=order.device) - first_of_group
        excess = rank_in_group >= allowed[sorted_group]
        score[candidates[order[excess]]] = float("-inf")
    if grown.numel() != k:
        raise RuntimeError(f"SEFT N:M update: only {grown.numel()} of {k} slots found a position that keeps the "
                           f"pattern (fewer than {k} active positions outside A)")
    return grown


def smallest_per_group(scores: torch.Tensor, count_per_group: torch.Tensor, m: int) -> torch.Tensor:
    """For every group ``g``, the positions of its ``count_per_group[g]`` smallest scores (stable)."""
    needy = count_per_group.nonzero().squeeze(-1)
    if needy.numel() == 0:
        return needy
    in_group = torch.argsort(scores.view(-1, m)[needy], dim=1, stable=True)
    take = torch.arange(m, device=scores.device)[None, :] < count_per_group[needy][:, None]
    return (needy[:, None] * m + in_group)[take]
