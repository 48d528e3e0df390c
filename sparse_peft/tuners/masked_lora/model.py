"""The masked LoRA tuner: finds the target linears and wraps them in ``masked_lora.Linear``."""

from __future__ import annotations

import warnings

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .._shared import check_fingerprints
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

