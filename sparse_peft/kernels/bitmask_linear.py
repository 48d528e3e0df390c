"""Decode-time linear on a bitmask-packed weight (``sparse_peft.sparsity.bitmask.PackedBitmask``).

For 1-16 tokens a linear layer is memory bound: the time is the bytes of the weight. The packed
form stores the nonzero ``values`` (row-major) and one bit per position, so at sparsity ``s`` in bf16
it reads ``2 (1 - s) + 1/8`` bytes per position instead of 2. The kernel reads only ``bits``,
``values``, the row starts ``row_offsets`` and ``x``:

* one program per BLOCK_N output rows walks the row across ``in`` in BLOCK_K columns;
* each tile's bits are expanded in registers; a value's slot is its row start, plus the row's
  running popcount over the tiles already done, plus the exclusive ``tl.cumsum`` of the tile's bits;
* the decoded (BLOCK_N x BLOCK_K) tile goes into ``tl.dot`` with the (padded to 16) token tile.

More than 16 tokens is compute bound, where a sparse format does not pay: the host wrapper decodes
the weight once (``unpack_bitmask``) and calls the dense GEMM. The PyTorch twin is
``sparse_peft.functional.bitmask_linear``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_peft.sparsity.bitmask import PackedBitmask, unpack_bitmask

from ._checks import check_bitmask_linear
from ._common import autotune_configs, check_runnable, compute_dtype, dot_precision

#: Largest token count the decode kernel serves (its token tile is 16 rows: tl.dot's minimum).
DECODE_MAX_TOKENS = 16

_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 256}, num_stages=3, num_warps=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_stages=3, num_warps=4),
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 512}, num_stages=3, num_warps=8),
    ],
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}),
)


@triton.autotune(configs=_CONFIGS, key=["N", "K"])
@triton.jit
def _bitmask_decode_kernel(
    x_ptr, bits_ptr, values_ptr, row_offsets_ptr, bias_ptr, out_ptr,
    T, N, K, n_bytes,
    stride_x_t, stride_x_k, stride_bits_n, stride_out_t, stride_out_n,
    DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    n_in = offs_n < N
    # Where the next value of each row sits in `values` (advanced by each tile's popcount).
    next_slot = tl.load(row_offsets_ptr + offs_n, mask=n_in, other=0)
    bit_of_byte = tl.arange(0, 8)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_byte = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        packed = tl.load(bits_ptr + offs_n[:, None] * stride_bits_n + offs_byte[None, :],
                         mask=n_in[:, None] & (offs_byte[None, :] < n_bytes), other=0).to(tl.int32)
        # Little-endian bits: column k0 + 8c + j is bit j of byte c. Padding bits are 0 by format.
        keep = tl.reshape((packed[:, :, None] >> bit_of_byte[None, None, :]) & 1, (BLOCK_N, BLOCK_K))
        slot = next_slot[:, None] + (tl.cumsum(keep, axis=1) - keep)
        weight = tl.load(values_ptr + slot, mask=keep != 0, other=0.0)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_t[:, None] * stride_x_t + offs_k[None, :] * stride_x_k,
                    mask=(offs_t[:, None] < T) & (offs_k[None, :] < K), other=0.0)
        acc += tl.dot(x, tl.trans(weight.to(x.dtype)), input_precision=DOT_PRECISION)
        next_slot += tl.sum(keep, axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_t[:, None] * stride_out_t + offs_n[None, :] * stride_out_n,
             acc.to(out_ptr.dtype.element_ty), mask=(offs_t[:, None] < T) & n_in[None, :])


def _decode(x_2d, packed: PackedBitmask, bias):
    dtype = compute_dtype(x_2d.dtype)
    x_2d, values = x_2d.to(dtype), packed.values.to(dtype).contiguous()
    bias = bias.to(dtype).contiguous() if bias is not None else None  # indexed with unit stride
    bits = packed.bits if packed.bits.stride(1) == 1 else packed.bits.contiguous()
    N, K = packed.shape
    T = x_2d.shape[0]
    out = torch.empty(T, N, dtype=dtype, device=x_2d.device)
    if T == 0 or N == 0:
        return out
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
    _bitmask_decode_kernel[grid](
        x_2d, bits, values, packed.row_offsets, bias if bias is not None else out, out,
        T, N, K, bits.shape[1], x_2d.stride(0), x_2d.stride(1), bits.stride(0), out.stride(0), out.stride(1),
        DOT_PRECISION=dot_precision(dtype), HAS_BIAS=bias is not None, BLOCK_T=DECODE_MAX_TOKENS,
    )
    return out


class _BitmaskLinear(torch.autograd.Function):
    """Gradient for ``x`` (and ``bias``) only: the packed weight is a frozen inference format."""

    @staticmethod
    def forward(ctx, x, bias, packed):
        ctx.packed, ctx.x_shape = packed, x.shape
        x_2d = x.reshape(-1, x.shape[-1])
        if x_2d.shape[0] <= DECODE_MAX_TOKENS:
            out = _decode(x_2d, packed, bias)
        else:
            out = torch.nn.functional.linear(x_2d, unpack_bitmask(packed), bias)
        return out.to(x.dtype).reshape(*x.shape[:-1], packed.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        grad_out_2d = grad_out.reshape(-1, ctx.packed.shape[0])
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out_2d.matmul(unpack_bitmask(ctx.packed).to(grad_out.dtype)).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out_2d.sum(0, dtype=torch.float32).to(grad_out.dtype)
        return grad_x, grad_bias, None


def bitmask_linear(x: torch.Tensor, packed: PackedBitmask, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + bias`` with ``W`` given packed; the Triton decode kernel for up to 16 tokens."""
    check_bitmask_linear(x, packed, bias)
    check_runnable("bitmask_linear", x, packed.values, packed.bits, packed.row_offsets, bias)
    return _BitmaskLinear.apply(x, bias, packed)
