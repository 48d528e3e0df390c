"""The SEFT tuner: finds the target linears and wraps them in ``seft.Linear``."""

from __future__ import annotations

import zlib

from .._shared import SparseMaskTuner
from .layer import VARIABLE_BUFFERS, Linear, SEFTLayer


class SEFTModel(SparseMaskTuner):
    """Creates a SEFT (Sparsity Evolution Fine-Tuning) model from a pruned transformers model.

    Example::

        >>> import sparse_peft as sp
        >>> from peft import get_peft_model
        >>> peft_model = get_peft_model(pruned_model, sp.SEFTConfig(density=0.02, update_interval=20))
        >>> # after every optimizer.step():  sp.seft_step(peft_model, optimizer, step)
        >>> merged = peft_model.merge_and_unload()   # same count of zeros per layer, evolved mask
    """

    prefix: str = "seft_"
    tuner_layer_cls = SEFTLayer
    linear_cls = Linear
    method = "SEFT"
    quantized_bases = False  # SEFT moves the topology: see refuse_quantized_message

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        # The layer's name seeds its random initial index set (crc32: the same in every process).
        self._current_layer_seed = zlib.crc32(current_key.encode())
        try:
            super()._create_and_replace(config, adapter_name, target, target_name, parent, current_key, **kwargs)
        except ValueError as error:
            raise ValueError(f"layer {current_key!r}: {error}") from None

    def _layer_kwargs(self, config) -> dict:
        return dict(density=config.density, init_indices=config.init_indices, seed=config.seed,
                    grow_into=config.grow_into, layer_seed=getattr(self, "_current_layer_seed", 0))

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        # The frozen deltas and topology switches grow as training goes; give the freshly created
        # layers buffers of the saved lengths so load_state_dict can fill them.
        for name, module in model.named_modules():
            if not isinstance(module, SEFTLayer):
                continue
            for attr in VARIABLE_BUFFERS:
                key = f"{name}.{attr}.{adapter_name}"
                saved = remapped.get(key, remapped.get(key.removeprefix("_fsdp_wrapped_module.")))
                if saved is not None and adapter_name in getattr(module, attr):
                    current = getattr(module, attr)[adapter_name]
                    getattr(module, attr)[adapter_name] = current.new_zeros(saved.shape)
        return remapped
