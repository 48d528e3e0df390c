"""Helpers shared by sparse-peft's tuners (kept here so each tuner folder keeps peft's shape)."""

from __future__ import annotations

import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..sparsity.masks import mask_fingerprint


def check_fingerprints(model: nn.Module, adapter_name: str, state_dict: dict, key_attr: str) -> None:
    """Refuse to load an adapter whose saved mask fingerprints do not match this base's masks.

    Shared by every sparse-peft tuner whose layers have a ``sparsity_mask`` and save a fingerprint.
    """
    for name, module in model.named_modules():
        mask = getattr(module, "sparsity_mask", None)
        if mask is None or not isinstance(module, BaseTunerLayer):
            continue
        key = f"{name}.{key_attr}.{adapter_name}"
        if name.startswith("_fsdp_wrapped_module."):
            key = key.removeprefix("_fsdp_wrapped_module.")
        saved = state_dict.get(key)
        if saved is None:
            continue
        actual = mask_fingerprint(mask)
        if not torch.equal(saved.to(torch.int64).cpu(), actual):
            layer = name.removeprefix("base_model.model.")
            raise ValueError(
                f"adapter {adapter_name!r} does not fit this base model at layer {layer!r}: the adapter was trained "
                f"on a mask with {int(saved[1])} nonzeros of {int(saved[0])} (checksum {int(saved[2])}), the base has "
                f"{int(actual[1])} nonzeros of {int(actual[0])} (checksum {int(actual[2])}). Load it onto the "
                f"same pruned model it was trained on."
            )


def attach_sparsity_mask(layer: BaseTunerLayer, method: str) -> None:
    """Check the wrapped layer is a linear and record its shape on a tuner layer.

    No mask is stored: by the package's invariant the mask is exactly ``W != 0`` of the base (every
    pruner and every merge keeps that with ``restore_mask``), so ``DerivedMask.sparsity_mask``
    derives it when it is needed. Each adapter saves a fingerprint of it.
    """
    base = layer.get_base_layer()
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{method} supports torch.nn.Linear only, got {type(base).__name__}")
    layer.in_features, layer.out_features = base.in_features, base.out_features


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """The dtype a new adapter's trainable tensors are created in: the base's float dtype, as peft's
    own methods do. ``get_peft_model`` then upcasts bf16/fp16 adapters to fp32 unless it is called
    with ``autocast_adapter_dtype=False``, which keeps them in the base dtype. (Initial values are
    drawn in fp32 and cast, so a seed gives the same adapter in every dtype up to rounding.)"""
    return base_weight.dtype if base_weight.dtype.is_floating_point else torch.float32


def fuses_base(layer: BaseTunerLayer, active: list[str], dropouts: nn.ModuleDict, x: torch.Tensor) -> bool:
    """Whether the base GEMM and an adapter's update can share one weight ``W + ΔW``: one active
    adapter without dropout (dropout applies to the adapter's input alone), a plain frozen
    ``nn.Linear`` base without hooks (they expect it to be called) whose weight has ``x``'s dtype.

    In bf16/fp16 the sum ``W + ΔW`` is then rounded to the base dtype before the GEMM, which is what
    the merged model computes; an update below half a unit in the last place of its weight shows in
    the forward only once it grows (its gradient does not depend on that rounding).
    """
    base = layer.get_base_layer()
    return (len(active) == 1 and isinstance(dropouts[active[0]], nn.Identity) and type(base) is nn.Linear
            and not base._forward_hooks and not base._forward_pre_hooks and base.weight.dtype == x.dtype
            and not base.weight.requires_grad)


class DerivedMask:
    """``sparsity_mask``: the base's pruned topology (bool, out x in), derived from the weight on each
    use and never kept, so a layer holds no byte per weight for it (a tuner layer mixes this in)."""

    def unmerged_base_weight(self) -> torch.Tensor:
        """The base weight as it is without any merged adapter (a layer whose merge changes the
        topology overrides this)."""
        return self.get_base_layer().weight

    @property
    def sparsity_mask(self) -> torch.Tensor:
        return self.unmerged_base_weight().detach() != 0


class SparseMaskTuner(BaseTuner):
    """What sparse-peft's mask-keeping tuners share: wrapping target linears, refusing to stack on
    another method, warning on a dense base, and checking mask fingerprints on load.

    A subclass sets ``method`` (for messages), ``fingerprint_attr`` (the layer's BufferDict of
    fingerprints), ``linear_cls`` and implements ``_layer_kwargs(config)``.
    """

    method: str
    fingerprint_attr: str
    linear_cls: type
    target_module_mapping: dict = {}

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
        if not isinstance(target, nn.Linear):
            raise TypeError(f"layer {current_key!r} is a {type(target).__name__}; {self.method} targets torch.nn.Linear")
        new_module = self.linear_cls(target, adapter_name, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model, config, adapter_name):
        layers = [m for m in model.modules() if isinstance(m, self.tuner_layer_cls)]
        if layers and all(bool(m.sparsity_mask.all()) for m in layers):
            warnings.warn(f"{self.method}: every targeted layer is dense (no zero weights), so there is no sparsity "
                          "pattern to keep. Prune the model first (sparse_peft.prune).")

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_fingerprints(model, adapter_name, remapped, key_attr=cls.fingerprint_attr)
        return remapped
