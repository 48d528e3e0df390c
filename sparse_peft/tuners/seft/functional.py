"""SEFT's math: the effective weight of a sparse delta, its autograd, and the sparse-set helpers.

Positions are flat indices ``i * in_features + j`` into a layer's (out, in) weight. Everything that
is kept between steps is O(|A|) (indices and values); training builds no dense (out, in) tensor,
only blocks of rows of one (``sparse_peft.delta_linear``) that live inside one forward or backward.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ... import ops
from ...delta_linear import (FRESH, Workspace, blockwise_grad_input, blockwise_linear, grad_operands,
                             grad_weight_rows, pass_workspace)
from ...sparsity.selection import lowest_in_order


class SparseLayout(NamedTuple):
    """Where SEFT's changes sit: every changed position once, sorted (``positions``); for each frozen
    delta then each ``Δ`` entry, the position it adds into (``slot``); which positions are switched
    off (``removed``); and ``A`` in CSR form for the sampled gradient (``delta_order`` sorts ``Δ``'s
    entries row-major, ``delta_crow`` / ``delta_col`` are their rows' offsets and columns); and, in
    host memory, where each row's positions begin in ``positions`` (``row_offsets``, out + 1 entries),
    so that a block of rows finds its positions without reading the device (on a GPU each such read
    waits for all queued work: one per block and pass stalled the whole step). It depends on the
    topology only, so a layer keeps it until the indices change; its indices are in
    ``ops.position_dtype`` (int32 below 2**31 weights: 17 bytes a position with ``removed``, where
    int64 took 33)."""

    positions: torch.Tensor
    slot: torch.Tensor
    removed: torch.Tensor
    delta_order: torch.Tensor
    delta_crow: torch.Tensor
    delta_col: torch.Tensor
    row_offsets: torch.Tensor


def sparse_layout(frozen_index: torch.Tensor, delta_index: torch.Tensor, removed_index: torch.Tensor,
                  shape: tuple[int, int]) -> SparseLayout:
    positions, inverse = torch.unique(torch.cat([frozen_index, delta_index, removed_index]), return_inverse=True)
    n_added = frozen_index.numel() + delta_index.numel()
    removed = torch.zeros(positions.numel(), dtype=torch.bool, device=positions.device)
    removed[inverse[n_added:]] = True
    crow, col, order = ops.csr_pattern(delta_index, shape)
    row_starts = torch.arange(shape[0] + 1, dtype=positions.dtype, device=positions.device) * shape[1]
    # Kept until the topology changes, several indices per trained weight: in 4 bytes where they fit.
    dtype = ops.position_dtype(max(shape[0] * shape[1], n_added))
    row_offsets = torch.searchsorted(positions, row_starts).to("cpu", dtype)
    return SparseLayout(positions.to(dtype), inverse[:n_added].to(dtype), removed, order, crow, col, row_offsets)


class SparseUpdate:
    """SEFT's effective weight ``(W + F + Δ) ⊙ M`` a block of rows at a time, for ``delta_linear``'s
    blockwise GEMMs: a copy of ``W[rows]`` with the few changed positions overwritten. Their values
    (``values``: ``W + F + Δ`` there, added in fp32 or wider and rounded once to ``dtype``; exactly 0
    where switched off) are made once for the whole layer, so a block costs a copy and one scatter.
    A training forward hands its ``SparseUpdate`` to the backward, which reuses the values: one
    number per changed position, next to the layout's several indices. ``Δ``'s gradient is a sampled
    product (``SparseDeltaLinear``), so this builds no autograd graph.
    """

    def __init__(self, base_weight: torch.Tensor, layout: SparseLayout, delta: torch.Tensor,
                 frozen_delta: torch.Tensor, dtype: Optional[torch.dtype] = None):
        self.in_features, self.layout = base_weight.shape[1], layout
        wide = torch.promote_types(torch.promote_types(base_weight.dtype, delta.dtype), torch.float32)
        added = torch.cat([frozen_delta.detach().to(wide), delta.detach().to(wide)])
        values = _values_at(base_weight.detach(), layout.positions).to(wide).index_add_(0, layout.slot, added)
        values.masked_fill_(layout.removed, 0)  # switched off: exactly 0
        self.values = values.to(dtype or wide)

    def mask_rows(self, weight_rows: torch.Tensor, dtype: torch.dtype, workspace: Workspace = FRESH) -> None:
        return None

    def weight_rows(self, start, stop, weight_rows, dtype, with_base=True, mask=None,
                    workspace: Workspace = FRESH):
        lo, hi = int(self.layout.row_offsets[start]), int(self.layout.row_offsets[stop])
        touched = self.layout.positions[lo:hi] - start * self.in_features  # indexing takes int32 as well
        block = workspace.take("update", weight_rows.shape, dtype, weight_rows.device).copy_(weight_rows)
        block.view(-1).index_put_((touched,), self.values[lo:hi].to(dtype))
        return block


def _values_at(weight: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) at flat row-major ``positions``; a transposed view (a ``Conv1D``'s) is read
    where it lies, not copied whole."""
    if weight.is_contiguous():
        return weight.view(-1).index_select(0, positions)
    return torch.take(weight, positions.long())


class SparseDeltaLinear(torch.autograd.Function):
    """``y = x · ((W + F + Δ) ⊙ M)ᵀ`` with the gradient of ``Δ`` computed only at its positions.

    Nothing dense is saved for the backward, and every dense transient is one block of rows
    (``sparse_peft.delta_linear``): the effective weight is rebuilt a block at a time for ``dx``,
    ``dΔ`` is a sampled product (``sp.ops.sddmm``). When ``grad_sink`` is collecting (the few steps before a topology
    update), the backward also adds the dense weight gradient, a block of rows at a time, into
    ``grad_sink.grad_accum``.
    """

    @staticmethod
    def forward(ctx, x, delta, base_weight, delta_index, frozen_delta, layout, grad_sink):
        ctx.save_for_backward(x, delta, base_weight, delta_index, frozen_delta, *layout)
        ctx.grad_sink = grad_sink
        ctx.update = SparseUpdate(base_weight, layout, delta, frozen_delta, x.dtype)
        y = blockwise_linear(x.reshape(-1, x.shape[-1]), base_weight.detach(), ctx.update, True)
        return y.view(*x.shape[:-1], base_weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x, delta, base_weight, delta_index, frozen_delta, *layout_tensors = ctx.saved_tensors
        layout = SparseLayout(*layout_tensors)
        # Δ's positions in CSR form: the collecting window and the sampled product both read them
        csr = ops.CSRPattern(layout.delta_crow, layout.delta_col, layout.delta_order)
        out_features, in_features = base_weight.shape
        grad_2d = grad_y.reshape(-1, out_features).to(x.dtype)
        x_2d = x.reshape(-1, in_features)
        grad_x = grad_delta = None
        # The forward's values, freed here rather than with the graph (which a kept loss holds on to);
        # a second backward through a retained graph makes them again.
        update, ctx.update = ctx.update, None
        if ctx.needs_input_grad[0]:
            if update is None:
                update = SparseUpdate(base_weight, layout, delta, frozen_delta, x.dtype)
            grad_x = blockwise_grad_input(grad_2d, base_weight.detach(), update, True).view(x.shape)
        sink = ctx.grad_sink
        if sink is not None and sink.collecting:
            grad_delta = torch.empty(delta_index.numel(), dtype=torch.float32, device=delta.device)
            grad_t, x_for_grad = grad_operands(grad_2d, x_2d)
            with pass_workspace(x.device) as workspace:
                for start, stop, targets, offsets in ops.positions_by_row_block(delta_index, csr, out_features,
                                                                                in_features):
                    dense = grad_weight_rows(grad_t, x_for_grad, start, stop, workspace)
                    sink.accumulate_rows(start, stop, dense)
                    grad_delta.index_put_((targets,), dense.view(-1).index_select(0, offsets).float())
            if not ctx.needs_input_grad[1]:
                grad_delta = None
        elif ctx.needs_input_grad[1]:
            grad_delta = ops.sddmm(grad_2d, x_2d, delta_index, csr=csr)
        if grad_delta is not None:
            grad_delta = grad_delta.to(delta.dtype)
        return grad_x, grad_delta, None, None, None, None, None


def effective_weight(base_weight: torch.Tensor, delta_index: torch.Tensor, delta: torch.Tensor,
                     frozen_index: torch.Tensor, frozen_delta: torch.Tensor,
                     removed_index: torch.Tensor) -> torch.Tensor:
    """``(W + F + Δ) ⊙ M`` in fp32 (or wider), as a new dense (out, in) tensor (for merging, topology
    updates and tests; training never forms it whole).

    ``M`` is the base's mask with ``removed_index`` switched off (switched-on positions have
    ``W = 0`` and get their value from ``F`` or ``Δ``).
    """
    layout = sparse_layout(frozen_index, delta_index, removed_index, tuple(base_weight.shape))
    update = SparseUpdate(base_weight, layout, delta, frozen_delta)
    weight = base_weight.detach()
    with torch.no_grad():
        return update.weight_rows(0, weight.shape[0], weight, update.values.dtype)


def sparse_delta_linear(x, delta, base_weight, delta_index, frozen_index, frozen_delta, removed_index,
                        grad_sink: Optional[object] = None, layout: Optional[SparseLayout] = None) -> torch.Tensor:
    """``x · ((W + F + Δ) ⊙ M)ᵀ`` (see ``SparseDeltaLinear``); ``layout`` (``sparse_layout`` of the
    three index sets) may be passed when it is known, else it is computed."""
    if layout is None:
        layout = sparse_layout(frozen_index, delta_index, removed_index, tuple(base_weight.shape))
    return SparseDeltaLinear.apply(x, delta, base_weight, delta_index, frozen_delta, layout, grad_sink)


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
    """Indices of the ``k`` smallest of the 1-D ``scores``, smallest first; ties go to the lower index
    (stable), so every rank agrees: ``argsort(scores, stable=True)[:k]``. Over a whole layer a sort
    would hold an int64 order and a copy of it (12 bytes a weight): the ``k`` are selected a block at
    a time instead (``lowest_in_order``) and only they are sorted. NaN ranks last, tying with ``+inf``."""
    chosen = lowest_in_order(scores, k).nonzero().squeeze(1)
    return chosen[torch.argsort(scores[chosen], stable=True)]


def largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest, largest first, ties to the lower index (as ``smallest``; NaN ranks
    first, tying with ``+inf``)."""
    chosen = lowest_in_order(scores, k, descending=True).nonzero().squeeze(1)
    return chosen[torch.argsort(scores[chosen], descending=True, stable=True)]


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
