"""Peft configs by method name, for command lines and scripts that choose the method at run time."""

from __future__ import annotations

import dataclasses

from peft import LoraConfig, PeftConfig

from .tuners.masked_lora import MaskedLoraConfig
from .tuners.seft import SEFTConfig
from .tuners.spp import SPPConfig
from .tuners.spt import SPTConfig

#: The config class of each method name. ``lora`` is peft's own LoRA: the dense baseline, whose
#: plain merge fills the pruned positions (``merge_and_unload_sparse`` re-masks it).
METHOD_CONFIGS = {"lora": LoraConfig, "masked_lora": MaskedLoraConfig, "spp": SPPConfig, "seft": SEFTConfig,
                  "spt": SPTConfig}
METHODS = tuple(METHOD_CONFIGS)
_BASE_OPTIONS = {f.name for f in dataclasses.fields(PeftConfig)}


def method_config(method: str, **options) -> PeftConfig:
    """The peft config of ``method`` (one of ``METHODS``) with ``options`` as its fields.

        >>> sp.method_config("spp", r=16, alpha=1.0)
        >>> sp.method_config("masked_lora", r=32)            # lora_alpha 64
        >>> sp.method_config("spt", target_sparsity=0.5, prune_end_step=100)

    ``options`` are the config class's own fields (``help(sp.SPPConfig)`` and so on). Two defaults
    differ from the classes', so that the methods compare on equal terms: for ``lora`` and
    ``masked_lora`` a ``lora_alpha`` absent or None is ``2 * r``, and ``lora`` targets every linear
    layer (``target_modules="all-linear"``) like the sparse methods. Raises ValueError naming an
    unknown method or option and the accepted ones; the config checks the values.
    """
    if method not in METHOD_CONFIGS:
        raise ValueError(f"method_config: unknown method {method!r}; choose from {', '.join(METHODS)}")
    config_class = METHOD_CONFIGS[method]
    accepted = {f.name for f in dataclasses.fields(config_class) if f.init}
    unknown = sorted(set(options) - accepted)
    if unknown:
        own = sorted(accepted - _BASE_OPTIONS)
        raise ValueError(f"method_config({method!r}): unknown option {unknown[0]!r}; {config_class.__name__} "
                         f"takes {', '.join(own)} (and PeftConfig's {', '.join(sorted(accepted & _BASE_OPTIONS))})")
    if method in ("lora", "masked_lora") and options.get("lora_alpha") is None:
        options["lora_alpha"] = 2 * options.get("r", config_class.r)
    if method == "lora":
        options.setdefault("target_modules", "all-linear")
    return config_class(**options)
