"""PyTorch twin of ``kernels/sddmm.py``: ``(grad_outᵀ x)`` only at a set of (out, in) positions."""

from __future__ import annotations

import torch

from ..kernels._checks import check_sddmm


def sddmm_reference(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``(grad_outᵀ x)`` at ``indices`` (int64 flat ``i * in + j``, any order) or a bool mask
    (row-major order of its True entries); the dense product is formed in fp32 (float64 for float64
    inputs) and is transient."""
    check_sddmm(grad_out, x, indices)
    dtype = torch.promote_types(torch.promote_types(grad_out.dtype, x.dtype), torch.float32)
    dense = grad_out.t().to(dtype).matmul(x.to(dtype))
    return dense[indices] if indices.dtype == torch.bool else dense.reshape(-1)[indices]
