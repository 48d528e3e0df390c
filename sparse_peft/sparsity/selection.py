"""Turning importance scores into masks with an exact count of zeros, and writing masks into weights.

Every function returns a bool ``keep`` mask (``True`` = kept). Lower score = pruned first; ties go
to the lower input index (stable sort), so results are deterministic.

Exactness (the promise every pruner keeps; see docs/pruning.md):
- a layer's unstructured target is an integer count of zeros ``Z`` (``round(s * numel)`` for a
  uniform sparsity ``s``); the chosen mask has exactly ``Z`` pruned positions;
- "per row" comparison spreads ``Z`` as evenly as possible over the output rows: every row gets
  ``Z // rows`` zeros, and the ``Z % rows`` rows whose next-smallest score is lowest get one more
  (so for ``s * in_features`` integral every row has exactly ``s * in_features`` zeros);
- N:M: exactly ``M - N`` zeros in every group of ``M`` consecutive inputs of every row.
"""

from __future__ import annotations

import torch

from .._distributed import full_tensor, write_full_
from .masks import linear_view, restore_mask


def unstructured_zero_count(sparsity: float, numel: int) -> int:
    """The exact number of zeros a layer of ``numel`` weights gets at ``sparsity``."""
    return int(round(sparsity * numel))


def rowwise_keep_mask(scores: torch.Tensor, n_zeros: int) -> torch.Tensor:
    """Prune ``n_zeros`` positions in total, as evenly as possible across rows (see module doc)."""
    rows, cols = scores.shape
    if not 0 <= n_zeros <= rows * cols:
        raise ValueError(f"cannot prune {n_zeros} of {rows * cols} weights")
    per_row, extra = divmod(n_zeros, rows)
    order = torch.argsort(scores, dim=1, stable=True)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, order[:, :per_row], False)
    if extra:
        # The extra zeros go where they cost least: the rows whose next candidate scores lowest.
        next_idx = order[:, per_row]
        next_score = scores.gather(1, next_idx.unsqueeze(1)).squeeze(1)
        rows_with_extra = torch.argsort(next_score, stable=True)[:extra]
        keep[rows_with_extra, next_idx[rows_with_extra]] = False
    return keep


def layerwise_keep_mask(scores: torch.Tensor, n_zeros: int) -> torch.Tensor:
    """Prune the ``n_zeros`` lowest scores of the whole layer."""
    flat = scores.reshape(-1)
    if not 0 <= n_zeros <= flat.numel():
        raise ValueError(f"cannot prune {n_zeros} of {flat.numel()} weights")
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:n_zeros]] = False
    return keep.reshape(scores.shape)


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive inputs of every row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M with M={m} does not divide {cols} inputs")
    groups = scores.reshape(rows, cols // m, m)
    order = torch.argsort(groups, dim=-1, stable=True)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., : m - n], False)
    return keep.reshape(rows, cols)


@torch.no_grad()
def write_masked_weight_(linear: torch.nn.Module, keep: torch.Tensor, new_weight: torch.Tensor | None = None) -> int:
    """Store ``new_weight`` (default: the current weight) with the pruned positions set to ``+0.0``.

    ``keep`` and ``new_weight`` are out x in, as the pruners score (``linear_view``); they are
    written through the out x in view, so a ``Conv1D`` keeps its in x out storage.

    A *kept* weight that is exactly zero in the model's dtype (already zero before pruning, a
    SparseGPT update that lands on 0, or underflow when casting down) would add an unpromised zero.
    It is replaced by the smallest normal number of the dtype, with its sign (``finfo.tiny``: about
    1e-38 in fp32/bf16, 6e-5 in fp16), far below anything that changes an output, so the layer's
    zero count, and ``weight != 0``, are exactly the chosen mask. Returns how many were replaced.
    Under FSDP (a sharded ``DTensor`` weight) ``keep`` and ``new_weight`` are whole on every rank
    and each rank writes the rows it holds.
    """
    weight = linear_view(linear).weight
    source = (full_tensor(weight) if new_weight is None else new_weight).detach()
    value = source.to(weight.dtype)
    n_kept_zero = int((keep & (value == 0)).sum().item())
    write_full_(weight.data, restore_mask(value, keep, sign_source=source))
    return n_kept_zero
