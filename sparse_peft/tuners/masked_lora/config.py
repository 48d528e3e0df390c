"""Configuration of masked LoRA: LoRA whose update is ``(B A) ⊙ M``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ..._validation import is_int, is_real


@dataclass
class MaskedLoraConfig(PeftConfig):
    """Configuration of a [`MaskedLoraModel`].

    Masked LoRA trains ``ΔW = scaling · (B A) ⊙ M`` where ``M`` is the target layer's sparsity mask
    (``W != 0`` when the adapter is created). What is trained is exactly what merges, so
    ``merge_and_unload()`` keeps every pruned position at exactly zero.

    Args:
        r: LoRA rank (> 0).
        lora_alpha: scaling numerator; the update is scaled by ``lora_alpha / r``.
        lora_dropout: dropout on the adapter path's input, in [0, 1).
        target_modules: module names, a regex, or ``"all-linear"`` (the default: every linear layer
            except the output head, which is what pruners sparsify).
        exclude_modules: module names or a regex not to adapt.
        init_lora_weights: ``True`` starts with ``B = 0`` (the model is unchanged at step 0);
            ``False`` initialises both factors randomly (for tests).
        modules_to_save: other modules to train and save in full.
    """

    r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16, metadata={"help": "update scaling is lora_alpha / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    target_modules: Optional[Union[list[str], str]] = field(
        default="all-linear", metadata={"help": "module names, regex or 'all-linear'"}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules to skip"})
    init_lora_weights: bool = field(default=True, metadata={"help": "B = 0 at start (no change at step 0)"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "extra modules to train/save"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.MASKED_LORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if not is_int(self.r) or self.r <= 0:
            raise ValueError(f"MaskedLoraConfig.r must be a positive integer, got {self.r!r}")
        if not is_real(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"MaskedLoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.target_modules is None or (not isinstance(self.target_modules, str) and not self.target_modules):
            raise ValueError("MaskedLoraConfig.target_modules is empty: name the layers to adapt or use 'all-linear'")
