"""Helpers shared by sparse-peft's tuners (kept here so each tuner folder keeps peft's shape)."""

from __future__ import annotations

import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..sparsity.masks import is_linear, linear_view, mask_fingerprint


def check_fingerprints(model: nn.Module, adapter_name: str, state_dict: dict, key_attr: str) -> None:
    """Refuse to load an adapter whose saved mask fingerprints do not match this base's masks.

    Shared by every sparse-peft tuner whose layers keep a ``sparsity_mask`` and save a fingerprint.
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


def base_view(layer: BaseTunerLayer):
    """The layer's base linear seen as out x in (``linear_view``): the base weight as the tuners'
    math uses it, whether the base is an ``nn.Linear`` or a ``Conv1D`` (stored in x out)."""
    return linear_view(layer.get_base_layer())


def attach_sparsity_mask(layer: BaseTunerLayer, method: str) -> None:
    """Record the wrapped linear's shape and its mask (``W != 0`` now) on a tuner layer.

    The mask is the base's pruned topology when the layer is wrapped. It is derived from the base,
    so it is a non-persistent buffer; each adapter saves a fingerprint of it instead.

    Layout: the mask, and everything the tuners compute from it (adapter deltas, flat positions,
    ``get_delta_weight``, fingerprints), is out x in for every base, ``Conv1D`` included (its
    weight is read through the transposed view ``base_view``). So a fingerprint does not depend on
    how the base stores its weight, and only the writes into the base weight (merge, unmerge) and
    ``merge_target_mask`` convert to the stored layout.
    """
    base = layer.get_base_layer()
    if not is_linear(base):
        raise TypeError(f"{method} supports torch.nn.Linear and transformers' Conv1D only, got {type(base).__name__}")
    view = linear_view(base)
    layer.in_features, layer.out_features = view.in_features, view.out_features
    # contiguous: flat positions (SEFT) and fingerprints index the out x in mask row-major.
    layer.register_buffer("sparsity_mask", (view.weight.detach() != 0).contiguous(), persistent=False)


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
        if not is_linear(target):
            raise TypeError(f"layer {current_key!r} is a {type(target).__name__}; {self.method} targets "
                            "torch.nn.Linear and transformers' Conv1D")
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
