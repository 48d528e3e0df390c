"""Put a pruned model's kept weights on the 4-bit grid bitsandbytes will store them on.

Loading a pruned checkpoint with ``BitsAndBytesConfig(load_in_4bit=True)`` rounds every weight to
the nearest of 16 values of its block of 64 inputs (a code book scaled by the block's largest
magnitude). That rounding is blind to the data and costs a pruned model more than a dense one: a
block holds half or fewer of its weights, and those are the large ones, so each rounding error
weighs more and nothing absorbs it (SmolLM2-135M at Wanda 50%: validation perplexity 60.6 in fp32,
74.0 after plain NF4).

``fit_to_4bit`` rounds on the calibration data instead, as GPTQ (Frantar et al. 2022) does, with the
mask held fixed (as SparseGPT does for pruning): for each linear, with ``H = X Xᵀ`` of its inputs,
the columns are swept left to right; each column's kept weights are rounded to the grid, pruned
ones to 0, and the output error that leaves is pushed onto the not-yet-visited columns through the
Cholesky factor of ``H^-1``. Each row's block of 64 gets its scale when the sweep reaches it: its
largest kept magnitude, clipped by the factor whose rounding error (weighted by the inputs' second
moments) is lowest. The weight that set it is rounded to exactly ±scale, so bitsandbytes finds the
same scale again and every other weight lands on a code: the load reproduces the fitted weights bit
for bit (with plain statistics; nested ones, ``bnb_4bit_use_double_quant=True``, round the scales
themselves). Pruned weights stay exactly 0; a kept weight may round to 0, as in a plain load (where
a kept weight on an input with large activations is small, forcing it to the smallest nonzero code
costs more than dropping it), and is then counted as pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._validation import is_int
from .calibration import block_linears, find_decoder_blocks, run_blockwise
from .masks import linear_view
from .quantized import refuse_quantized
from .selection import write_masked_weight_
from .sparsegpt import HessianStat, _inverse_hessian_factor

#: bitsandbytes' 4-bit code books (bitsandbytes.functional.get_4bit_type), as fp32 values.
CODE_BOOKS = {
    "nf4": (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0),
    "fp4": (-1.0, -0.6666666865348816, -0.5, -0.3333333432674408, -0.25, -0.1666666716337204,
            -0.0052083334885537624, 0.0, 0.0052083334885537624, 0.1666666716337204, 0.25,
            0.3333333432674408, 0.5, 0.6666666865348816, 1.0),
}


#: The clipping factors tried for each row's block scale (``_block_scale``).
CLIP_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


@dataclass(frozen=True)
class Fit4bitReport:
    """What ``fit_to_4bit`` did, per layer: ``relative_error[name]``, the output error on the
    calibration inputs, ``||(W_fit - W) X||² / ||W X||²`` against the pruned float weight;
    ``rounded_to_zero[name]``, how many kept weights the grid rounded to 0 (pruned from then on)."""

    quant_type: str
    blocksize: int
    relative_error: dict[str, float]
    rounded_to_zero: dict[str, int]

    def __str__(self) -> str:
        worst = max(self.relative_error.items(), key=lambda item: item[1], default=("-", 0.0))
        return (f"{len(self.relative_error)} layers fitted to {self.quant_type} (blocks of {self.blocksize}); "
                f"largest relative output error {worst[1]:.2e} ({worst[0]}); "
                f"{sum(self.rounded_to_zero.values())} kept weights rounded to 0")


class _NearestCode:
    """Round values (in units of their block's scale) to the nearest code."""

    def __init__(self, quant_type: str, device):
        codes = torch.tensor(CODE_BOOKS[quant_type], dtype=torch.float32, device=device)
        self.codes = codes  # ascending
        self.midpoints = (codes[1:] + codes[:-1]) / 2

    def __call__(self, scaled: torch.Tensor) -> torch.Tensor:
        return self.codes[torch.bucketize(scaled.clamp(-1.0, 1.0), self.midpoints)]


def _block_scale(w_block, keep_block, hessian_diag, nearest, storage_dtype) -> torch.Tensor:
    """Each row's scale for this block of columns: its largest kept magnitude times the clipping
    factor in ``CLIP_FACTORS`` whose round-to-nearest error, weighted by the inputs' second moments
    (``diag H``), is lowest. Clipping the few largest weights buys a finer grid for the rest; it is
    chosen per row because a pruned block keeps few weights and their spread varies. The scale is
    rounded to the storage dtype: it is what bitsandbytes will read back as the block's largest."""
    largest = (w_block.abs() * keep_block).amax(1)
    best_scale, best_error = largest, None
    for factor in CLIP_FACTORS:
        scale = (largest * factor).to(storage_dtype).float()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
        rounded = (nearest(w_block / safe) * safe).masked_fill(~keep_block, 0.0)
        error = ((w_block - rounded).square() * hessian_diag).sum(1)
        if best_error is None:
            best_scale, best_error = scale, error
        else:
            better = error < best_error
            best_scale, best_error = torch.where(better, scale, best_scale), torch.where(better, error, best_error)
    return best_scale


@torch.no_grad()
def fit_weight_to_4bit(weight: torch.Tensor, stat: HessianStat, quant_type: str = "nf4", blocksize: int = 64,
                       percdamp: float = 0.01, storage_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The fitted out x in weight of one linear: fp32 values exactly representable in
    ``storage_dtype``, 0 wherever ``weight`` is 0 (and where a kept weight rounded to 0).
    ``weight.shape[1]`` must be a multiple of ``blocksize``."""
    cols = weight.shape[1]
    keep = weight != 0
    hessian = stat.hessian().to(weight.device)
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0  # an input never seen: its weights round to the nearest code, uncompensated
    hessian_diag = hessian.diagonal().float()
    upper = _inverse_hessian_factor(hessian, percdamp).float()
    nearest = _NearestCode(quant_type, weight.device)
    w = weight.detach().float().clone(memory_format=torch.contiguous_format)

    for start in range(0, cols, blocksize):
        end = start + blocksize
        w_block, keep_block = w[:, start:end].clone(), keep[:, start:end]
        u_block = upper[start:end, start:end]
        kept_magnitude = w_block.abs() * keep_block
        scale = _block_scale(w_block, keep_block, hessian_diag[start:end], nearest, storage_dtype)
        anchor = kept_magnitude.argmax(1)  # this weight becomes exactly ±scale
        safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        err_block = torch.zeros_like(w_block)
        for i in range(end - start):
            column = w_block[:, i]
            codes = nearest(column / safe_scale)
            codes = torch.where(anchor == i, torch.where(column < 0, -1.0, 1.0), codes)
            rounded = (codes * scale).to(storage_dtype).float().masked_fill(~keep_block[:, i], 0.0)
            err = (column - rounded) / u_block[i, i]
            w_block[:, i:] -= err.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            w_block[:, i] = rounded
            err_block[:, i] = err
        w[:, start:end] = w_block
        w[:, end:] -= err_block @ upper[start:end, end:]
    return w


def _relative_error(weight: torch.Tensor, fitted: torch.Tensor, stat: HessianStat) -> float:
    hessian = stat.hessian().float().to(weight.device)
    diff = fitted - weight.float()
    num = (diff @ hessian * diff).sum()
    den = (weight.float() @ hessian * weight.float()).sum().clamp_min(1e-30)
    return float(num / den)


def fit_to_4bit(model: nn.Module, calibration, quant_type: str = "nf4", blocksize: int = 64,
                percdamp: float = 0.01, show_progress: bool = True) -> Fit4bitReport:
    """Round every prunable linear's kept weights (in place) onto the bitsandbytes 4-bit grid of
    ``quant_type`` (``"nf4"`` or ``"fp4"``) with blocks of ``blocksize``, compensating each
    rounding on the calibration data; see the module docstring.

    Use it between pruning and saving, then load the checkpoint with
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type)`` (whose blocks are
    bitsandbytes' default 64) or quantize it in memory with the same settings. The weights stay in
    the model's dtype, holding only grid values. ``calibration``: the batches the pruners take.
    Decoder blocks are fitted one at a time, each on the outputs of the blocks already fitted.
    """
    if quant_type not in CODE_BOOKS:
        raise ValueError(f"fit_to_4bit: quant_type={quant_type!r} is not one of {sorted(CODE_BOOKS)}")
    if not is_int(blocksize) or blocksize < 1:
        raise ValueError(f"fit_to_4bit: blocksize must be a positive integer, got {blocksize!r}")
    refuse_quantized(model, "sp.fit_to_4bit")
    for name, linear in (item for group in block_linears(*find_decoder_blocks(model)) for item in group):
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"fit_to_4bit: layer {name!r} is a {type(linear).__name__}; bitsandbytes quantizes "
                             "torch.nn.Linear weights (out x in) only")
        if linear.in_features % blocksize:
            raise ValueError(f"fit_to_4bit: layer {name!r} has in_features={linear.in_features}, not a multiple of "
                             f"blocksize={blocksize}: its 4-bit blocks would span two rows")
    errors: dict[str, float] = {}
    rounded_to_zero: dict[str, int] = {}

    def fit_block(index, stats):
        for name, (linear, stat) in stats.items():
            weight = linear_view(linear).weight
            fitted = fit_weight_to_4bit(weight, stat, quant_type, blocksize, percdamp, storage_dtype=weight.dtype)
            errors[name] = _relative_error(weight, fitted, stat)
            rounded_to_zero[name] = int(((weight != 0) & (fitted == 0)).sum())
            write_masked_weight_(linear, fitted != 0, fitted)

    run_blockwise(model, calibration, lambda linear: HessianStat(linear.in_features, device=linear.weight.device),
                  fit_block, desc=f"fitting to {quant_type}", show_progress=show_progress)
    return Fit4bitReport(quant_type, blocksize, errors, rounded_to_zero)
