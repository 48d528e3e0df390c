"""The public sparse ops and the one place that chooses how they run: a Triton kernel, or its PyTorch twin.

Each op's Triton kernel is ``sparse_peft.kernels.<op>``; its PyTorch twin, ``<op>_reference`` with the
same arguments, is ``sparse_peft.functional.<op>`` (and importable from here). Which one runs:

1. ``backend="torch"`` or ``backend="triton"`` on the call, else
2. the ``SPARSE_PEFT_BACKEND`` environment variable (``torch``, ``triton`` or ``auto``), else
3. ``auto``: Triton when the inputs are CUDA tensors, the twin otherwise.

No other module makes that choice: the layers call the ops here, and a caller that must know which
one runs asks ``runs_torch_twin``.

Triton on CPU tensors runs in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set before
triton is first imported (``import sparse_peft`` already imports it, through torch._dynamo; the
tests set it in ``conftest.py``); otherwise it is a clear ``RuntimeError``. The kernel modules are imported lazily, so importing this module never
needs Triton or a GPU.
"""

from __future__ import annotations

import importlib
import os

import torch

from .functional.bitmask_linear import bitmask_linear_reference
from .functional.masked_linear import masked_linear_reference
from .functional.sddmm import CSRPattern, csr_pattern, position_dtype, positions_by_row_block, sddmm_reference
from .functional.semi_structured import semi_structured_linear_reference
from .functional.spp_linear import spp_delta_reference, spp_linear_reference
from .kernels.semi_structured import semi_structured_unsupported_reason, to_semi_structured
from .sparsity.bitmask import PackedBitmask, pack_bitmask, unpack_bitmask

BACKENDS = ("torch", "triton")
ENV_VAR = "SPARSE_PEFT_BACKEND"

__all__ = [
    "BACKENDS", "CSRPattern", "PackedBitmask", "bitmask_linear", "bitmask_linear_reference", "csr_pattern",
    "masked_linear", "masked_linear_reference", "pack_bitmask", "position_dtype", "positions_by_row_block",
    "resolve_backend",
    "runs_torch_twin", "sddmm",
    "sddmm_reference", "semi_structured_linear", "semi_structured_linear_reference",
    "semi_structured_unsupported_reason", "spp_delta", "spp_delta_reference", "spp_linear", "spp_linear_reference",
    "to_semi_structured", "unpack_bitmask",
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


def runs_torch_twin(device: torch.device) -> bool:
    """Whether an op called without ``backend`` on inputs on ``device`` runs its PyTorch twin (a caller
    may then keep what the twin would rebuild per call, as ``BitmaskLinear``'s decode cache does)."""
    return resolve_backend(None, device) == "torch"


def _kernel(name: str):
    """``sparse_peft.kernels.<name>``, imported on first use (Triton is only needed here)."""
    try:
        return importlib.import_module(f"{__package__}.kernels.{name}")
    except ImportError as error:
        raise RuntimeError(f"backend='triton' needs the triton package, which failed to import: {error}") from error


# --- SPP --------------------------------------------------------------------------------------------


def spp_linear(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, b: torch.Tensor, alpha: float,
               bias: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """SPP's layer ``y = x (W ⊙ (1 + α R(A) ⊙ b))ᵀ + bias`` with gradients for x, A, b and bias.

    ``x`` (..., in) in ``weight``'s dtype; ``weight`` (out, in), frozen; ``A`` (r, in); ``b`` (out, 1);
    ``R(A)[i] = A[i * r // out]``. The Triton kernel never forms the effective weight or any out x in
    tensor, forward or backward.
    """
    if resolve_backend(backend, x.device) == "triton":
        return _kernel("spp_linear").spp_linear(x, weight, A, b, alpha, bias)
    return spp_linear_reference(x, weight, A, b, alpha, bias)


def spp_delta(x: torch.Tensor, weight, A: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """SPP's update alone, ``α · x (R(A) ⊙ b ⊙ W)ᵀ``, for a layer whose base runs itself (dropout,
    hooks, a quantized base: ``weight`` may be a function returning the dequantized weight). Its
    PyTorch twin on every device: the kernel fuses the base GEMM into the same pass, so the update
    alone has none."""
    return spp_delta_reference(x, weight, A, b, alpha)


# --- SDDMM ------------------------------------------------------------------------------------------


def sddmm(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, *, csr: CSRPattern | None = None,
          backend: str | None = None) -> torch.Tensor:
    """Sampled ``grad_outᵀ x``: ``grad_out`` (tokens, out), ``x`` (tokens, in), ``indices`` int64 flat
    indices into (out, in) (values in their order) or a bool (out, in) mask (row-major order).

    The gradient of a weight that exists only at those positions (SEFT's delta, ``masked_linear``).
    Values are fp32 (float64 for float64 inputs): they feed optimizer state. The kernel accumulates
    them in fp32; the PyTorch twin computes bf16/fp16 inputs a block of rows at a time in their own
    dtype. ``csr`` (``csr_pattern(indices, (out, in))``) saves the twin rebuilding it per call when
    the caller keeps it, and saves the kernel sorting the indices (it takes ``csr.order``). Given
    ``csr``, the indices' range is not checked again (``csr_pattern`` checked it; the check reads the
    device, which on a GPU waits for all queued work).
    """
    if resolve_backend(backend, grad_out.device) == "triton":
        return _kernel("sddmm").sddmm(grad_out, x, indices, check_range=csr is None,
                                      order=csr.order if csr is not None else None)
    return sddmm_reference(grad_out, x, indices, csr)


# --- masked linear ----------------------------------------------------------------------------------


def masked_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None,
                  *, backend: str | None = None) -> torch.Tensor:
    """``x (W ⊙ M)ᵀ + bias`` for a trainable weight; its gradient is computed only at the mask (by
    ``sddmm``) and returned in the weight's shape, exactly zero off the mask."""
    if resolve_backend(backend, x.device) == "triton":
        return _kernel("masked_linear").masked_linear(x, weight, mask, bias)
    return masked_linear_reference(x, weight, mask, bias)


# --- bitmask-packed weights -------------------------------------------------------------------------


def bitmask_linear(x: torch.Tensor, packed: PackedBitmask, bias: torch.Tensor | None = None,
                   *, backend: str | None = None) -> torch.Tensor:
    """``x Wᵀ + bias`` for a weight packed by ``pack_bitmask``; Triton decodes it on the fly for up to
    16 tokens, reading only its bits and nonzero values (more tokens: unpacked once, dense GEMM).
    Gradients flow to ``x`` and ``bias``, never to the packed weight."""
    if resolve_backend(backend, x.device) == "triton":
        return _kernel("bitmask_linear").bitmask_linear(x, packed, bias)
    return bitmask_linear_reference(x, packed, bias)


# --- 2:4 --------------------------------------------------------------------------------------------


def semi_structured_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                           *, backend: str | None = None) -> torch.Tensor:
    """``x Wᵀ + bias`` with ``weight`` from ``to_semi_structured`` (PyTorch's 2:4 sparse GEMM where
    it was supported and measured faster, the dense weight otherwise). Not a Triton kernel: the
    ``triton`` backend means "the accelerated path", ``torch`` forces the dense reference."""
    if resolve_backend(backend, x.device) == "triton":
        from .kernels.semi_structured import semi_structured_linear as accelerated

        return accelerated(x, weight, bias)
    return semi_structured_linear_reference(x, weight, bias)
