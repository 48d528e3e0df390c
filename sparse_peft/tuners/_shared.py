"""Helpers shared by sparse-peft's tuners (kept here so each tuner folder keeps peft's shape)."""

from __future__ import annotations

import warnings
from functools import partial
from typing import Callable

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..sparsity.masks import mask_fingerprint


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


def attach_sparsity_mask(layer: BaseTunerLayer, method: str) -> None:
    """Record the wrapped linear's shape and its mask (``W != 0`` now) on a tuner layer.

    The mask is the base's pruned topology when the layer is wrapped. It is derived from the base,
    so it is a non-persistent buffer; each adapter saves a fingerprint of it instead
    (``mask_fingerprints``). ``layer_name`` names the layer in messages; the tuner sets it.
    """
    base = layer.get_base_layer()
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{method} supports torch.nn.Linear only, got {type(base).__name__}")
    layer.in_features, layer.out_features = base.in_features, base.out_features
    layer.layer_name = type(base).__name__
    layer.register_buffer("sparsity_mask", base.weight.detach() != 0, persistent=False)


class SparseMaskTuner(BaseTuner):
    """What sparse-peft's mask-keeping tuners share: wrapping target linears, refusing to stack on
    another method, warning on a dense base, and naming each layer for its fingerprint check.

    A subclass sets ``method`` (for messages), ``linear_cls`` and implements ``_layer_kwargs(config)``.
    """

    method: str
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
        new_module.layer_name = current_key
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model, config, adapter_name):
        layers = [m for m in model.modules() if isinstance(m, self.tuner_layer_cls)]
        if layers and all(bool(m.sparsity_mask.all()) for m in layers):
            warnings.warn(f"{self.method}: every targeted layer is dense (no zero weights), so there is no sparsity "
                          "pattern to keep. Prune the model first (sparse_peft.prune).")
