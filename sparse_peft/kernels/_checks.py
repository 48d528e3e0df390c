"""Input checks shared by the Triton wrappers and their PyTorch reference twins (no Triton import).

Each raises ``ValueError`` naming the op and the offending shape, dtype or value.
"""

from __future__ import annotations

import torch

from sparse_peft.sparsity.bitmask import PackedBitmask, packed_row_bytes

#: float64 is accepted by the references (``gradcheck``); the Triton wrappers take the first three only.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(op: str, name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be a float16, bfloat16, float32 or float64 tensor, got {tensor.dtype}")


def check_spp_linear(x, weight, A, b, bias) -> None:
    op = "spp_linear"
    for name, t in (("x", x), ("weight", weight), ("A", A), ("b", b)):
        check_float(op, name, t)
    if weight.dim() != 2 or A.dim() != 2 or A.shape[1] != weight.shape[1] or tuple(b.shape) != (weight.shape[0], 1):
        raise ValueError(f"{op}: shapes do not fit: weight {tuple(weight.shape)}, A {tuple(A.shape)}, "
                         f"b {tuple(b.shape)} (need weight: out x in, A: r x in, b: out x 1)")
    if not 1 <= A.shape[0] <= weight.shape[0]:
        raise ValueError(f"{op}: A has {A.shape[0]} rows; need 1 <= r <= out_features={weight.shape[0]}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: x has {x.shape[-1]} features (shape {tuple(x.shape)}), the weight expects "
                         f"{weight.shape[1]}")
    if x.dtype != weight.dtype:
        raise ValueError(f"{op}: x and weight must share a dtype, got x {x.dtype} and weight {weight.dtype}")
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"{op}: bias must be ({weight.shape[0]},) in {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")


def check_flat_range(op: str, low: int, high: int, shape: tuple[int, int]) -> None:
    """Flat indices ``i * in + j`` whose least is ``low`` and largest ``high`` lie inside ``shape``."""
    if low < 0 or high >= shape[0] * shape[1]:
        raise ValueError(f"{op}: flat indices must lie in [0, {shape[0] * shape[1]}) for (out, in) = "
                         f"{tuple(shape)}, got min {low} and max {high}")


def check_sddmm(grad_out, x, indices, check_range: bool = True) -> tuple[int, int]:
    """Returns (out, in). grad_out and x may differ in dtype (e.g. under autocast): both promote.
    ``check_range=False`` skips reading the indices' least and largest values (on a GPU that read
    waits for all queued work), for indices a ``csr_pattern`` was made from: it checked them."""
    op = "sddmm"
    check_float(op, "grad_out", grad_out)
    check_float(op, "x", x)
    if grad_out.dim() != 2 or x.dim() != 2 or grad_out.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: need grad_out (tokens, out) and x (tokens, in) with the same tokens, got "
                         f"grad_out {tuple(grad_out.shape)} and x {tuple(x.shape)}")
    shape = (grad_out.shape[1], x.shape[1])
    if indices.dtype == torch.bool:
        if tuple(indices.shape) != shape:
            raise ValueError(f"{op}: mask shape {tuple(indices.shape)} does not match (out, in) = {shape}")
    elif indices.dtype == torch.int64:
        if indices.dim() != 1:
            raise ValueError(f"{op}: indices must be 1-D flat indices i * in + j, got shape {tuple(indices.shape)}")
        if indices.numel() and check_range:
            check_flat_range(op, int(indices.min()), int(indices.max()), shape)
    else:
        raise ValueError(f"{op}: indices must be int64 flat indices or a bool mask, got {indices.dtype}")
    return shape


def check_masked_linear(x, weight, mask, bias) -> None:
    op = "masked_linear"
    check_float(op, "x", x)
    check_float(op, "weight", weight)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)} (need x: (..., in), "
                         "weight: (out, in))")
    if x.dtype != weight.dtype:
        raise ValueError(f"{op}: x and weight must share a dtype, got x {x.dtype} and weight {weight.dtype}")
    if mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(f"{op}: mask must be bool of the weight's shape {tuple(weight.shape)}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"{op}: bias must be ({weight.shape[0]},) in {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")


def check_bitmask_linear(x: torch.Tensor, packed: PackedBitmask, bias: torch.Tensor | None) -> None:
    op = "bitmask_linear"
    if not isinstance(packed, PackedBitmask):
        raise ValueError(f"{op}: packed must be a PackedBitmask (from pack_bitmask), got {type(packed).__name__}")
    check_float(op, "x", x)
    out_features, in_features = packed.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"{op}: x has {x.shape[-1]} features (shape {tuple(x.shape)}), the packed weight "
                         f"{tuple(packed.shape)} expects {in_features}")
    if x.dtype != packed.dtype:
        raise ValueError(f"{op}: x and the packed values must share a dtype, got {x.dtype} and {packed.dtype}")
    if packed.bits.dtype != torch.uint8 or tuple(packed.bits.shape) != (out_features, packed_row_bytes(in_features)):
        raise ValueError(f"{op}: bits must be uint8 ({out_features}, {packed_row_bytes(in_features)}), got "
                         f"{packed.bits.dtype} {tuple(packed.bits.shape)}")
    if tuple(packed.row_offsets.shape) != (out_features + 1,):
        raise ValueError(f"{op}: row_offsets must have shape ({out_features + 1},), got {tuple(packed.row_offsets.shape)}")
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (out_features,)):
        raise ValueError(f"{op}: bias must be ({out_features},) in {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
