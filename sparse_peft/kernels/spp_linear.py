"""Fused SPP linear: ``y = x (W ⊙ (1 + α R(A) ⊙ b))ᵀ + bias`` without an out x in tensor.

``R(A)[i] = A[i * r // out]``: out/r consecutive output rows share one row of ``A``. The effective
weight is rebuilt tile by tile in registers from ``W``, ``A`` and ``b``:

* forward and ``dX = dY W_eff`` share one matmul kernel (``_spp_matmul_kernel``); the dX pass reads
  ``W`` transposed through its strides;
* ``dA`` and ``db`` are reductions of the sampled product ``S = α (dYᵀ X) ⊙ W``: each program
  forms one (out x in) tile of ``dYᵀ X`` with ``tl.dot`` over the tokens, samples it with ``W`` and
  reduces it straight into ``db`` (over columns) and ``dA`` (over the rows of each group) with fp32
  atomics, so ``S`` never leaves registers.

``W`` is frozen: no gradient is produced for it. The PyTorch twin is
``sparse_peft.functional.spp_linear``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_spp_linear
from ._common import autotune_configs, check_runnable, compute_dtype, dot_precision, grouped_tile

_MATMUL_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_M": 128, "BLOCK_P": 128, "BLOCK_Q": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
        triton.Config({"BLOCK_M": 64, "BLOCK_P": 128, "BLOCK_Q": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_P": 64, "BLOCK_Q": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_P": 64, "BLOCK_Q": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        # few tokens (decode): a short M tile, wide P. Each stage buffers a tile of A as large as the
        # weight's, so these stay at 3 stages (4 stages of 16x128x128 exceed even an H100's shared
        # memory; tests/tools/compile_kernels.py), and the last one fits an A100 in fp32 too.
        triton.Config({"BLOCK_M": 16, "BLOCK_P": 128, "BLOCK_Q": 128, "GROUP_M": 1}, num_stages=3, num_warps=4),
        triton.Config({"BLOCK_M": 16, "BLOCK_P": 64, "BLOCK_Q": 128, "GROUP_M": 1}, num_stages=3, num_warps=4),
        triton.Config({"BLOCK_M": 16, "BLOCK_P": 64, "BLOCK_Q": 64, "GROUP_M": 1}, num_stages=3, num_warps=4),
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_P": 32, "BLOCK_Q": 32, "GROUP_M": 2}),
)

_GRAD_ADAPTER_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_M": 64}, num_stages=3, num_warps=8),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_M": 64}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_M": 64}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_M": 32}, num_stages=4, num_warps=4),
    ],
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_M": 16}),
)


@triton.autotune(configs=_MATMUL_CONFIGS, key=["M", "P", "Q"])
@triton.jit
def _spp_matmul_kernel(
    in_ptr, weight_ptr, A_ptr, b_ptr, bias_ptr, out_ptr,
    M, P, Q, out_features, r, alpha,
    stride_in_m, stride_in_q, stride_w_p, stride_w_q, stride_a_row, stride_a_col, stride_out_m, stride_out_p,
    DOT_PRECISION: tl.constexpr, ROWS_ALONG_P: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, P] = in[M, Q] · W_eff(p, q)ᵀ. Forward: p = output row, q = input column
    (ROWS_ALONG_P). dX pass: p = input column, q = output row (W read transposed)."""
    pid_m, pid_p = grouped_tile(M, P, BLOCK_M, BLOCK_P, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q0 = tl.arange(0, BLOCK_Q)
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        offs_q = q0 + offs_q0
        inp = tl.load(in_ptr + offs_m[:, None] * stride_in_m + offs_q[None, :] * stride_in_q,
                      mask=(offs_m[:, None] < M) & (offs_q[None, :] < Q), other=0.0)
        tile_mask = (offs_p[:, None] < P) & (offs_q[None, :] < Q)
        weight = tl.load(weight_ptr + offs_p[:, None] * stride_w_p + offs_q[None, :] * stride_w_q,
                         mask=tile_mask, other=0.0)
        # The SPP scale 1 + α A[group(row), col] b[row], with `row` the output-row axis of the tile.
        if ROWS_ALONG_P:
            rows = offs_p[:, None]
            cols = offs_q[None, :]
        else:
            rows = offs_q[None, :]
            cols = offs_p[:, None]
        groups = rows * r // out_features
        a = tl.load(A_ptr + groups * stride_a_row + cols * stride_a_col, mask=tile_mask, other=0.0)
        b = tl.load(b_ptr + rows, mask=rows < out_features, other=0.0)
        scale = 1.0 + alpha * a.to(tl.float32) * b.to(tl.float32)
        effective = (weight.to(tl.float32) * scale).to(inp.dtype)
        acc += tl.dot(inp, tl.trans(effective), input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=offs_p < P, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_out_m + offs_p[None, :] * stride_out_p,
             acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_p[None, :] < P))


@triton.autotune(configs=_GRAD_ADAPTER_CONFIGS, key=["M", "N", "K"], reset_to_zero=["grad_A_ptr", "grad_b_ptr"])
@triton.jit
def _spp_grad_adapter_kernel(
    grad_out_ptr, x_ptr, weight_ptr, A_ptr, b_ptr, grad_A_ptr, grad_b_ptr,
    M, N, K, r, alpha,
    stride_go_m, stride_go_n, stride_x_m, stride_x_k, stride_w_n, stride_w_k, stride_a_row, stride_a_col,
    stride_ga_row, stride_ga_col,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One (BLOCK_N x BLOCK_K) tile of S = α (dYᵀ X) ⊙ W, reduced into db and dA (fp32 atomics)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_in, k_in = offs_n < N, offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_in = offs_m < M
        grad_out_t = tl.load(grad_out_ptr + offs_n[:, None] * stride_go_n + offs_m[None, :] * stride_go_m,
                             mask=n_in[:, None] & m_in[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_x_m + offs_k[None, :] * stride_x_k,
                    mask=m_in[:, None] & k_in[None, :], other=0.0)
        acc += tl.dot(grad_out_t, x, input_precision=DOT_PRECISION)
    tile_in = n_in[:, None] & k_in[None, :]
    weight = tl.load(weight_ptr + offs_n[:, None] * stride_w_n + offs_k[None, :] * stride_w_k, mask=tile_in, other=0.0)
    sampled = acc * weight.to(tl.float32) * alpha  # zero off the support of W and outside the layer
    groups = offs_n * r // N
    a = tl.load(A_ptr + groups[:, None] * stride_a_row + offs_k[None, :] * stride_a_col, mask=tile_in, other=0.0)
    tl.atomic_add(grad_b_ptr + offs_n, tl.sum(sampled * a.to(tl.float32), axis=1), mask=n_in)
    b = tl.load(b_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)
    weighted = sampled * b[:, None]
    # The tile's rows fall in a contiguous run of groups (usually one or two): one row-sum each.
    first_group = (pid_n * BLOCK_N) * r // N
    last_group = (tl.minimum(pid_n * BLOCK_N + BLOCK_N, N) - 1) * r // N
    for group in range(first_group, last_group + 1):
        part = tl.sum(tl.where((groups == group)[:, None], weighted, 0.0), axis=0)
        tl.atomic_add(grad_A_ptr + group * stride_ga_row + offs_k * stride_ga_col, part, mask=k_in)


def _matmul(inp, weight, A, b, alpha, bias, rows_along_p: bool):
    """``inp @ W_effᵀ`` (forward, rows_along_p) or ``inp @ W_eff`` (dX pass), in ``inp``'s dtype."""
    dtype = compute_dtype(inp.dtype)
    inp, weight = inp.to(dtype), weight.to(dtype)
    bias = bias.to(dtype).contiguous() if bias is not None else None
    b = b.contiguous()  # the kernel indexes b and bias with unit stride
    # A is re-read for every weight tile: in the weight's dtype it costs what W costs, not twice.
    # Its rounding is far below that of the effective weight, which is rounded to `dtype` anyway.
    A = A.to(dtype)
    out_features, in_features = weight.shape
    M = inp.shape[0]
    if rows_along_p:
        P, Q, stride_w_p, stride_w_q = out_features, in_features, weight.stride(0), weight.stride(1)
    else:
        P, Q, stride_w_p, stride_w_q = in_features, out_features, weight.stride(1), weight.stride(0)
    out = torch.empty(M, P, dtype=dtype, device=inp.device)
    if M == 0:
        return out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(P, meta["BLOCK_P"]),)
    _spp_matmul_kernel[grid](
        inp, weight, A, b, bias if bias is not None else out, out,
        M, P, Q, out_features, A.shape[0], float(alpha),
        inp.stride(0), inp.stride(1), stride_w_p, stride_w_q, A.stride(0), A.stride(1), out.stride(0), out.stride(1),
        DOT_PRECISION=dot_precision(dtype), ROWS_ALONG_P=rows_along_p, HAS_BIAS=bias is not None,
    )
    return out


def _grad_adapter(grad_out, x, weight, A, b, alpha):
    """(dA, db) in fp32 from the fused sampled product; no out x in tensor is allocated."""
    dtype = compute_dtype(x.dtype)
    grad_out, x, weight = grad_out.to(dtype), x.to(dtype), weight.to(dtype)
    b = b.contiguous()  # indexed with unit stride
    M, (N, K) = x.shape[0], weight.shape
    grad_A = torch.zeros(A.shape, dtype=torch.float32, device=A.device)
    grad_b = torch.zeros(N, dtype=torch.float32, device=b.device)
    if M == 0:
        return grad_A, grad_b.unsqueeze(1)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"]))
    _spp_grad_adapter_kernel[grid](
        grad_out, x, weight, A, b, grad_A, grad_b,
        M, N, K, A.shape[0], float(alpha),
        grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        A.stride(0), A.stride(1), grad_A.stride(0), grad_A.stride(1), DOT_PRECISION=dot_precision(dtype),
    )
    return grad_A, grad_b.unsqueeze(1)


class _SPPLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, A, b, alpha, bias):
        x_2d = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x_2d, weight, A, b)
        ctx.alpha, ctx.x_shape = alpha, x.shape
        out = _matmul(x_2d, weight, A, b, alpha, bias, rows_along_p=True)
        return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x_2d, weight, A, b = ctx.saved_tensors
        need_x, _, need_A, need_b, _, need_bias = ctx.needs_input_grad
        grad_out_2d = grad_out.reshape(-1, weight.shape[0]).to(x_2d.dtype)
        grad_x = grad_A = grad_b = grad_bias = None
        if need_x:
            grad_x = _matmul(grad_out_2d, weight, A, b, ctx.alpha, None, rows_along_p=False)
            grad_x = grad_x.to(x_2d.dtype).reshape(ctx.x_shape)
        if need_A or need_b:
            grad_A, grad_b = _grad_adapter(grad_out_2d, x_2d, weight, A, b, ctx.alpha)
            grad_A = grad_A.to(A.dtype) if need_A else None
            grad_b = grad_b.to(b.dtype) if need_b else None
        if need_bias:
            grad_bias = grad_out_2d.sum(0, dtype=torch.float32).to(grad_out.dtype)
        return grad_x, None, grad_A, grad_b, None, grad_bias


def spp_linear(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, b: torch.Tensor, alpha: float,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton ``x (W ⊙ (1 + α R(A) ⊙ b))ᵀ + bias`` with gradients for ``x``, ``A``, ``b`` and ``bias``.

    ``x``: (..., in) in the weight's dtype; ``weight``: (out, in), frozen; ``A``: (r, in) and
    ``b``: (out, 1), any float dtype (usually fp32; the scale is formed in fp32); ``bias``: (out,).
    """
    check_spp_linear(x, weight, A, b, bias)
    check_runnable("spp_linear", x, weight, A, b, bias)
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("spp_linear keeps the base weight frozen, but weight.requires_grad is True "
                         "(freeze it, or detach it, before calling)")
    return _SPPLinear.apply(x, weight, A, b, float(alpha), bias)
