"""The SPP tuner: finds the target linears and wraps them in ``spp.Linear``."""

from __future__ import annotations

import warnings

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .._shared import check_fingerprints
from .layer import Linear, SPPLayer


class SPPModel(BaseTuner):
    """Creates an SPP (Sparsity-Preserved PEFT) model from a pruned transformers model.

    Example::

        >>> import sparse_peft as sp
        >>> from peft import get_peft_model
        >>> peft_model = get_peft_model(pruned_model, sp.SPPConfig(r=16))
        >>> merged = peft_model.merge_and_unload()   # same zeros, bit for bit
    """

    prefix: str = "spp_"
    tuner_layer_cls = SPPLayer
    target_module_mapping: dict = {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs):
        kwargs = dict(r=config.r, alpha=config.alpha, dropout=config.dropout, init_A=config.init_A,
                      init_b_zero=config.init_b_zero, unmerge_backup_below=config.unmerge_backup_below)
        if isinstance(target, SPPLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(f"layer {current_key!r} already carries a {type(target).__name__} adapter; "
                            "SPP cannot stack on another method")
        if not isinstance(target, nn.Linear):
            raise TypeError(f"layer {current_key!r} is a {type(target).__name__}; SPP targets torch.nn.Linear")
        new_module = Linear(target, adapter_name, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model, config, adapter_name):
        layers = {name: m for name, m in model.named_modules() if isinstance(m, SPPLayer) and adapter_name in m.r}
        if layers and all(bool(m.sparsity_mask.all()) for m in layers.values()):
            warnings.warn("SPP: every targeted layer is dense (no zero weights); SPP still trains, but there is no "
                          "sparsity pattern to keep. Prune the model first (sparse_peft.prune).")
        clamped = [f"{name} (out_features={m.out_features})" for name, m in layers.items()
                   if m.r[adapter_name] < config.r]
        if clamped:
            warnings.warn(f"SPP adapter {adapter_name!r}: r={config.r} is larger than the output rows of "
                          f"{len(clamped)} layer(s), which use r = out_features (one row of A per output row) "
                          f"instead: {', '.join(clamped)}")

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_fingerprints(model, adapter_name, remapped, key_attr="spp_fingerprint")
        return remapped
