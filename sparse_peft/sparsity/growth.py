"""Growing a keep mask: more zeros, nested in the ones it already has.

Gradual pruning adds zeros to a layer at every event and never un-prunes, so each new mask must
contain every pruned position of the previous one. Both rules below take the lowest-scored
*still-kept* weights (lower score = pruned first; ties to the lower index, as in a stable sort), and end
with an exact count of zeros:

- ``grow_keep_mask``: the zeros are spread over output rows as evenly as the existing zeros allow.
  From a dense mask this is exactly ``selection.rowwise_keep_mask`` (Wanda's / row-wise magnitude's
  per-row rule).
- ``grow_keep_mask_nm``: a new zero goes only to a group of ``M`` consecutive inputs that holds fewer
  than ``M - N`` zeros, so at the full count every group is N:M. A group already past ``M - N``
  zeros keeps them (it is N:M as it is).

Pure functions on tensors: ``scores`` and ``keep`` are out x in, ``keep`` is bool (``True`` = kept).
"""

from __future__ import annotations

import torch

from .selection import lowest_in_order, lowest_per_row, nan_ranks_last, next_lowest_per_row, rank_blocks, rank_in_groups


def grow_keep_mask(scores: torch.Tensor, keep: torch.Tensor, n_zeros: int) -> torch.Tensor:
    """A keep mask with exactly ``n_zeros`` pruned positions that contains every pruned position of
    ``keep`` (nested), adding the lowest-scored kept weights.

    The zeros are spread over output rows as evenly as the existing ones allow: every row ends with
    ``max(its zeros now, L)`` zeros for the largest level ``L`` that fits, and the remaining few go one
    each to the rows at level ``L`` whose next candidate scores lowest. From a dense ``keep`` this is
    exactly ``selection.rowwise_keep_mask``.
    """
    rows, cols = scores.shape
    zeros_per_row = cols - keep.sum(dim=1, dtype=torch.int32).long()
    have = int(zeros_per_row.sum())
    if not have <= n_zeros <= rows * cols:
        raise ValueError(f"cannot grow a mask with {have} zeros to {n_zeros} zeros (of {rows * cols} weights)")
    if n_zeros == have:
        return keep.clone()
    lo, hi = 0, cols  # largest L with sum(max(zeros_r, L)) <= n_zeros
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(zeros_per_row.clamp(min=mid).sum()) <= n_zeros:
            lo = mid
        else:
            hi = mid - 1
    level = lo
    per_row = zeros_per_row.clamp(min=level)
    extra = n_zeros - int(per_row.sum())
    new_keep = torch.empty_like(keep)
    # Per row: its next candidate (the lowest-scored weight left kept) and that one's score.
    next_idx = torch.empty(rows, dtype=torch.long, device=scores.device)
    next_score = torch.empty(rows, dtype=torch.float32, device=scores.device)
    # The rule is per row until the last few zeros, so the ranking's transients (a float copy of the
    # scores, kthvalue's copy and int64 indices, a few bool masks) are made a block of rows at a time.
    for start, stop in rank_blocks(rows, cols):
        block_keep = keep[start:stop]
        # Old zeros rank first, so a row's `level` lowest hold all its old zeros; a row with more old
        # zeros than `level` keeps them all (the `| ~block_keep`).
        ranked = nan_ranks_last(scores[start:stop]).masked_fill_(~block_keep, float("-inf"))
        pruned = lowest_per_row(ranked, level) | ~block_keep
        new_keep[start:stop] = ~pruned
        if extra:
            next_score[start:stop], next_idx[start:stop] = next_lowest_per_row(ranked, pruned)
    if extra:
        can_take = ((per_row == level) & (per_row < cols)).nonzero().squeeze(1)
        chosen = can_take[torch.argsort(next_score[can_take], stable=True)[:extra]]
        new_keep[chosen, next_idx[chosen]] = False
    return new_keep


def grow_keep_mask_nm(scores: torch.Tensor, keep: torch.Tensor, n_zeros: int, n: int, m: int) -> torch.Tensor:
    """A keep mask with exactly ``n_zeros`` pruned positions, nested in ``keep``, with at most ``m - n``
    zeros in every group of ``m`` consecutive inputs (or its zeros now, if more): the lowest-scored kept
    weights among those whose group still has room. At the full count every group is N:M.
    (Rows are not balanced on the way; at the end the pattern balances them.)"""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M with M={m} does not divide {cols} inputs")
    groups_keep = keep.reshape(-1, m)
    # A group already past M - N zeros (exact zeros of the checkpoint) is N:M as it is: no room, kept.
    zeros = (~groups_keep).sum(dim=1, dtype=torch.int32)
    room = ((m - n) - zeros).clamp(min=0)
    have = int(zeros.sum())
    capacity = have + int(room.sum())
    if not have <= n_zeros <= capacity:
        raise ValueError(f"cannot grow a mask with {have} zeros to {n_zeros} zeros at {n}:{m} "
                         f"(at most {capacity} fit)")
    if n_zeros == have:
        return keep.clone()
    # A group's candidates are its `room` lowest-scored kept weights. They are found a block of rows at
    # a time; only their scores (in the layer's order) and where they are outlive the block.
    candidate = torch.empty_like(keep)
    candidate_scores = []
    for start, stop in rank_blocks(rows, cols):
        groups = slice(start * cols // m, stop * cols // m)
        ranked = nan_ranks_last(scores[start:stop]).reshape(-1, m)
        block_keep = groups_keep[groups]
        block_candidate = block_keep & (rank_in_groups(ranked, block_keep) < room[groups, None])
        candidate[start:stop] = block_candidate.reshape(stop - start, cols)
        candidate_scores.append(ranked[block_candidate])
    # The lowest candidates of the whole layer, ties to the lower position (the candidates are in the
    # layer's order), are the new zeros.
    chosen = lowest_in_order(torch.cat(candidate_scores), n_zeros - have)
    new_keep = keep.clone()
    new_keep.view(-1).masked_scatter_(candidate.view(-1), ~chosen)
    return new_keep
