"""PyTorch twin of ``kernels/bitmask_linear.py``: ``x Wᵀ + bias`` for a weight packed by ``pack_bitmask``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels._checks import check_bitmask_linear
from ..sparsity.bitmask import PackedBitmask, unpack_bitmask


def bitmask_linear_reference(x: torch.Tensor, packed: PackedBitmask, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + bias`` with ``W = unpack_bitmask(packed)`` (dense, transient)."""
    check_bitmask_linear(x, packed, bias)
    return F.linear(x, unpack_bitmask(packed), bias)
