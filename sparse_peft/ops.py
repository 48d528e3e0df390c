"""The public sparse ops and their dispatch: Triton kernels on CUDA, PyTorch references elsewhere.

Every op has a reference twin here (``<op>_reference``) with the same signature; the Triton kernel
lives in ``sparse_peft.kernels.<op>``. Which one runs:

1. ``backend="torch"`` or ``backend="triton"`` on the call, else
2. the ``SPARSE_PEFT_BACKEND`` environment variable (``torch``, ``triton`` or ``auto``), else
3. ``auto``: Triton when the inputs are CUDA tensors, the reference otherwise.

Triton on CPU tensors runs in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set before
triton is first imported (``import sparse_peft`` already imports it, through torch._dynamo; the
tests set it in ``conftest.py``); otherwise it is a clear ``RuntimeError``. The kernel modules are imported lazily, so importing this module never
needs Triton or a GPU.
"""

from __future__ import annotations

import importlib
import os

import torch
import torch.nn.functional as F

from .delta_linear import RowScaleUpdate, delta_linear
from .kernels._checks import check_bitmask_linear, check_masked_linear, check_sddmm, check_spp_linear
from .kernels.semi_structured import semi_structured_unsupported_reason, to_semi_structured
from .sparsity.bitmask import PackedBitmask, pack_bitmask, unpack_bitmask

BACKENDS = ("torch", "triton")
ENV_VAR = "SPARSE_PEFT_BACKEND"

__all__ = [
    "BACKENDS", "PackedBitmask", "bitmask_linear", "bitmask_linear_reference", "masked_linear",
    "masked_linear_reference", "pack_bitmask", "resolve_backend", "sddmm", "sddmm_reference",
    "semi_structured_linear", "semi_structured_linear_reference", "semi_structured_unsupported_reason",
    "spp_linear", "spp_linear_reference", "to_semi_structured", "unpack_bitmask",
]


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """``"torch"`` or ``"triton"`` for inputs on ``device`` (see the module docstring for the order)."""
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if choice not in BACKENDS:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source} must be 'torch', 'triton' or 'auto', got {choice!r}")
    return choice


def _kernel(name: str):
    """``sparse_peft.kernels.<name>``, imported on first use (Triton is only needed here)."""
    try:
        return importlib.import_module(f"{__package__}.kernels.{name}")
    except ImportError as error:
        raise RuntimeError(f"backend='triton' needs the triton package, which failed to import: {error}") from error


# --- SPP --------------------------------------------------------------------------------------------


def spp_linear_reference(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, b: torch.Tensor, alpha: float,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (W + α R(A) ⊙ b ⊙ W)ᵀ + bias`` through ``delta_linear`` (one GEMM per block of rows of the
    effective weight, nothing of the weight's size kept for the backward)."""
    check_spp_linear(x, weight, A, b, bias)
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("spp_linear keeps the base weight frozen, but weight.requires_grad is True "
                         "(freeze it, or detach it, before calling)")
    return delta_linear(x, weight, bias, RowScaleUpdate(A, b, alpha))


def spp_linear(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, b: torch.Tensor, alpha: float,
               bias: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """SPP's layer ``y = x (W ⊙ (1 + α R(A) ⊙ b))ᵀ + bias`` with gradients for x, A, b and bias.

    ``x`` (..., in) in ``weight``'s dtype; ``weight`` (out, in), frozen; ``A`` (r, in); ``b`` (out, 1);
    ``R(A)`` repeats A's rows as ``sparse_peft.tuners.spp.functional.row_groups``. The Triton kernel
    never forms the effective weight or any out x in tensor, forward or backward.
    """
    if resolve_backend(backend, x.device) == "triton":
        return _kernel("spp_linear").spp_linear(x, weight, A, b, alpha, bias)
    return spp_linear_reference(x, weight, A, b, alpha, bias)


# --- SDDMM ------------------------------------------------------------------------------------------


def sddmm_reference(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``(grad_outᵀ x)`` at ``indices`` (int64 flat ``i * in + j``, any order) or a bool mask
    (row-major order of its True entries); the dense product is formed in fp32 (float64 for float64
    inputs) and is transient."""
    check_sddmm(grad_out, x, indices)
    dtype = torch.promote_types(torch.promote_types(grad_out.dtype, x.dtype), torch.float32)
    dense = grad_out.t().to(dtype).matmul(x.to(dtype))
    return dense[indices] if indices.dtype == torch.bool else dense.reshape(-1)[indices]


def sddmm(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Sampled ``grad_outᵀ x``: ``grad_out`` (tokens, out), ``x`` (tokens, in), ``indices`` int64 flat
    indices into (out, in) (values in their order) or a bool (out, in) mask (row-major order).

    The gradient of a weight that exists only at those positions (SEFT's delta, ``masked_linear``).
    Values are fp32 (float64 for float64 inputs): they feed optimizer state, so they are not rounded
    back to bf16.
    """
    if resolve_backend(backend, grad_out.device) == "triton":
        return _kernel("sddmm").sddmm(grad_out, x, indices)
    return sddmm_reference(grad_out, x, indices)


# --- masked linear ----------------------------------------------------------------------------------


def masked_linear_reference(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (W ⊙ M)ᵀ + bias``; autograd gives ``weight.grad = (dYᵀ X) ⊙ M``."""
    check_masked_linear(x, weight, mask, bias)
    return F.linear(x, weight * mask, bias)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None,
                  *, backend: str | None = None) -> torch.Tensor:
    """``x (W ⊙ M)ᵀ + bias`` for a trainable weight; its gradient is computed only at the mask (by
    ``sddmm``) and returned in the weight's shape, exactly zero off the mask."""
    if resolve_backend(backend, x.device) == "triton":
        return _kernel("masked_linear").masked_linear(x, weight, mask, bias)
    return masked_linear_reference(x, weight, mask, bias)


# --- bitmask-packed weights -------------------------------------------------------------------------


def bitmask_linear_reference(x: torch.Tensor, packed: PackedBitmask, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + bias`` with ``W = unpack_bitmask(packed)`` (dense, transient)."""
    check_bitmask_linear(x, packed, bias)
    return F.linear(x, unpack_bitmask(packed), bias)


def bitmask_linear(x: torch.Tensor, packed: PackedBitmask, bias: torch.Tensor | None = None,
                   *, backend: str | None = None) -> torch.Tensor:
    """``x Wᵀ + bias`` for a weight packed by ``pack_bitmask``; Triton decodes it on the fly for up to
    16 tokens, reading only its bits and nonzero values (more tokens: unpacked once, dense GEMM).
    Gradients flow to ``x`` and ``bias``, never to the packed weight."""
    if resolve_backend(backend, x.device) == "triton":
        return _kernel("bitmask_linear").bitmask_linear(x, packed, bias)
    return bitmask_linear_reference(x, packed, bias)


# --- 2:4 --------------------------------------------------------------------------------------------


def semi_structured_linear_reference(x: torch.Tensor, weight: torch.Tensor,
                                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``x Wᵀ + bias`` (``weight`` may be a ``SparseSemiStructuredTensor``: densified)."""
    sparse_type = getattr(torch.sparse, "SparseSemiStructuredTensor", ())
    dense = weight.to_dense() if isinstance(weight, sparse_type) else weight
    return F.linear(x, dense, bias)


def semi_structured_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                           *, backend: str | None = None) -> torch.Tensor:
    """``x Wᵀ + bias`` with ``weight`` from ``to_semi_structured`` (PyTorch's 2:4 sparse GEMM where
    it was supported and measured faster, the dense weight otherwise). Not a Triton kernel: the
    ``triton`` backend means "the accelerated path", ``torch`` forces the dense reference."""
    if resolve_backend(backend, x.device) == "triton":
        from .kernels.semi_structured import semi_structured_linear as accelerated

        return accelerated(x, weight, bias)
    return semi_structured_linear_reference(x, weight, bias)
