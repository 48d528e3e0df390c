"""The masked LoRA tuner: finds the target linears and wraps them in ``masked_lora.Linear``."""

from __future__ import annotations

from .._shared import SparseMaskTuner
from .layer import Linear, MaskedLoraLayer


class MaskedLoraModel(SparseMaskTuner):
    """Creates a masked LoRA model from a (pruned) transformers model.

    Example::

        >>> import sparse_peft as sp
        >>> from peft import get_peft_model
        >>> peft_model = get_peft_model(pruned_model, sp.MaskedLoraConfig(r=8))
        >>> merged = peft_model.merge_and_unload()   # the pruned positions are still exactly zero
    """

    prefix: str = "masked_lora_"
    tuner_layer_cls = MaskedLoraLayer
    linear_cls = Linear
    method = "masked LoRA"

    def _layer_kwargs(self, config) -> dict:
        return dict(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                    init_lora_weights=config.init_lora_weights)
