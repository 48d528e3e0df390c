"""bitsandbytes-quantized bases: everything sparse-peft knows about ``Linear4bit`` / ``Linear8bitLt``.

A quantized layer keeps its weight packed (4-bit codes with per-block scales, or int8 rows with
per-row scales). Its mask is what is nonzero after dequantization: 0 is exactly representable in
NF4, FP4 and int8, so every pruned weight of a model pruned *before* quantizing is still exactly 0,
while quantization may also round some small kept weights to 0 (they are then pruned too).

``merge_and_unload_dequantized`` (a whole model out to plain float weights) is defined here; what
one layer is (``is_quantized_linear``, ``dequantized_weight``, re-quantizing a merged weight, ...)
lives in ``sparse_peft.sparsity.quantized``, below the pruners, the sparsity report and the tuners
that use it, and is importable from here as well.

bitsandbytes is imported only when a model holds one of its layers (``sys.modules`` is checked
first), so nothing here needs it installed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .merge import merge_and_unload_sparse
from .sparsity.masks import restore_mask
from .sparsity.quantized import (
    QUANTIZED_KINDS,
    QuantizedSnapshot,
    block_order_scales_,
    dequantized_weight,
    differentiable_layout_,
    first_quantized_linear,
    is_quantized_linear,
    merge_quantized_layer,
    quantize_weight_,
    quantized_kind,
    quantized_snapshot,
    refuse_quantized,
    requantize_masked_,
    restore_quantized_,
    warn_rounded_to_zero,
)

__all__ = [
    "QUANTIZED_KINDS", "QuantizedSnapshot", "block_order_scales_", "dequantize_model_", "dequantized_linear",
    "dequantized_weight", "differentiable_layout_", "first_quantized_linear", "is_quantized_linear",
    "merge_and_unload_dequantized", "merge_quantized_layer", "quantize_weight_", "quantized_kind",
    "quantized_snapshot", "refuse_quantized", "requantize_masked_", "restore_quantized_", "warn_rounded_to_zero",
]


def dequantized_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain ``nn.Linear`` in ``dtype`` holding the layer's dequantized weight, zeros exactly where
    the dequantized weight has them (a cast that underflows a kept weight gets it back as ``tiny``)."""
    weight = dequantized_weight(module)
    bias = module.bias
    linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device=weight.device,
                       dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(restore_mask(weight.to(dtype), weight != 0, sign_source=weight))
        if bias is not None:
            linear.bias.copy_(bias.detach().to(dtype))
    linear.requires_grad_(False)
    return linear


def _unmark_quantized(model: nn.Module) -> None:
    """Drop what transformers records about a quantized load, so the model saves as a plain one."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, attr):
            setattr(model, attr, False)


def dequantize_model_(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every bitsandbytes linear of ``model`` (tuner layers' bases included) by a plain
    ``nn.Linear`` in ``dtype`` (``dequantized_linear``); return how many were replaced."""
    replaced = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if is_quantized_linear(child):
                setattr(module, child_name, dequantized_linear(child, dtype))
                replaced += 1
    return replaced


def merge_and_unload_dequantized(peft_model: nn.Module, dtype: torch.dtype = torch.bfloat16,
                                 adapter_names: Optional[list[str]] = None, progressbar: bool = False):
    """Merge a sparse adapter trained on a quantized base into plain ``dtype`` weights.

    Each bitsandbytes base (and every other bitsandbytes linear of the model) is dequantized into a
    plain ``nn.Linear`` in ``dtype`` first, so the merge adds the update to the dequantized weights
    and nothing is rounded back to 4 or 8 bits: every weight the adapter trained on stays kept, every
    pruned one exactly 0 (``sp.merge_and_unload_sparse`` does the merge and re-masks each layer).
    The rest of the model is cast to ``dtype`` and transformers' record of the quantized load is
    dropped, so ``sp.save_sparse`` / ``sp.export_dense`` / ``save_pretrained`` write a plain model.

    Returns ``(model, report)`` like ``sp.merge_and_unload_sparse``. The peft model is consumed.
    """
    tuner = getattr(peft_model, "base_model", peft_model)
    if not hasattr(tuner, "unload"):
        raise TypeError(f"merge_and_unload_dequantized needs a peft model, got {type(peft_model).__name__}")
    # fp32 while merging (the update is summed in fp32 anyway); the cast to dtype comes last.
    dequantize_model_(tuner.model, torch.float32)
    merged, report = merge_and_unload_sparse(peft_model, adapter_names=adapter_names, progressbar=progressbar)
    # The sparse layers' masks, to put back any kept weight the cast to dtype underflows to 0 (fp16).
    masks = {name: m.weight != 0 for name, m in merged.named_modules() if type(m) is nn.Linear}
    masks = {name: mask for name, mask in masks.items() if not bool(mask.all())}
    _unmark_quantized(merged)  # first: transformers refuses to cast a model it records as quantized
    merged.to(dtype)
    for name, mask in masks.items():
        linear = merged.get_submodule(name)
        linear.weight.data = restore_mask(linear.weight.data, mask)
    return merged, report
