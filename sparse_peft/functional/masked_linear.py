"""PyTorch twin of ``kernels/masked_linear.py``: ``x (W ⊙ M)ᵀ + bias`` for a trainable weight ``W``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels._checks import check_masked_linear


def masked_linear_reference(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (W ⊙ M)ᵀ + bias``; autograd gives ``weight.grad = (dYᵀ X) ⊙ M``."""
    check_masked_linear(x, weight, mask, bias)
    return F.linear(x, weight * mask, bias)
