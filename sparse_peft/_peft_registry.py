"""The one place that touches peft internals: adds sparse-peft's methods to ``PeftType`` and registers them.

peft keeps its methods in a ``str`` enum (``PeftType``) and four lookup tables keyed by it. A plugin
cannot declare enum members, so we append real members to the enum (they compare and hash like
their string value, which is what ``adapter_config.json`` stores) and then call peft's own
``register_peft_method``. Everything here is idempotent: importing or reloading ``sparse_peft``
twice leaves exactly one entry per method, pointing at the newest classes.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType, register_peft_method


def _add_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, creating the enum member if peft does not have it yet."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    # The enum's own tables: name lookup (PeftType[name]), value lookup (PeftType(value)),
    # iteration order (list(PeftType)), and attribute access (PeftType.NAME).
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def register(name: str, config_cls, model_cls, prefix: str) -> PeftType:
    """Register one method (``name`` is lower case, e.g. ``"masked_lora"``) with peft."""
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    peft_type = _add_peft_type(name.upper())
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        existing = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
        if existing.__module__ != config_cls.__module__ or existing.__qualname__ != config_cls.__qualname__:
            raise KeyError(
                f"PEFT method {name!r} is already registered by {existing.__module__}.{existing.__qualname__}"
            )
        # Same method registered again (e.g. importlib.reload): point the tables at the new classes.
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING.pop(peft_type, None)
        return peft_type
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return peft_type


def register_all() -> None:
    """Register every sparse-peft method. Called once by ``import sparse_peft``."""
    from .tuners.masked_lora import MaskedLoraConfig, MaskedLoraModel
    from .tuners.seft import SEFTConfig, SEFTModel
    from .tuners.spp import SPPConfig, SPPModel
    from .tuners.spt import SPTConfig, SPTModel

    register("masked_lora", MaskedLoraConfig, MaskedLoraModel, prefix=MaskedLoraModel.prefix)
    register("spp", SPPConfig, SPPModel, prefix=SPPModel.prefix)
    register("seft", SEFTConfig, SEFTModel, prefix=SEFTModel.prefix)
    register("spt", SPTConfig, SPTModel, prefix=SPTModel.prefix)

