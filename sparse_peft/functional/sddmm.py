"""PyTorch twin of ``kernels/sddmm.py``: ``(grad_outᵀ x)`` only at a set of (out, in) positions.

The gradient of a weight that exists only at those positions (SEFT's delta). No dense (out, in)
product is formed:

* fp32 / fp64: PyTorch's CSR ``sampled_addmm`` (on a CPU about a quarter of the dense GEMM's time at
  2% density), a chunk of tokens at a time (``token_chunk``). It takes the positions in compressed-row
  form (``csr_pattern``); a caller that keeps them between steps (SEFT's layout) passes them as
  ``csr``, else they are built per call.
* bf16 / fp16, which ``sampled_addmm`` does not take: where their GEMMs run on matrix units (GPU
  tensor cores, a CPU's AMX: ``weight_grad_dtype``), one GEMM per block of rows in the inputs' dtype,
  its product rounded to that dtype once, then a gather of the positions in the block, found as a
  slice of the compressed-row form. On a CPU without AMX the inputs are up-cast and go the fp32
  way: at 2% density that measured about 3.5x faster than the bf16 block GEMMs (2048 x 8192, 512
  tokens), which run there at about half the fp32 GEMM's speed.

Values are widened to fp32 (float64 for float64 inputs) and come back in the order of ``indices``.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch

from ..delta_linear import grad_operands, grad_weight_rows, pass_workspace, row_blocks, weight_grad_dtype
from ..kernels._checks import check_flat_range, check_sddmm


class CSRPattern(NamedTuple):
    """Flat positions in compressed-row form: ``crow`` (out + 1) offsets of each row's positions,
    ``col`` their columns in row-major order, ``order`` the permutation of the flat indices that
    sorts them so. All three in ``position_dtype`` (int32 for any layer of fewer than 2**31 weights)."""

    crow: torch.Tensor
    col: torch.Tensor
    order: torch.Tensor


def position_dtype(count: int) -> torch.dtype:
    """The integer dtype for indices below ``count``, as kept per position between steps: int32 when
    they fit (every layer of fewer than 2**31 weights, a 70B model's embedding of 1.05 G included),
    else int64. Four bytes a position instead of eight, where a SEFT layer keeps several such
    indices per trained weight."""
    return torch.int32 if count <= torch.iinfo(torch.int32).max else torch.int64


def csr_pattern(indices: torch.Tensor, shape: tuple[int, int]) -> CSRPattern:
    """``indices`` (int64 flat ``i * in + j``, any order, repeats allowed) of an (out, in) ``shape``;
    raises ``ValueError`` for an index outside it (so ``sddmm`` given this pattern need not check)."""
    sorted_index, order = torch.sort(indices)
    if indices.numel():
        check_flat_range("csr_pattern", *sorted_index[[0, -1]].tolist(), shape)
    dtype = position_dtype(max(shape[0] * shape[1], indices.numel()))
    counts = torch.bincount(sorted_index // shape[1], minlength=shape[0])
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(dtype)
    return CSRPattern(crow, (sorted_index % shape[1]).to(dtype), order.to(dtype))


def sddmm_reference(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor,
                    csr: Optional[CSRPattern] = None) -> torch.Tensor:
    """``(grad_outᵀ x)`` at ``indices`` (int64 flat ``i * in + j``, any order) or a bool mask (row-major
    order of its True entries); ``csr`` is ``csr_pattern(indices, (out, in))`` when the caller has it."""
    out_features, in_features = check_sddmm(grad_out, x, indices, check_range=csr is None)
    if indices.dtype == torch.bool:
        indices = indices.reshape(-1).nonzero().squeeze(-1)
    dtype = weight_grad_dtype(torch.promote_types(grad_out.dtype, x.dtype), x.device)
    grad_out, x = grad_out.to(dtype), x.to(dtype)
    wide = torch.promote_types(dtype, torch.float32)
    values = torch.empty(indices.numel(), dtype=wide, device=x.device)
    if dtype in (torch.float32, torch.float64):
        crow, col, order = csr if csr is not None else csr_pattern(indices, (out_features, in_features))
        with warnings.catch_warnings():  # "CSR support is in beta": this use is tested, once per step is noise
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            pattern = torch.sparse_csr_tensor(crow, col, torch.ones(indices.numel(), dtype=dtype, device=x.device),
                                              (out_features, in_features), check_invariants=False)
        # A chunk of tokens at a time, so that the chunk of x every position reads stays in cache
        # (token_chunk); grad_outᵀ transposed here: given the strided view, sampled_addmm copies it
        # more slowly itself.
        chunk = token_chunk(in_features, dtype)
        sampled = torch.zeros(indices.numel(), dtype=dtype, device=x.device)  # no tokens: zeros
        for start in range(0, x.shape[0], chunk):
            sampled += torch.sparse.sampled_addmm(pattern, grad_out[start:start + chunk].t().contiguous(),
                                                  x[start:start + chunk], beta=0.0).values()
        values[order] = sampled
        return values
    csr = csr if csr is not None else csr_pattern(indices, (out_features, in_features))
    grad_t, x = grad_operands(grad_out, x)
    with pass_workspace(x.device) as workspace:  # each block's product written into one reused buffer
        for start, stop, targets, offsets in positions_by_row_block(indices, csr, out_features, in_features):
            if targets.numel():
                dense = grad_weight_rows(grad_t, x, start, stop, workspace)  # in the inputs' dtype
                values.index_put_((targets,), dense.view(-1).index_select(0, offsets).to(wide))
    return values


#: Bytes of ``x`` one ``sampled_addmm`` call reads (a chunk of its tokens): every position reads a
#: row of that chunk, in no order, so the chunk has to stay in cache. On a 2048 x 8192 layer at 2%
#: density, 512 tokens, one CPU thread, chunks of 128 tokens (4 MiB) took about half the time of the
#: whole ``x`` (16 MiB); an ``x`` of 4 MiB or less is taken whole, which measured fastest.
SAMPLED_CHUNK_BYTES = 4 << 20


def token_chunk(in_features: int, dtype: torch.dtype) -> int:
    """Tokens per ``sampled_addmm`` call: ``SAMPLED_CHUNK_BYTES`` of ``x``, at least 64 (shorter dot
    products cost more in per-position overhead than the cache saves)."""
    return max(64, SAMPLED_CHUNK_BYTES // max(1, in_features * dtype.itemsize))


def positions_by_row_block(indices: torch.Tensor, csr: CSRPattern, out_features: int, in_features: int):
    """For each of ``row_blocks(out_features, in_features)``: ``(start, stop, targets, offsets)``, where
    ``targets`` are the places in ``indices`` of the positions inside rows ``start:stop`` and ``offsets``
    their flat offsets in that block. Read from ``csr`` (``csr_pattern(indices, ...)``) as slices, so a
    block costs its own positions only, not a comparison over all of them."""
    sorted_index = indices.index_select(0, csr.order)
    row_offsets = csr.crow.tolist()
    for start, stop in row_blocks(out_features, in_features, device=indices.device):
        low, high = row_offsets[start], row_offsets[stop]
        yield start, stop, csr.order[low:high], sorted_index[low:high] - start * in_features
