"""sparse-peft: fine-tune pruned LLMs with Hugging Face peft without losing their sparsity.

Importing this package registers its PEFT methods with peft, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``merge_and_unload`` work with the configs below.
"""

from ._peft_registry import register_all as _register_all
from .merge import merge_and_unload_sparse
from .sparsity import (
    is_nm_sparse,
    mask_fingerprint,
    parse_pattern,
    weight_mask,
)
from .tuners.masked_lora import MaskedLoraConfig, MaskedLoraModel

_register_all()

__version__ = "0.1.0"

__all__ = [
    "MaskedLoraConfig",
    "MaskedLoraModel",
    "is_nm_sparse",
    "mask_fingerprint",
    "merge_and_unload_sparse",
    "parse_pattern",
    "weight_mask",
]
