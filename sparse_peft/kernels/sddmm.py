"""Sampled dense-dense matmul: ``(grad_outᵀ x)`` only at a set of (out, in) positions.

This is the gradient of a weight that only exists at those positions (SEFT's sparse delta,
``masked_linear``'s weight). Each program computes one dense (BLOCK_N x BLOCK_K) tile of
``grad_outᵀ x`` with ``tl.dot`` over the tokens (tensor cores, like a dense GEMM) and writes only
the sampled entries, straight to their slot in the output vector:

    slot(i, j) = chunk_offsets[i, j // 32] + (sampled positions in row i from column 32·(j // 32) to j-1)

``chunk_offsets`` (out x ceil(in/32), int64) is the row-major count of sampled positions before each
32-column chunk; the in-tile part is a ``tl.cumsum`` over the tile's mask. So values come out in
the mask's row-major order with no dense (out x in) result and no sort inside the kernel.

The host wrapper takes a bool mask, or int64 flat indices ``i * in + j`` in any order (duplicates
allowed). Indices are sorted (or put in order by the permutation the caller keeps, ``order``),
marked in a transient bool mask, computed in its row-major order and put back in theirs. Nothing
in that reads a value back to the host: each such read waits for all queued work on the GPU, once
per layer and backward. The values are written to as many slots as there are indices (repeated
ones fill fewer; the unused tail is never read), so the number of distinct positions need not be
known. The PyTorch twin is ``sparse_peft.functional.sddmm``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._checks import check_sddmm
from ._common import autotune_configs, check_runnable, compute_dtype, dot_precision

#: Columns per entry of ``chunk_offsets``; every BLOCK_K is a multiple of it.
OFFSET_CHUNK = 32

_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_M": 64}, num_stages=3, num_warps=8),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_M": 64}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_M": 64}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_M": 32}, num_stages=4, num_warps=4),
    ],
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_M": 16}),
)


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _sddmm_kernel(
    grad_out_ptr, x_ptr, mask_ptr, chunk_offsets_ptr, values_ptr,
    M, N, K,
    stride_go_m, stride_go_n, stride_x_m, stride_x_k, stride_mask_n, stride_mask_k, stride_off_n,
    DOT_PRECISION: tl.constexpr, OFFSET_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_in, k_in = offs_n < N, offs_k < K
    tile_in = n_in[:, None] & k_in[None, :]
    keep = tl.load(mask_ptr + offs_n[:, None] * stride_mask_n + offs_k[None, :] * stride_mask_k,
                   mask=tile_in, other=0).to(tl.int32)
    if tl.max(tl.max(keep, axis=1), axis=0) == 0:
        return  # nothing sampled in this tile: skip its GEMM
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_in = offs_m < M
        grad_out_t = tl.load(grad_out_ptr + offs_n[:, None] * stride_go_n + offs_m[None, :] * stride_go_m,
                             mask=n_in[:, None] & m_in[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_x_m + offs_k[None, :] * stride_x_k,
                    mask=m_in[:, None] & k_in[None, :], other=0.0)
        acc += tl.dot(grad_out_t, x, input_precision=DOT_PRECISION)
    row_base = tl.load(chunk_offsets_ptr + offs_n * stride_off_n + (pid_k * BLOCK_K) // OFFSET_CHUNK,
                       mask=n_in, other=0)
    slot = row_base[:, None] + (tl.cumsum(keep, axis=1) - keep)
    tl.store(values_ptr + slot, acc.to(values_ptr.dtype.element_ty), mask=keep != 0)


def chunk_offsets(mask: torch.Tensor) -> torch.Tensor:
    """int64 (out, ceil(in/32)): row-major count of True entries before each 32-column chunk."""
    out_features, in_features = mask.shape
    pad = (-in_features) % OFFSET_CHUNK
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad))
    counts = padded.view(out_features, -1, OFFSET_CHUNK).sum(-1, dtype=torch.int64).reshape(-1)
    exclusive = torch.cumsum(counts, 0) - counts
    return exclusive.view(out_features, -1)


def _sddmm_mask(grad_out, x, mask, nnz=None):
    """fp32 values of ``grad_outᵀ x`` in the mask's row-major order."""
    dtype = compute_dtype(torch.promote_types(grad_out.dtype, x.dtype))
    grad_out, x = grad_out.to(dtype), x.to(dtype)
    offsets = chunk_offsets(mask)
    if nnz is None:
        nnz = int(mask.sum())
    values = torch.empty(nnz, dtype=torch.float32, device=grad_out.device)
    (M, N), K = grad_out.shape, x.shape[1]
    if nnz == 0:
        return values
    if M == 0:
        return values.zero_()
    mask_u8 = mask.view(torch.uint8) if mask.is_contiguous() else mask.contiguous().view(torch.uint8)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"]))
    _sddmm_kernel[grid](
        grad_out, x, mask_u8, offsets, values, M, N, K,
        grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), mask_u8.stride(0), mask_u8.stride(1),
        offsets.stride(0), DOT_PRECISION=dot_precision(dtype), OFFSET_CHUNK=OFFSET_CHUNK,
    )
    return values


def sddmm(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, check_range: bool = True,
          order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 values of ``grad_outᵀ x`` (out x in) at ``indices``.

    ``grad_out``: (tokens, out); ``x``: (tokens, in); ``indices``: int64 flat indices ``i * in + j``
    (values come back in their order), or a bool (out, in) mask (values in row-major order of its
    True entries, like ``dense[mask]``). Accumulates in fp32; mixed input dtypes promote.
    ``check_range=False``: the indices were checked already (``check_sddmm``). ``order``: the
    permutation that sorts ``indices`` (``csr_pattern``'s, int32 or int64), saving the sort.
    """
    out_features, in_features = check_sddmm(grad_out, x, indices, check_range)
    check_runnable("sddmm", grad_out, x, indices)
    if indices.dtype == torch.bool:
        return _sddmm_mask(grad_out, x, indices)
    if order is None:
        sorted_index, order = torch.sort(indices)
    else:
        sorted_index = indices.index_select(0, order)
    # slot of each sorted index among the distinct positions: repeats share the first one's
    is_first = torch.ones_like(sorted_index, dtype=torch.bool)
    torch.ne(sorted_index[1:], sorted_index[:-1], out=is_first[1:])
    slot = torch.cumsum(is_first, 0) - 1
    mask = torch.zeros(out_features * in_features, dtype=torch.bool, device=indices.device)
    mask[sorted_index] = True
    distinct_values = _sddmm_mask(grad_out, x, mask.view(out_features, in_features), nnz=indices.numel())
    return torch.empty_like(distinct_values).index_copy_(0, order.long(), distinct_values.index_select(0, slot))
