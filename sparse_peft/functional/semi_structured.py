"""PyTorch twin of ``kernels/semi_structured.py``: the dense ``x Wᵀ + bias`` for a 2:4 weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def semi_structured_linear_reference(x: torch.Tensor, weight: torch.Tensor,
                                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``x Wᵀ + bias`` (``weight`` may be a ``SparseSemiStructuredTensor``: densified)."""
    sparse_type = getattr(torch.sparse, "SparseSemiStructuredTensor", ())
    dense = weight.to_dense() if isinstance(weight, sparse_type) else weight
    return F.linear(x, dense, bias)
