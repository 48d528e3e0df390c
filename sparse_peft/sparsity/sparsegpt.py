"""SparseGPT (Frantar & Alistarh 2023): one-shot OBS pruning with compensating weight updates.

For a linear with inputs ``X`` (in x tokens), the layer-wise loss ``||W X - W' X||^2`` has Hessian
``H = X Xᵀ``. Sweeping the columns left to right, pruning weight ``w_ij`` costs
``w_ij^2 / [H^-1]_jj^2`` (the OBS saliency with the Cholesky factor of ``H^-1``), and the error it
leaves is pushed onto the not-yet-visited columns of the same row through row ``j`` of that factor.
The mask is chosen one column block at a time (so it already sees the updates of earlier blocks);
N:M masks are chosen per group of M columns inside the sweep.
"""

from __future__ import annotations

import torch

from .selection import lowest_in_order, nm_keep_mask

_DAMP_RETRIES = 6  # damping x10 each time the Cholesky factorisation fails


class HessianStat:
    """Running ``sum over tokens of x xᵀ``: each batch's product in fp32 (fast), the running sum in
    fp64 (long calibration runs add many batches of similar size)."""

    def __init__(self, in_features: int, device=None):
        self.xxt = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.xxt += (x.T @ x).double()
        self.n_tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.xxt / max(self.n_tokens, 1)


def _inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)^-1`` with ``λ = percdamp * mean(diag H)``."""
    diag_mean = hessian.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp = percdamp
    for _ in range(_DAMP_RETRIES):
        factor, info = torch.linalg.cholesky_ex(hessian + damp * diag_mean * eye)
        if info == 0:
            # H^-1 = L^-T L^-1 via a triangular solve: several times faster on CPU than
            # torch.cholesky_inverse, which dominated the whole layer's time at in=1536.
            factor_inv = torch.linalg.solve_triangular(factor, eye, upper=False)
            inverse = factor_inv.T @ factor_inv
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
        damp *= 10  # nearly singular H (few tokens, collinear inputs): damp harder
    raise RuntimeError(f"SparseGPT: H + damping is not positive definite even with percdamp={damp / 10}")


def _block_zero_counts(n_zeros: int, n_cols: int, blocksize: int) -> list[int]:
    """Split the layer's ``n_zeros`` over column blocks in proportion to their width, rounding
    the cumulative count so the parts add up to ``n_zeros`` exactly."""
    bounds = list(range(0, n_cols, blocksize)) + [n_cols]
    cumulative = [int(round(n_zeros * c / n_cols)) for c in bounds]
    return [b - a for a, b in zip(cumulative[:-1], cumulative[1:])]


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, stat: HessianStat, n_zeros: int | None = None,
                    nm: tuple[int, int] | None = None, blocksize: int = 128, percdamp: float = 0.01):
    """Return ``(keep_mask, new_weight_fp32)`` for one linear's weight (out x in).

    Unstructured: exactly ``n_zeros`` pruned, split over column blocks by ``_block_zero_counts``
    and chosen within each block by the lowest saliency over all its rows and columns.
    N:M (``nm=(n, m)``): in every group of m columns, each row drops its m - n lowest saliencies.
    Dead inputs (zero diagonal in H, e.g. never-active features) are pruned first: removing them
    costs nothing on the calibration data. Their weight is left as is where kept.
    """
    rows, cols = weight.shape
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"SparseGPT blocksize={blocksize} must be a multiple of M={nm[1]}")
    hessian = stat.hessian().to(weight.device)
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0  # decouples the dead column; its saliency is forced to 0 below
    upper = _inverse_hessian_factor(hessian, percdamp).float()
    dead = dead.to(weight.device)

    # A contiguous copy: ``weight`` may be a transposed view (Conv1D), and the sweep reads columns.
    w = weight.detach().float().clone(memory_format=torch.contiguous_format)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    block_zeros = _block_zero_counts(n_zeros, cols, blocksize) if nm is None else None

    for block_index, start in enumerate(range(0, cols, blocksize)):
        end = min(start + blocksize, cols)
        w_block = w[:, start:end].clone()
        u_block = upper[start:end, start:end]
        u_diag = u_block.diagonal()
        dead_block = dead[start:end]
        err_block = torch.zeros_like(w_block)
        prune_block = torch.zeros_like(w_block, dtype=torch.bool)
        if nm is None and block_zeros[block_index]:
            saliency = (w_block.square() / u_diag.square()).masked_fill(dead_block, 0.0)
            prune_block = lowest_in_order(saliency, block_zeros[block_index])

        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                saliency = (w_block[:, group].square() / u_diag[group].square()).masked_fill(dead_block[group], 0.0)
                prune_block[:, group] = ~nm_keep_mask(saliency, *nm)
            column = w_block[:, i]
            pruned_column = column.masked_fill(prune_block[:, i], 0.0)
            err = (column - pruned_column) / u_diag[i]
            # OBS update of the rest of the block (column i itself becomes pruned_column).
            w_block[:, i:] -= err.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            w_block[:, i] = pruned_column
            err_block[:, i] = err

        w[:, start:end] = w_block
        keep[:, start:end] = ~prune_block
        # Lazy batch update of the columns to the right of this block.
        w[:, end:] -= err_block @ upper[start:end, end:]
    return keep, w
