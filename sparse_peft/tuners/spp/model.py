"""The SPP tuner: finds the target linears and wraps them in ``spp.Linear``."""

from __future__ import annotations

import warnings

from .._shared import SparseMaskTuner
from .layer import Linear, SPPLayer


class SPPModel(SparseMaskTuner):
    """Creates an SPP (Sparsity-Preserved PEFT) model from a pruned transformers model.

    Example::

        >>> import sparse_peft as sp
        >>> from peft import get_peft_model
        >>> peft_model = get_peft_model(pruned_model, sp.SPPConfig(r=16))
        >>> merged = peft_model.merge_and_unload()   # same zeros, bit for bit
    """

    prefix: str = "spp_"
    tuner_layer_cls = SPPLayer
    linear_cls = Linear
    method = "SPP"

    def _layer_kwargs(self, config) -> dict:
        return dict(r=config.r, alpha=config.alpha, dropout=config.dropout, init_A=config.init_A,
                    init_b_zero=config.init_b_zero, unmerge_backup_below=config.unmerge_backup_below)

    def _post_injection_hook(self, model, config, adapter_name):
        super()._post_injection_hook(model, config, adapter_name)
        layers = {name: m for name, m in model.named_modules() if isinstance(m, SPPLayer) and adapter_name in m.r}
        clamped = [f"{name} (out_features={m.out_features})" for name, m in layers.items()
                   if m.r[adapter_name] < config.r]
        if clamped:
            warnings.warn(f"SPP adapter {adapter_name!r}: r={config.r} is larger than the output rows of "
                          f"{len(clamped)} layer(s), which use r = out_features (one row of A per output row) "
                          f"instead: {', '.join(clamped)}")
