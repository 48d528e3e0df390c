"""Masked linear with a trainable weight: ``y = x (W ⊙ M)ᵀ + bias``.

Forward and ``dX = dY (W ⊙ M)`` share one matmul kernel that applies the mask to each weight tile
as it is loaded (the dX pass reads ``W`` and ``M`` transposed through their strides), so
``W ⊙ M`` is never written out. The weight gradient ``(dYᵀ X) ⊙ M`` is computed only at the mask by
``sddmm`` and scattered into a tensor of ``W``'s shape that is exactly zero off the mask (autograd
needs a gradient of the parameter's shape; nothing off the mask is ever computed).
The PyTorch twin is ``sparse_peft.functional.masked_linear``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_masked_linear
from ._common import autotune_configs, check_runnable, compute_dtype, dot_precision, grouped_tile
from .sddmm import _sddmm_mask

_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_M": 128, "BLOCK_P": 128, "BLOCK_Q": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
        triton.Config({"BLOCK_M": 64, "BLOCK_P": 128, "BLOCK_Q": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_P": 64, "BLOCK_Q": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_M": 16, "BLOCK_P": 128, "BLOCK_Q": 128, "GROUP_M": 1}, num_stages=4, num_warps=4),
        # fp32 tiles are twice the size: on an A100 (164 KiB of shared memory) none of the above fits
        # in fp32 (tests/tools/compile_kernels.py), and with no config left the call would fail.
        triton.Config({"BLOCK_M": 64, "BLOCK_P": 64, "BLOCK_Q": 32, "GROUP_M": 8}, num_stages=3, num_warps=4),
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_P": 32, "BLOCK_Q": 32, "GROUP_M": 2}),
)


@triton.autotune(configs=_CONFIGS, key=["M", "P", "Q"])
@triton.jit
def _masked_matmul_kernel(
    in_ptr, weight_ptr, mask_ptr, bias_ptr, out_ptr,
    M, P, Q,
    stride_in_m, stride_in_q, stride_w_p, stride_w_q, stride_mask_p, stride_mask_q, stride_out_m, stride_out_p,
    DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, P] = in[M, Q] · (W ⊙ M)(p, q)ᵀ; the caller orients (p, q) through the strides."""
    pid_m, pid_p = grouped_tile(M, P, BLOCK_M, BLOCK_P, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q0 = tl.arange(0, BLOCK_Q)
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        offs_q = q0 + offs_q0
        inp = tl.load(in_ptr + offs_m[:, None] * stride_in_m + offs_q[None, :] * stride_in_q,
                      mask=(offs_m[:, None] < M) & (offs_q[None, :] < Q), other=0.0)
        tile_in = (offs_p[:, None] < P) & (offs_q[None, :] < Q)
        weight = tl.load(weight_ptr + offs_p[:, None] * stride_w_p + offs_q[None, :] * stride_w_q,
                         mask=tile_in, other=0.0)
        keep = tl.load(mask_ptr + offs_p[:, None] * stride_mask_p + offs_q[None, :] * stride_mask_q,
                       mask=tile_in, other=0)
        acc += tl.dot(inp, tl.trans(tl.where(keep != 0, weight, 0.0).to(inp.dtype)), input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=offs_p < P, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_out_m + offs_p[None, :] * stride_out_p,
             acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_p[None, :] < P))


def _matmul(inp, weight, mask_u8, bias, transposed: bool):
    """``inp @ (W ⊙ M)ᵀ`` (forward) or ``inp @ (W ⊙ M)`` (``transposed``: the dX pass)."""
    dtype = compute_dtype(inp.dtype)
    inp, weight = inp.to(dtype), weight.to(dtype)
    bias = bias.to(dtype).contiguous() if bias is not None else None  # indexed with unit stride
    (P, Q), (sw_p, sw_q), (sm_p, sm_q) = weight.shape, weight.stride(), mask_u8.stride()
    if transposed:
        P, Q, sw_p, sw_q, sm_p, sm_q = Q, P, sw_q, sw_p, sm_q, sm_p
    M = inp.shape[0]
    out = torch.empty(M, P, dtype=dtype, device=inp.device)
    if M == 0:
        return out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(P, meta["BLOCK_P"]),)
    _masked_matmul_kernel[grid](
        inp, weight, mask_u8, bias if bias is not None else out, out, M, P, Q,
        inp.stride(0), inp.stride(1), sw_p, sw_q, sm_p, sm_q, out.stride(0), out.stride(1),
        DOT_PRECISION=dot_precision(dtype), HAS_BIAS=bias is not None,
    )
    return out


class _MaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, mask, bias):
        x_2d = x.reshape(-1, x.shape[-1])
        mask_u8 = mask.contiguous().view(torch.uint8)
        ctx.save_for_backward(x_2d, weight, mask)
        ctx.x_shape = x.shape
        out = _matmul(x_2d, weight, mask_u8, bias, transposed=False)
        return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x_2d, weight, mask = ctx.saved_tensors
        need_x, need_weight, _, need_bias = ctx.needs_input_grad
        grad_out_2d = grad_out.reshape(-1, weight.shape[0]).to(x_2d.dtype)
        grad_x = grad_weight = grad_bias = None
        if need_x:
            mask_u8 = mask.contiguous().view(torch.uint8)
            grad_x = _matmul(grad_out_2d, weight, mask_u8, None, transposed=True).to(x_2d.dtype).reshape(ctx.x_shape)
        if need_weight:
            values = _sddmm_mask(grad_out_2d, x_2d, mask)
            grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
            grad_weight.masked_scatter_(mask, values.to(weight.dtype))
        if need_bias:
            grad_bias = grad_out_2d.sum(0, dtype=torch.float32).to(grad_out.dtype)
        return grad_x, grad_weight, None, grad_bias


def masked_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton ``x (W ⊙ M)ᵀ + bias``; ``weight.grad`` is ``(dYᵀ X) ⊙ M``, computed only at the mask.

    ``x``: (..., in) in the weight's dtype; ``weight``: (out, in); ``mask``: bool (out, in);
    ``bias``: (out,) or None.
    """
    check_masked_linear(x, weight, mask, bias)
    check_runnable("masked_linear", x, weight, mask, bias)
    return _MaskedLinear.apply(x, weight, mask, bias)
