"""2:4 weights through PyTorch's semi-structured sparse path (cuSPARSELt / CUTLASS), not a Triton kernel.

``to_semi_structured(weight)`` returns a ``SparseSemiStructuredTensor`` only where it can pay off:
a CUDA device of compute capability >= 8.0, fp16/bf16, a weight that really is 2:4 along ``in``,
shapes PyTorch accepts, and a timing at ``probe_tokens`` that beats the dense GEMM. Everywhere else
it returns the dense weight unchanged, so ``semi_structured_linear`` (a plain ``F.linear``, which
PyTorch dispatches to the sparse GEMM for a semi-structured weight) is always correct.
Nothing here imports Triton; every CUDA-only call is guarded, so the CPU import never fails.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Token count at which ``to_semi_structured`` times sparse against dense (a prefill/training batch:
#: 2:4 GEMMs pay off when compute bound, not at decode).
DEFAULT_PROBE_TOKENS = 2048


def semi_structured_unsupported_reason(weight: torch.Tensor) -> str | None:
    """Why PyTorch's 2:4 path cannot take ``weight`` here, or ``None`` if it can."""
    if not weight.is_cuda:
        return f"weight is on {weight.device}, the 2:4 sparse GEMM needs CUDA"
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return f"compute capability {torch.cuda.get_device_capability(weight.device)} < (8, 0)"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {weight.dtype} (only float16/bfloat16 are used)"
    if weight.dim() != 2 or weight.shape[1] % 4:
        return f"shape {tuple(weight.shape)} is not (out, in) with in divisible by 4"
    groups = (weight.detach() != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    if bool((groups > 2).any()):
        return "the weight is not 2:4 sparse along its input dimension"
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError:  # pragma: no cover - very old torch
        return "this torch has no torch.sparse.to_sparse_semi_structured"
    return None


def _time_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def to_semi_structured(weight: torch.Tensor, probe_tokens: int = DEFAULT_PROBE_TOKENS,
                       measure: bool = True) -> torch.Tensor:
    """The weight as a ``SparseSemiStructuredTensor`` where that is supported and (if ``measure``)
    measured faster than dense at ``probe_tokens`` tokens; otherwise ``weight`` itself."""
    if semi_structured_unsupported_reason(weight) is not None:
        return weight
    from torch.sparse import to_sparse_semi_structured

    dense = weight.detach()
    try:
        sparse = to_sparse_semi_structured(dense)
        probe = torch.randn(probe_tokens, dense.shape[1], dtype=dense.dtype, device=dense.device)
        F.linear(probe, sparse)  # shapes the sparse GEMM rejects fail here, not in the model
    except (RuntimeError, ValueError, NotImplementedError):
        return weight
    if measure and _time_ms(lambda: F.linear(probe, sparse)) >= _time_ms(lambda: F.linear(probe, dense)):
        return weight
    return sparse


def semi_structured_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + bias`` where ``weight`` is dense or from ``to_semi_structured``."""
    x_2d = x.reshape(-1, x.shape[-1])
    return F.linear(x_2d, weight, bias).reshape(*x.shape[:-1], weight.shape[0])
