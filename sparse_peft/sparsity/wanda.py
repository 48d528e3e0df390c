"""Wanda (Sun et al. 2023): prune by ``|W_ij| * ||X_j||_2``, compared within each output row.

``||X_j||_2`` is the norm of input feature ``j`` over every calibration token; one accumulator per
linear sums ``x_j**2`` while the block runs (see calibration.py).
"""

from __future__ import annotations

import torch

from .selection import nm_keep_mask, rowwise_keep_mask


class InputNormStat:
    """Running ``sum over tokens of x_j**2`` for each input feature ``j`` (fp64, so a long
    calibration run does not lose the small features to rounding)."""

    def __init__(self, in_features: int, device=None):
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum_sq += x.square().sum(dim=0).double()
        self.n_tokens += x.shape[0]

    def all_reduce_(self) -> "InputNormStat":
        """Sum the statistics over data-parallel ranks (each saw its own tokens), so Wanda scores,
        and the masks made from them, are the same on every rank."""
        from .._distributed import all_reduce_sum_, world_size

        if world_size() > 1:
            all_reduce_sum_(self.sum_sq)
            self.n_tokens = int(all_reduce_sum_(torch.tensor([self.n_tokens], dtype=torch.float64,
                                                             device=self.sum_sq.device)).item())
        return self

    def rms(self) -> torch.Tensor:
        """``||X_j||_2 / sqrt(n_tokens)``: the same per-row ordering as the plain norm, and
        comparable across layers that saw the same tokens (OWL compares scores within a block)."""
        return (self.sum_sq / max(self.n_tokens, 1)).sqrt().float()


def wanda_scores(weight: torch.Tensor, stat: InputNormStat) -> torch.Tensor:
    return weight.detach().abs().float() * stat.rms().to(weight.device).unsqueeze(0)


def wanda_keep_mask(weight: torch.Tensor, stat: InputNormStat, n_zeros: int | None = None,
                    nm: tuple[int, int] | None = None) -> torch.Tensor:
    scores = wanda_scores(weight, stat)
    if nm is not None:
        return nm_keep_mask(scores, *nm)
    return rowwise_keep_mask(scores, n_zeros)
