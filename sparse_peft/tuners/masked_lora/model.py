"""The masked LoRA tuner: finds the target linears and wraps them in ``masked_lora.Linear``."""

from __future__ import annotations

import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ...sparsity.masks import mask_fingerprint
from .layer import Linear, MaskedLoraLayer


class MaskedLoraModel(BaseTuner):
    """Creates a masked LoRA model from a (pruned) transformers model.

    Example::

        >>> import sparse_peft as sp
        >>> from peft import get_peft_model
        >>> peft_model = get_peft_model(pruned_model, sp.MaskedLoraConfig(r=8))
        >>> merged = peft_model.merge_and_unload()   # the pruned positions are still exactly zero
    """

    prefix: str = "masked_lora_"
    tuner_layer_cls = MaskedLoraLayer
    target_module_mapping: dict = {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs):
        kwargs = dict(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      init_lora_weights=config.init_lora_weights)
        if isinstance(target, MaskedLoraLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(f"layer {current_key!r} already carries a {type(target).__name__} adapter; "
                            "masked LoRA cannot stack on another method")
        if not isinstance(target, nn.Linear):
            raise TypeError(f"layer {current_key!r} is a {type(target).__name__}; masked LoRA targets torch.nn.Linear")
        new_module = Linear(target, adapter_name, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model, config, adapter_name):
        layers = [m for m in model.modules() if isinstance(m, MaskedLoraLayer)]
        if layers and all(bool(m.sparsity_mask.all()) for m in layers):
            warnings.warn("masked LoRA: every targeted layer is dense (no zero weights), so it behaves as plain "
                          "LoRA. Prune the model first (sparse_peft.prune) to keep a sparsity pattern.")

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_fingerprints(model, adapter_name, remapped, key_attr="masked_lora_fingerprint")
        return remapped


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
