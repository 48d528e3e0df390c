"""Magnitude pruning: drop the weights with the smallest |W| (no calibration data needed)."""

from __future__ import annotations

import torch

from .selection import layerwise_keep_mask, nm_keep_mask, rowwise_keep_mask

MAGNITUDE_SCOPES = ("row", "layer")


def magnitude_keep_mask(weight: torch.Tensor, n_zeros: int | None = None, nm: tuple[int, int] | None = None,
                        scope: str = "row") -> torch.Tensor:
    """Keep mask from |W|: ``n_zeros`` in total (compared per output row or over the whole layer),
    or N:M when ``nm=(n, m)`` is given."""
    scores = weight.detach().abs().float()
    if nm is not None:
        return nm_keep_mask(scores, *nm)
    if scope == "row":
        return rowwise_keep_mask(scores, n_zeros)
    if scope == "layer":
        return layerwise_keep_mask(scores, n_zeros)
    raise ValueError(f"magnitude_scope must be one of {MAGNITUDE_SCOPES}, got {scope!r}")
