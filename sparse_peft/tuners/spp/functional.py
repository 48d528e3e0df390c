"""SPP's delta path as plain functions and one autograd Function (the PyTorch reference).

Per target linear with weight ``W`` (out x in), SPP trains ``A`` (r x in) and ``b`` (out x 1):

    R(A)[i] = A[group(i)],   group(i) = floor(i * r / out)
    ΔW      = R(A) ⊙ b ⊙ W
    delta   = α · x ΔWᵀ

``ΔW`` is zero wherever ``W`` is, so the update can never leave the pruned topology.

The Function below never keeps a dense ``ΔW`` (or any out x in tensor) alive across the
forward/backward gap: it saves ``x`` and references to ``W``, ``A``, ``b`` (no copies), and
rebuilds what it needs inside the backward, one layer at a time. The dense ``dYᵀ X`` it forms there
is only ever read at the nonzeros of ``W`` (a sampled product, SDDMM), which is what a fused GPU
kernel will compute instead; such a kernel replaces ``spp_delta_reference`` with the same signature.
"""

from __future__ import annotations

import torch


def row_groups(out_features: int, r: int, device=None) -> torch.Tensor:
    """Which row of ``A`` each output row uses: ``floor(i * r / out_features)`` (int64, length out).

    Consecutive output rows share a row of ``A``; when ``r`` does not divide ``out_features`` the
    groups differ in size by at most one row (sizes ``floor(out/r)`` or ``ceil(out/r)``), and every
    row of ``A`` is used as long as ``r <= out_features``.
    """
    return torch.arange(out_features, device=device, dtype=torch.int64) * r // out_features


def expand_rows(A: torch.Tensor, out_features: int) -> torch.Tensor:
    """``R(A)``: ``A``'s rows repeated along the output dimension so it has ``out_features`` rows."""
    return A.index_select(0, row_groups(out_features, A.shape[0], A.device))


def spp_delta_weight(weight: torch.Tensor, A: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``α · R(A) ⊙ b ⊙ W`` as a dense tensor in ``A``'s dtype (for merging, inspection and tests).

    Exactly zero wherever ``W`` is zero.
    """
    dtype = torch.promote_types(weight.dtype, A.dtype)
    scale = expand_rows(A.to(dtype), weight.shape[0]) * (b.to(dtype) * alpha)
    return scale * weight.to(dtype)


def merge_factor(weight_shape: torch.Size, A: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``α · R(A) ⊙ b`` (out x in): the relative change SPP makes to every weight; merging multiplies
    ``W`` by ``1 + `` the sum of these over the merged adapters."""
    return expand_rows(A, weight_shape[0]) * (b * alpha)


def _compute_dtype(x: torch.Tensor, A: torch.Tensor) -> torch.dtype:
    # The adapter is kept in fp32 even on a bf16/fp16 base: do the small-tensor math in the wider of
    # the two dtypes so b's tiny early updates are not rounded away.
    return torch.promote_types(x.dtype, A.dtype)


def spp_delta_forward(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``α · x (R(A) ⊙ b ⊙ W)ᵀ`` in ``x``'s dtype; the dense ``ΔW`` is transient."""
    dtype = _compute_dtype(x, A)
    delta_weight = spp_delta_weight(weight, A.to(dtype), b.to(dtype), alpha)
    return torch.nn.functional.linear(x.to(dtype), delta_weight).to(x.dtype)


def spp_delta_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor,
                       b: torch.Tensor, alpha: float, needs_grad: tuple[bool, bool, bool, bool]):
    """Gradients of ``α · x (R(A) ⊙ b ⊙ W)ᵀ`` for (x, weight, A, b); ``None`` where not needed.

    With ``G = α · dYᵀ X`` (the gradient of the dense ``ΔW``) and ``S = G ⊙ W`` (G sampled at the
    nonzeros of W):
        dX = α · dY (R(A) ⊙ b ⊙ W)
        dA[g] = Σ_{i in group g} b_i · S[i]      db_i = Σ_j S[i, j] · R(A)[i, j]
        dW = G ⊙ R(A) ⊙ b                        (only if the base weight is trainable)
    Every out x in tensor here lives only inside this call.
    """
    need_x, need_weight, need_A, need_b = needs_grad
    dtype = _compute_dtype(x, A)
    out_features, in_features = weight.shape
    r = A.shape[0]
    groups = row_groups(out_features, r, A.device)
    A_c, b_c = A.to(dtype), b.to(dtype)
    rows_of_A = A_c.index_select(0, groups)  # R(A), out x in
    grad_out_2d = grad_out.reshape(-1, out_features).to(dtype)
    grad_x = grad_weight = grad_A = grad_b = None

    if need_weight or need_A or need_b:
        x_2d = x.reshape(-1, in_features).to(dtype)
        grad_delta = grad_out_2d.t().matmul(x_2d)  # dYᵀ X, out x in
        grad_delta.mul_(alpha)
        if need_weight:
            grad_weight = (grad_delta * rows_of_A * b_c).to(weight.dtype)
        if need_A or need_b:
            sampled = grad_delta.mul_(weight.to(dtype))  # in place: G is not needed any more
            if need_b:
                grad_b = (sampled * rows_of_A).sum(dim=1, keepdim=True).to(b.dtype)
            if need_A:
                sampled.mul_(b_c)
                grad_A = torch.zeros(r, in_features, dtype=dtype, device=A.device)
                grad_A.index_add_(0, groups, sampled)
                grad_A = grad_A.to(A.dtype)
        del grad_delta

    if need_x:
        delta_weight = rows_of_A.mul_(b_c * alpha).mul_(weight.to(dtype))  # reuse R(A)'s buffer for ΔW
        grad_x = grad_out_2d.matmul(delta_weight).reshape(x.shape).to(x.dtype)
    return grad_x, grad_weight, grad_A, grad_b


class SPPDelta(torch.autograd.Function):
    """Autograd wrapper of ``spp_delta_forward`` / ``spp_delta_backward``.

    Saves ``x`` (in its own dtype: no upcast copy is kept), and ``weight``, ``A``, ``b`` (references to
    existing tensors). Nothing of size out x in survives the forward.
    """

    @staticmethod
    def forward(ctx, x, weight, A, b, alpha):
        ctx.save_for_backward(x, weight, A, b)
        ctx.alpha = alpha
        return spp_delta_forward(x, weight, A, b, alpha)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, A, b = ctx.saved_tensors
        grads = spp_delta_backward(grad_out, x, weight, A, b, ctx.alpha, tuple(ctx.needs_input_grad[:4]))
        return (*grads, None)


def spp_delta_reference(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, b: torch.Tensor,
                        alpha: float) -> torch.Tensor:
    """SPP's delta path ``α · x (R(A) ⊙ b ⊙ W)ᵀ`` with the memory-lean custom backward.

    Args:
        x: input activations (..., in), any float dtype; the output has the same dtype.
        weight: the frozen pruned base weight (out x in).
        A: (r x in), ``r <= out``; ``b``: (out x 1). Usually fp32.
        alpha: scaling.
    """
    if weight.dim() != 2 or A.dim() != 2 or A.shape[1] != weight.shape[1] or tuple(b.shape) != (weight.shape[0], 1):
        raise ValueError(f"SPP shapes do not fit: weight {tuple(weight.shape)}, A {tuple(A.shape)}, "
                         f"b {tuple(b.shape)} (need A: r x in, b: out x 1)")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"SPP input has {x.shape[-1]} features, the weight expects {weight.shape[1]}")
    return SPPDelta.apply(x, weight, A, b, float(alpha))
