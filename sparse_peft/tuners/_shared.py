"""Helpers shared by sparse-peft's tuners (kept here so each tuner folder keeps peft's shape)."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..sparsity.masks import mask_fingerprint


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
