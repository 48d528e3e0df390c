"""OWL (Yin et al. 2024): outlier-weighted layer-wise sparsity.

Blocks with more activation outliers matter more, so they are pruned less. With Wanda scores
``A_ij = |W_ij| * ||X_j||`` of the *dense* model, pooled over all linears of block ``l``:

    D_l = #{A_ij > M * mean(A)} / #A                      (outlier ratio, M = owl_threshold)
    D̄   = Σ_l P_l D_l / Σ_l P_l                           (P_l: prunable weights of block l)
    c_l = (D_l - D̄) / max_k |D_k - D̄|                    (in [-1, 1]; all 0 if every D_l is equal)
    s_l = s - λ c_l                                       (λ = owl_lambda, within [s - λ, s + λ])

Centring on the parameter-weighted mean makes ``Σ_l P_l s_l = s Σ_l P_l``: the global sparsity is
the target. OWL's paper rescales ``D`` to ``[0, 2λ]`` and centres on the unweighted mean; for
blocks of equal size this gives the same ordering and global sparsity, and ours also keeps every
block inside ``[s - λ, s + λ]``. ``λ`` is capped at ``min(λ, s, 1 - s)`` so no ratio leaves [0, 1).

Integer counts: the global target is ``Z = round(s * Σ P_l)`` zeros. Every layer's real-valued
share ``s_l * numel`` is floored and the remaining zeros go to the largest fractional parts
(largest-remainder rounding), so the per-layer counts add up to ``Z`` exactly.
"""

from __future__ import annotations

import math

import torch


def outlier_ratio(scores: list[torch.Tensor], threshold: float) -> float:
    """Fraction of the pooled scores above ``threshold`` times their mean."""
    pooled = torch.cat([s.reshape(-1).float() for s in scores])
    mean = pooled.mean(dtype=torch.float64)
    return float((pooled.double() > threshold * mean).sum().item()) / pooled.numel()


def owl_block_sparsities(outlier_ratios: list[float], block_numels: list[int], sparsity: float,
                         owl_lambda: float) -> list[float]:
    """``s_l`` per block (see module doc)."""
    ratios = torch.tensor(outlier_ratios, dtype=torch.float64)
    weights = torch.tensor(block_numels, dtype=torch.float64)
    centred = ratios - (ratios * weights).sum() / weights.sum()
    spread = centred.abs().max()
    if spread <= 0:
        return [float(sparsity)] * len(outlier_ratios)
    lam = min(owl_lambda, sparsity, 1.0 - sparsity)
    return (sparsity - lam * centred / spread).clamp(0.0, 1.0).tolist()


def allocate_zero_counts(layer_sparsities: list[float], layer_numels: list[int], total_zeros: int) -> list[int]:
    """Integer zeros per layer, close to ``s_i * numel_i`` and summing to ``total_zeros`` exactly."""
    shares = [s * n for s, n in zip(layer_sparsities, layer_numels)]
    counts = [min(math.floor(x), n) for x, n in zip(shares, layer_numels)]
    remaining = total_zeros - sum(counts)
    # Largest remainder first; ties to the earlier layer. Skip layers that are already full.
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - math.floor(shares[i])), i))
    while remaining > 0:
        progressed = False
        for i in order:
            if remaining == 0:
                break
            if counts[i] < layer_numels[i] - 1:
                counts[i] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"cannot place {total_zeros} zeros in layers of {sum(layer_numels)} weights")
    while remaining < 0:  # only if rounding overshot: take back from the smallest remainders
        for i in reversed(order):
            if remaining == 0:
                break
            if counts[i] > 0:
                counts[i] -= 1
                remaining += 1
    return counts
