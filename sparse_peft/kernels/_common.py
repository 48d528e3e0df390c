"""What every kernel file shares: the interpreter switch, autotune lists, device checks and tile order.

Triton decides at decoration time whether ``@triton.jit`` functions are compiled for the GPU or run
by its CPU interpreter (``TRITON_INTERPRET=1``): our kernels when their module is imported, and
triton.language's own ``@jit`` helpers (``tl.sum``, ``tl.cumsum``) when triton itself is. Both must
agree for the interpreter to work, so the decision is read here, once, and every kernel follows it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: True when the kernels run in Triton's CPU interpreter (tests); False when they compile for a GPU.
#: ``triton.knobs`` exists from Triton 3.4 on; before it the environment variable was read directly.
INTERPRET = (bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs")
             else os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"))
#: Whether triton.language's helpers were decorated for the interpreter too (False when triton was
#: imported before TRITON_INTERPRET=1 was set: then the interpreter cannot run any of our kernels).
LANGUAGE_INTERPRETED = type(triton.language.sum).__name__ == "InterpretedFunction"


def autotune_configs(gpu_configs: list[triton.Config], interpreter_config: triton.Config) -> list[triton.Config]:
    """The GPU autotune list, or one small config in the interpreter (where timing means nothing and
    every extra config would run the whole kernel again in numpy)."""
    return [interpreter_config] if INTERPRET else gpu_configs


@triton.jit
def grouped_tile(M, P, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_p)``: the (row block, column block) of an ``M x P`` output this program computes.

    Programs are numbered in groups of ``GROUP_M`` row blocks rather than row by row: within a group,
    consecutive programs walk down the row blocks of one column block before moving to the next, so
    a column block's weight tiles are read by ``GROUP_M`` programs in a row and stay in L2. The last
    group holds the leftover row blocks.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_p = tl.cdiv(P, BLOCK_P)
    group_size = GROUP_M * num_pid_p
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_p = (pid % group_size) // rows_in_group
    return pid_m, pid_p


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_runnable(op: str, *tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, a device the kernels can run on, and no float64 (the references
    take it, for gradcheck; the kernels' tl.dot does not). Returns the device."""
    for tensor in tensors:
        if tensor is not None and tensor.is_floating_point() and tensor.dtype not in KERNEL_DTYPES:
            raise ValueError(f"{op}: the Triton kernel takes float16, bfloat16 or float32 tensors, got "
                             f"{tensor.dtype} (use backend='torch' for float64)")
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    device = devices.pop()
    if device.type != "cuda" and not (INTERPRET and LANGUAGE_INTERPRETED):
        late = " (it was set after triton had been imported)" if INTERPRET else ""
        raise RuntimeError(
            f"{op}: the Triton kernels run on CUDA tensors, got tensors on {device}. To run them on the "
            f"CPU (tests), set TRITON_INTERPRET=1 in the environment before triton is first imported{late}; "
            "otherwise use backend='torch'.")
    return device


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the tiles are fed to ``tl.dot`` in: the input's own, except bf16 in the interpreter,
    whose ``tl.dot`` on bf16 is wrong (it is computed in fp32 there and cast back)."""
    return torch.float32 if INTERPRET and dtype == torch.bfloat16 else dtype


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision``: for fp32 tiles, TF32 only where torch itself allows it for
    matmuls (``torch.backends.cuda.matmul.allow_tf32``, off by default), so the kernels round like the
    references; fp16/bf16 tiles use the tensor cores either way."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
