"""Sparse-safe merging for any adapter peft has (LoRA, AdaLoRA, IA3, VeRA, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ._progress import progress
from .sparsity.masks import restore_mask, weight_mask
from .sparsity.quantized import is_quantized_linear, merge_quantized_layer, warn_rounded_to_zero


@dataclass
class MergeReport:
    """What the mask removed from each layer's merged update.

    ``removed_fraction[layer] = ||ΔW ⊙ (1 - M)|| / ||ΔW||``: 0.0 for an adapter that already respects
    the mask (masked LoRA, SPP, IA3), close to the layer's sparsity for plain LoRA.
    """

    removed_fraction: dict[str, float] = field(default_factory=dict)
    update_norm: dict[str, float] = field(default_factory=dict)
    #: Layers merged into a bitsandbytes-quantized base: kept weights the re-quantization rounded to
    #: exactly 0 (they are pruned now). Empty when no base is quantized.
    rounded_to_zero: dict[str, int] = field(default_factory=dict)

    @property
    def mean_removed_fraction(self) -> float:
        vals = list(self.removed_fraction.values())
        return sum(vals) / len(vals) if vals else 0.0

    def to_dict(self) -> dict:
        return {"removed_fraction": dict(self.removed_fraction), "update_norm": dict(self.update_norm),
                "mean_removed_fraction": self.mean_removed_fraction, "rounded_to_zero": dict(self.rounded_to_zero)}

    def to_markdown(self) -> str:
        lines = ["| layer | update norm | removed by mask |", "|---|---:|---:|"]
        for name, frac in self.removed_fraction.items():
            lines.append(f"| {name} | {self.update_norm[name]:.4g} | {frac:.1%} |")
        lines.append(f"\nmean fraction of the update removed by the mask: {self.mean_removed_fraction:.1%}")
        if self.rounded_to_zero:
            lines.append(f"kept weights re-quantization rounded to 0: {sum(self.rounded_to_zero.values())} in "
                         f"{sum(1 for n in self.rounded_to_zero.values() if n)} of {len(self.rounded_to_zero)} "
                         "quantized layers")
        return "\n".join(lines)


def merge_and_unload_sparse(peft_model: nn.Module, adapter_names: list[str] | None = None,
                            progressbar: bool = False) -> tuple[nn.Module, MergeReport]:
    """Merge every adapter layer of ``peft_model`` and re-apply each base weight's mask.

    Works for any peft tuner whose layers implement ``merge`` (LoRA, AdaLoRA, IA3, VeRA, ... and
    sparse-peft's own). The mask of a layer is its base weight's support (``W != 0``) before the
    merge (or, for a layer that moves its topology on purpose such as SEFT's, the mask its
    ``merge_target_mask`` gives); after the merge every position outside it is exactly ``0.0`` and every position inside
    stays nonzero, so each layer keeps its sparsity and pattern exactly.

    Returns ``(merged_model, report)``; the report says how much of each layer's update norm the
    mask cut (a large fraction means the adapter learnt much that a sparse model cannot hold).

    A bitsandbytes-quantized base (``Linear4bit``, ``Linear8bitLt``) is merged into its dequantized
    weight and quantized again; its mask is the dequantized weight's nonzeros, and
    ``report.rounded_to_zero`` counts the kept weights the re-quantization rounded to 0 (a warning
    sums them). ``sp.merge_and_unload_dequantized`` merges into plain float weights instead.
    """
    tuner = getattr(peft_model, "base_model", peft_model)
    if not hasattr(tuner, "unload"):
        raise TypeError(f"merge_and_unload_sparse needs a peft model, got {type(peft_model).__name__}")
    report = MergeReport()
    layers = [(name, m) for name, m in tuner.model.named_modules() if isinstance(m, BaseTunerLayer)]
    quantized_counts = {}
    for name, layer in progress(layers, "merging (sparse)", progressbar):
        base = layer.get_base_layer()
        weight = getattr(base, "weight", None)
        if weight is None:
            continue
        if is_quantized_linear(base):
            # dequantize, merge, re-quantize: the layer (or merge_quantized_layer) keeps the mask
            merged = merge_quantized_layer(layer, adapter_names)
            report.update_norm[name] = merged["update_norm"]
            report.removed_fraction[name] = (merged["cut_norm"] / merged["update_norm"]
                                             if merged["update_norm"] > 0 else 0.0)
            report.rounded_to_zero[name] = merged["rounded_to_zero"]
            quantized_counts[name] = (merged["rounded_to_zero"], merged["kept"])
            continue
        before = weight.detach().clone()
        # A method that moves the topology on purpose (SEFT) says which mask its merge must end
        # with; every other layer keeps the base's support.
        target_mask = getattr(layer, "merge_target_mask", None)
        mask = target_mask(adapter_names) if target_mask is not None else weight_mask(before)
        layer.merge(adapter_names=adapter_names)
        after = base.weight.data  # some tuners replace .data rather than editing it in place
        update = after.float() - before.float()
        update_norm = update.norm().item()
        # What the re-mask removes: the merged weight outside the mask (the update there, since the
        # base is zero there; zero for a method that ends on its own target mask).
        cut_norm = after.float().masked_fill(mask, 0.0).norm().item()
        base.weight.data = restore_mask(after, mask)
        report.update_norm[name] = update_norm
        report.removed_fraction[name] = cut_norm / update_norm if update_norm > 0 else 0.0
    warn_rounded_to_zero(quantized_counts)
    # The weights now hold the merged, re-masked values: drop the adapter modules without merging again.
    merged = tuner.unload()
    return merged, report
