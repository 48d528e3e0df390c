"""One bitsandbytes-quantized layer (``Linear4bit`` / ``Linear8bitLt``) as the rest of the package sees it.

A quantized layer keeps its weight packed (4-bit codes with per-block scales, or int8 rows with
per-row scales). Its mask is what is nonzero after dequantization: 0 is exactly representable in
NF4, FP4 and int8, so every pruned weight of a model pruned *before* quantizing is still exactly 0,
while quantization may also round some small kept weights to 0 (they are then pruned too).

The sparsity report and the pruners read a layer here; the tuners read its weight only through
``dequantized_weight`` (a transient, out x in), and write it only through ``quantize_weight_``
(merge) and ``restore_quantized_`` (unmerge, from the snapshot ``quantized_snapshot`` took): the
quantized base runs itself in the forward. Whole models (``merge_and_unload_dequantized``) are
``sparse_peft.quantized``'s.

bitsandbytes is imported only when a model holds one of its layers (``sys.modules`` is checked
first), so nothing here needs it installed.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .masks import restore_mask

#: The bitsandbytes linear classes the sparse tuners accept as a base (by name: bnb stays optional).
QUANTIZED_KINDS = {"Linear4bit": "4bit", "LinearNF4": "4bit", "LinearFP4": "4bit", "Linear8bitLt": "8bit"}


def quantized_kind(module: nn.Module) -> Optional[str]:
    """``"4bit"`` or ``"8bit"`` for a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, else ``None``."""
    if "bitsandbytes" not in sys.modules:
        return None
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def is_quantized_linear(module: nn.Module) -> bool:
    return quantized_kind(module) is not None


def first_quantized_linear(model: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """``(name, module)`` of the first bitsandbytes linear in ``model``, or ``None``."""
    for name, module in model.named_modules():
        if is_quantized_linear(module):
            return name, module
    return None


def refuse_quantized(model: nn.Module, what: str) -> None:
    """Raise if ``model`` holds a bitsandbytes layer: ``what`` needs plain float weights."""
    found = first_quantized_linear(model)
    if found is not None:
        name, module = found
        raise ValueError(f"{what} needs plain float weights, but layer {name!r} is a bitsandbytes "
                         f"{type(module).__name__}: prune before quantizing (prune the float model, save it, "
                         "then load it with BitsAndBytesConfig; see docs/quantized.md)")


def _int8_scales(module: nn.Module) -> torch.Tensor:
    # bitsandbytes moves the row scales from the weight into the layer's state on the first forward
    # (init_8bit_state); a freshly (re)quantized weight still carries them.
    weight = module.weight
    scales = getattr(weight, "SCB", None)
    return scales if scales is not None else module.state.SCB


def _is_cpu_packed(state) -> bool:
    """Whether an inference forward on a CPU with AVX512-BF16 has repacked the 4-bit weight for
    bitsandbytes' CPU kernel (in place; ``dequantize_4bit`` reads only the standard packing)."""
    return bool(getattr(state, "packing_format_for_cpu", False))


def block_order_scales_(module: nn.Module) -> None:
    """Put a 4-bit layer's block scales back in the order its weight's blocks are stored, if
    bitsandbytes' inverse of the CPU packing left them transposed.

    The packing stores one bf16 scale per (block of ``blocksize`` inputs, output row), as a
    ``[in / blocksize, out]`` tensor. bitsandbytes 0.50's inverse (run by ``differentiable_layout_``,
    and by bitsandbytes itself when it saves a state dict or moves a repacked weight) restores the
    standard layout of nested statistics only: plain ones (``bnb_4bit_use_double_quant=False``,
    transformers' default) keep that 2-D shape, while ``dequantize_4bit``, the layer's matmul and the
    next repacking read them flat, one per block of the row-major ``out x in`` weight. Every weight
    would then be scaled by another block's scale (silently; only ``in == blocksize`` is unaffected):
    the model's outputs, its training and every merge turn to noise. A standard state's scales are
    1-D, so a 2-D one outside the packing is this leftover, put back flat in float32 (as
    ``quantize_4bit`` makes them; their values keep the packing's bf16 rounding)."""
    if quantized_kind(module) == "4bit":
        _block_order_scales_(module.weight.quant_state)


def _block_order_scales_(state) -> None:
    if state is None or state.nested or _is_cpu_packed(state) or state.absmax.dim() != 2:
        return
    state.absmax = state.absmax.T.reshape(-1).float()


def differentiable_layout_(module: nn.Module) -> None:
    """Before a forward that needs gradients: put a 4-bit weight that an inference forward repacked
    for the CPU kernel back in the standard packing. bitsandbytes runs a repacked weight through
    ``gemv_4bit``, which has no autograd formula, so no gradient would flow back through the layer
    (silently: torch only warns); in training mode bitsandbytes does not repack it again. Its own
    converter is used, as bitsandbytes does before saving or moving the weight, followed by
    ``block_order_scales_`` for the scales that converter leaves transposed."""
    if quantized_kind(module) != "4bit" or not _is_cpu_packed(module.weight.quant_state):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = module.weight
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    block_order_scales_(module)


def _dequantize_cpu_packed(weight: torch.Tensor) -> torch.Tensor:
    """Dequantize a 4-bit weight in bitsandbytes' CPU packing without converting it back in place
    (its own inverse edits the weight and re-quantizes nested statistics, so a model evaluated and
    inspected in turn would drift): codes ``[N, K/2]`` as blocks of 32 rows x 2 columns, one
    bf16 scale per (column block, row), stored ``[K / blocksize, N]``."""
    state = weight.quant_state
    out_features, half = weight.data.shape
    rows = 32  # bitsandbytes' block_n for this packing
    nibbles = weight.data.reshape(-1, rows)
    codes = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1)
    codes = codes.reshape(out_features // rows, half, rows, 2).transpose(1, 2).reshape(out_features, 2 * half)
    scales = state.absmax.T.float().repeat_interleave(state.blocksize, dim=1)
    return (state.code.float().to(codes.device)[codes.long()] * scales).to(state.original_dtype)


def dequantized_weight(module: nn.Module, snapshot: Optional["QuantizedSnapshot"] = None) -> torch.Tensor:
    """The layer's weight (or a ``snapshot`` of it) as floats, out x in: a new tensor each call,
    nothing is cached (scales bitsandbytes left transposed are put back first: ``block_order_scales_``)."""
    import bitsandbytes as bnb

    with torch.no_grad():
        if quantized_kind(module) == "4bit":
            weight = module.weight if snapshot is None else snapshot.weight
            _block_order_scales_(weight.quant_state)
            if _is_cpu_packed(weight.quant_state):
                return _dequantize_cpu_packed(weight)
            return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        if snapshot is not None:
            return bnb.functional.int8_vectorwise_dequant(snapshot.weight, snapshot.scales)
        return bnb.functional.int8_vectorwise_dequant(module.weight.data, _int8_scales(module))


def quantize_weight_(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace the layer's weight by ``weight`` (out x in, float) quantized with the layer's own settings."""
    import bitsandbytes as bnb

    old = module.weight
    device = old.device
    if quantized_kind(module) == "4bit":
        # Params4bit quantizes when it is moved to a device; the old parameter's settings (quant
        # type, block size, nested statistics, storage dtype) come along, as in peft's 4-bit merge.
        settings = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
        settings.update(bnb_quantized=False, requires_grad=False, quant_state=None)
        state = old.quant_state
        dtype = weight.dtype if state is None else state.original_dtype if _is_cpu_packed(state) else state.dtype
        module.weight = bnb.nn.Params4bit(weight.to("cpu", dtype), **settings).to(device)
    else:
        module.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False,
                                          has_fp16_weights=module.state.has_fp16_weights).to(device)
        module.state.reset_grads()  # the state still holds the old codes and scales


@dataclass(eq=False)
class QuantizedSnapshot:
    """A layer's quantized weight as it was, for ``restore_quantized_`` (a plain object: a
    ``Params4bit`` set as a module attribute would register as one of its parameters).

    ``weight`` is the 4-bit parameter itself (merge replaces it rather than editing it) or the int8
    codes, with their row ``scales``: about a quarter (4-bit) or half (int8) of a bf16 weight's bytes.
    """

    weight: torch.Tensor
    scales: Optional[torch.Tensor] = None


def quantized_snapshot(module: nn.Module) -> QuantizedSnapshot:
    if quantized_kind(module) == "4bit":
        return QuantizedSnapshot(module.weight)
    return QuantizedSnapshot(module.weight.data, _int8_scales(module))


def restore_quantized_(module: nn.Module, snapshot: QuantizedSnapshot) -> None:
    """Put the snapshot's quantized weight back: bit for bit what the layer held."""
    import bitsandbytes as bnb

    if quantized_kind(module) == "4bit":
        module.weight = snapshot.weight
        return
    module.weight = bnb.nn.Int8Params(snapshot.weight, requires_grad=False,
                                      has_fp16_weights=module.state.has_fp16_weights,
                                      CB=snapshot.weight, SCB=snapshot.scales)
    module.state.reset_grads()


def requantize_masked_(module: nn.Module, merged: torch.Tensor, mask: torch.Tensor) -> int:
    """Quantize ``merged`` (out x in, zero outside ``mask``) into the layer; return how many kept
    positions (``mask``) the quantization rounded to exactly 0.

    0 is a code of every bitsandbytes format, so the pruned positions dequantize to exactly 0; that
    is checked, not assumed. A kept weight smaller than half the smallest code of its block (NF4:
    about 4% of the block's largest magnitude; int8: 1/254 of its row's) becomes 0: it leaves the
    mask, which the count reports.
    """
    quantize_weight_(module, merged)
    after = dequantized_weight(module)
    leaked = int(((after != 0) & ~mask).sum())
    if leaked:
        raise RuntimeError(f"re-quantizing a {type(module).__name__} made {leaked} pruned weights nonzero")
    return int((mask & (after == 0)).sum())


def merge_quantized_layer(layer, adapter_names: Optional[list[str]]) -> dict:
    """``layer.merge`` for a tuner layer on a quantized base, then the base re-masked with the mask it
    had before (only an adapter that ignores the mask, e.g. peft's LoRA, leaves anything to cut).

    Returns ``update_norm``, ``cut_norm`` (the update outside the mask), ``rounded_to_zero`` (kept
    weights the re-quantization made 0) and ``kept`` (the mask's nonzeros).
    """
    base = layer.get_base_layer()
    before = dequantized_weight(base).float()
    mask = before != 0
    layer.merge(adapter_names=adapter_names)
    after = dequantized_weight(base).float()
    cut_norm = after.masked_fill(mask, 0.0).norm().item()
    if cut_norm > 0:
        rounded = requantize_masked_(base, restore_mask(after, mask), mask)
    else:
        rounded = int((mask & (after == 0)).sum())
    return dict(update_norm=(after - before).norm().item(), cut_norm=cut_norm, rounded_to_zero=rounded,
                kept=int(mask.sum()))


def warn_rounded_to_zero(counts: dict[str, tuple[int, int]]) -> None:
    """One warning for a whole merge: ``counts[layer] = (kept weights rounded to 0, kept weights)``."""
    rounded = {name: n for name, (n, _) in counts.items() if n}
    if not rounded:
        return
    kept = sum(k for _, k in counts.values())
    worst = max(rounded, key=rounded.get)
    warnings.warn(f"merging into quantized layers: re-quantization rounded {sum(rounded.values())} of {kept} kept "
                  f"weights to exactly 0 in {len(rounded)} of {len(counts)} layers (most in {worst!r}: "
                  f"{rounded[worst]}); they are pruned now. sp.merge_and_unload_sparse reports them per layer; "
                  "sp.merge_and_unload_dequantized merges into plain float weights without rounding.",
                  stacklevel=3)
