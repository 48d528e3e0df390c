"""Helpers shared by sparse-peft's tuners (kept here so each tuner folder keeps peft's shape)."""

from __future__ import annotations

import warnings
from functools import partial
from typing import Callable, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .._distributed import full_tensor
from ..sparsity import quantized
from ..sparsity.masks import LINEAR_TYPES, is_linear, linear_view, mask_fingerprint, restore_mask


class FingerprintDict(BufferDict):
    """A tuner layer's ``{adapter name: fingerprint}`` of the masks each adapter was trained on.

    It is saved with the adapter, and every documented way of loading one writes the saved value
    in here: torch's ``load_state_dict`` (peft's ``PeftModel.from_pretrained`` and ``load_adapter``)
    through ``_load_from_state_dict``, transformers' ``model.load_adapter`` (which never calls
    peft's ``set_peft_model_state_dict``) and ``assign=True`` loads by setting the attribute. So the
    check sits here, the one place they all pass through: ``check(adapter_name, saved)`` raises if
    the adapter does not fit this base. Recording a fingerprint (``fingerprints[name] = ...``) is
    not checked.
    """

    def __init__(self, check: Callable[[str, torch.Tensor], None]):
        super().__init__(persistent=True)
        # Plain attributes, not module state. ``check`` is a bound method or partial of the layer, so
        # a deep copy of the model checks against the copied layer.
        object.__setattr__(self, "_check", check)
        object.__setattr__(self, "_loading", False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self._buffers:
            saved = state_dict.get(prefix + name)
            if saved is not None:
                self._check(name, saved)
        # torch turns an error raised while it assigns (assign=True) into a generic RuntimeError, so
        # the check runs above and the assignment below is not checked a second time.
        object.__setattr__(self, "_loading", True)
        try:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        finally:
            object.__setattr__(self, "_loading", False)

    def __setattr__(self, name, value):
        if isinstance(value, torch.Tensor) and name in self._buffers and not self._loading:
            self._check(name, value)
        super().__setattr__(name, value)


def check_mask_fingerprint(layer: BaseTunerLayer, adapter_name: str, saved: torch.Tensor) -> None:
    """Refuse a loaded adapter whose saved fingerprint is not that of ``layer.sparsity_mask``."""
    actual = mask_fingerprint(layer.sparsity_mask)
    if not torch.equal(saved.to(torch.int64).cpu(), actual):
        raise ValueError(
            f"adapter {adapter_name!r} does not fit this base model at layer {layer.layer_name!r}: the adapter was "
            f"trained on a mask with {int(saved[1])} nonzeros of {int(saved[0])} (checksum {int(saved[2])}), the "
            f"base has {int(actual[1])} nonzeros of {int(actual[0])} (checksum {int(actual[2])}). Load it onto the "
            f"same pruned model it was trained on."
        )


def mask_fingerprints(layer: BaseTunerLayer) -> FingerprintDict:
    """The fingerprints of ``layer.sparsity_mask`` its adapters save, checked when one is loaded."""
    return FingerprintDict(partial(check_mask_fingerprint, layer))


def base_view(layer: BaseTunerLayer):
    """The layer's base linear seen as out x in (``linear_view``): the base weight as the tuners'
    math uses it, whether the base is an ``nn.Linear`` or a ``Conv1D`` (stored in x out)."""
    return linear_view(layer.get_base_layer())


def attach_sparsity_mask(layer: BaseTunerLayer, method: str, quantized_ok: bool = True) -> None:
    """Check the wrapped layer is a linear and record its shape on a tuner layer.

    No mask is stored: by the package's invariant the mask is exactly ``W != 0`` of the base (every
    pruner and every merge keeps that with ``restore_mask``), so ``DerivedMask.sparsity_mask``
    derives it when it is needed. Each adapter saves a fingerprint of it (``mask_fingerprints``).
    ``layer_name`` names the layer in messages; the tuner sets it.

    Layout: the mask, and everything the tuners compute from it (adapter deltas, flat positions,
    ``get_delta_weight``, fingerprints), is out x in for every base, ``Conv1D`` included (its
    weight is read through the transposed view ``base_view``). So a fingerprint does not depend on
    how the base stores its weight, and only the writes into the base weight (merge, unmerge) and
    ``merge_target_mask`` convert to the stored layout.

    A bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` base (``sparse_peft.sparsity.quantized``) stores its
    weight packed: its mask is the dequantized weight's nonzeros, and a method that cannot keep a
    quantized base exact passes ``quantized_ok=False`` to refuse it.
    """
    base = layer.get_base_layer()
    if quantized.is_quantized_linear(base):
        if not quantized_ok:
            raise TypeError(refuse_quantized_message(method, type(base).__name__))
        layer.in_features, layer.out_features = base.in_features, base.out_features
        layer.layer_name = type(base).__name__
        return
    if not is_linear(base):
        raise TypeError(f"{method} supports torch.nn.Linear and transformers' Conv1D only, got {type(base).__name__}")
    view = linear_view(base)
    layer.in_features, layer.out_features = view.in_features, view.out_features
    layer.layer_name = type(base).__name__


def refuse_quantized_message(method: str, what: str) -> str:
    return (f"{method} does not support a bitsandbytes-quantized base ({what}): it moves the layer's topology "
            "(re-grows pruned weights, prunes kept ones), which a quantized weight can neither hold exactly nor "
            "give back on unmerge. Train masked LoRA or SPP on the quantized model, or this method on the "
            "unquantized pruned model.")


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """The dtype a new adapter's trainable tensors are created in: the base's float dtype, as peft's
    own methods do. ``get_peft_model`` then upcasts bf16/fp16 adapters to fp32 unless it is called
    with ``autocast_adapter_dtype=False``, which keeps them in the base dtype. (Initial values are
    drawn in fp32 and cast, so a seed gives the same adapter in every dtype up to rounding.)"""
    return base_weight.dtype if base_weight.dtype.is_floating_point else torch.float32


def fuses_base(layer: BaseTunerLayer, active: list[str], dropouts: nn.ModuleDict, x: torch.Tensor) -> bool:
    """Whether the base GEMM and an adapter's update can share one weight ``W + ΔW``: one active
    adapter without dropout (dropout applies to the adapter's input alone), a plain frozen
    ``nn.Linear`` or ``Conv1D`` base without hooks (they expect it to be called) whose weight has
    ``x``'s dtype.

    In bf16/fp16 the sum ``W + ΔW`` is then rounded to the base dtype before the GEMM, which is what
    the merged model computes; an update below half a unit in the last place of its weight shows in
    the forward only once it grows (its gradient does not depend on that rounding).
    """
    base = layer.get_base_layer()
    return (len(active) == 1 and isinstance(dropouts[active[0]], nn.Identity) and type(base) in LINEAR_TYPES
            and not base._forward_hooks and not base._forward_pre_hooks and base.weight.dtype == x.dtype
            and not base.weight.requires_grad)


class DerivedMask:
    """``sparsity_mask``: the base's pruned topology (bool, out x in), derived from the weight on each
    use and never kept, so a layer holds no byte per weight for it (a tuner layer mixes this in).

    On a quantized base (``sparse_peft.sparsity.quantized``) the weight is the dequantized one, made on each
    use; a merge re-quantizes the base and keeps a snapshot of the quantized weight it replaced, so
    the unmerged weight, the mask and the unmerge stay exact.
    """

    # Snapshot of a quantized base's weight from before the merge (None: not merged, or not quantized).
    _quantized_backup: Optional[quantized.QuantizedSnapshot] = None
    #: Kept weights the last merge into a quantized base rounded to exactly 0 (0 for a float base).
    rounded_to_zero: int = 0

    @property
    def quantized_base(self) -> bool:
        return quantized.is_quantized_linear(self.get_base_layer())

    def unmerged_base_weight(self) -> torch.Tensor:
        """The base weight, out x in, as it is without any merged adapter (a layer whose merge
        changes the topology overrides this). A quantized base's is dequantized (a new tensor)."""
        if self.quantized_base:
            return quantized.dequantized_weight(self.get_base_layer(), self._quantized_backup)
        return base_view(self).weight

    def update_weight_source(self):
        """The frozen ``W`` ``delta_linear`` derives the update's mask (and SPP its values) from: the
        weight itself, or for a quantized base a function that dequantizes it on each call, so the
        forward and the backward each hold a dequantized copy only while they run (``delta_linear``
        calls it once per pass) and nothing out x in is kept between them. Called before the base
        layer's forward: with gradients on, it also undoes bitsandbytes' CPU inference repacking,
        through which no gradient flows (``quantized.differentiable_layout_``), and it puts back block
        scales a state-dict save of a repacked layer left transposed (``quantized.block_order_scales_``),
        before the base computes with them or repacks them."""
        if self.quantized_base:
            base = self.get_base_layer()
            quantized.block_order_scales_(base)
            if torch.is_grad_enabled():
                quantized.differentiable_layout_(base)  # before the base's own forward runs
            return partial(quantized.dequantized_weight, base)
        return self.unmerged_base_weight().detach()

    def merge_into_quantized(self, merged: torch.Tensor, names: list[str], safe_merge: bool) -> None:
        """Write ``merged`` (out x in: the unmerged base weight with the updates of the already merged
        adapters and of ``names``) into the quantized base, re-masked with the unmerged mask.

        Every merge re-quantizes from the unmerged weight (not on top of an earlier merge, which
        would round twice); ``rounded_to_zero`` records how many kept weights it made 0."""
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs or infs in the merged weights: adapters {names} seem to be broken")
        base = self.get_base_layer()
        mask = self.sparsity_mask
        if self._quantized_backup is None:
            self._quantized_backup = quantized.quantized_snapshot(base)
        self.rounded_to_zero = quantized.requantize_masked_(base, restore_mask(merged, mask), mask)
        self.merged_adapters.extend(name for name in names if name not in self.merged_adapters)

    def unmerge_quantized(self) -> None:
        """Put the quantized weight from before the merge back, bit for bit."""
        quantized.restore_quantized_(self.get_base_layer(), self._quantized_backup)
        self._quantized_backup = None
        self.rounded_to_zero = 0
        self.merged_adapters.clear()

    @property
    def sparsity_mask(self) -> torch.Tensor:
        # contiguous: flat positions (SEFT) and fingerprints index the out x in mask row-major.
        # Under FSDP the weight is a shard: the mask (one byte a weight) is gathered, transient.
        return full_tensor(self.unmerged_base_weight().detach() != 0).contiguous()


class SparseMaskTuner(BaseTuner):
    """What sparse-peft's mask-keeping tuners share: wrapping target linears, refusing to stack on
    another method, warning on a dense base, and naming each layer for its fingerprint check.

    A subclass sets ``method`` (for messages), ``linear_cls`` and implements ``_layer_kwargs(config)``.
    """

    method: str
    linear_cls: type
    target_module_mapping: dict = {}
    #: Whether the method trains on a bitsandbytes-quantized base (SEFT does not).
    quantized_bases: bool = True

    def _layer_kwargs(self, config) -> dict:
        raise NotImplementedError

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs):
        kwargs = self._layer_kwargs(config)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, **kwargs)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(f"layer {current_key!r} already carries a {type(target).__name__} adapter; "
                            f"{self.method} cannot stack on another method")
        if not is_linear(target):
            raise TypeError(f"layer {current_key!r} is a {type(target).__name__}; {self.method} targets "
                            "torch.nn.Linear and transformers' Conv1D")
        if quantized.is_quantized_linear(target) and not self.quantized_bases:
            raise TypeError(refuse_quantized_message(self.method, f"layer {current_key!r} is a "
                                                     f"{type(target).__name__}"))
        new_module = self.linear_cls(target, adapter_name, **kwargs)
        new_module.layer_name = current_key
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """peft's ``merge_and_unload``; a merge into quantized bases warns once with how many kept
        weights the re-quantization rounded to 0 (``sp.merge_and_unload_sparse`` reports them per layer)."""
        layers = {name: m for name, m in self.model.named_modules()
                  if isinstance(m, self.tuner_layer_cls) and m.quantized_base}
        kept = {name: int(m.sparsity_mask.sum()) for name, m in layers.items()}
        merged = super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        quantized.warn_rounded_to_zero({name: (m.rounded_to_zero, kept[name]) for name, m in layers.items()})
        return merged

    def _post_injection_hook(self, model, config, adapter_name):
        layers = [m for m in model.modules() if isinstance(m, self.tuner_layer_cls)]
        if layers and all(bool(m.sparsity_mask.all()) for m in layers):
            warnings.warn(f"{self.method}: every targeted layer is dense (no zero weights), so there is no sparsity "
                          "pattern to keep. Prune the model first (sparse_peft.prune).")
