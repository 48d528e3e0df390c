"""Configuration of SPP (Sparsity-Preserved PEFT, Lu et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ..._validation import is_int, is_real

INIT_A_CHOICES = ("kaiming", "normal", "ones")


@dataclass
class SPPConfig(PeftConfig):
    """Configuration of an [`SPPModel`].

    SPP trains, per target linear with pruned weight ``W`` (out x in), a matrix ``A`` (r x in) and a
    column ``b`` (out x 1). ``R(A)`` repeats ``A``'s rows so that consecutive output rows share one
    (row ``i`` uses ``A[floor(i * r / out)]``), and

        ΔW = R(A) ⊙ b ⊙ W        y = x Wᵀ + alpha · dropout(x) ΔWᵀ

    so the update is a per-weight relative change and is exactly zero wherever ``W`` is pruned.
    Merging multiplies: ``W ← W ⊙ (1 + alpha · R(A) ⊙ b)``, which keeps every zero.

    Args:
        r: rows of ``A`` (> 0). A layer with fewer output rows than ``r`` uses ``r = out_features``
            there (one row of ``A`` per output row: the finest grouping there is), with a warning.
        alpha: scaling of the update (a number, not divided by ``r``).
        dropout: dropout on the adapter path's input, in [0, 1).
        init_A: ``"kaiming"`` (kaiming-uniform, as in the paper and LoRA's A), ``"normal"``
            (``N(0, 1/in_features)``) or ``"ones"`` (every row of ``W`` starts with a row-wise scale:
            IA3-like). ``A`` must not start at zero: with ``b = 0`` both gradients would vanish.
        init_b_zero: ``True`` (default) starts ``b`` at zero, so the model is unchanged at step 0;
            ``False`` draws ``b ~ N(0, 1)`` (tests and ablations).
        unmerge_backup_below: merging saves the original value of every weight whose merge factor
            ``|1 + alpha · R(A) ⊙ b|`` is below this, and unmerging restores those exactly instead of
            dividing by a (near-)zero factor. Any value >= 0; 0 disables the backup (a factor of
            exactly 0 then still leaves the weight at its merged value on unmerge).
        target_modules: module names, a regex, or ``"all-linear"`` (the default: every linear layer
            except the output head, which is what pruners sparsify).
        exclude_modules: module names or a regex not to adapt.
        modules_to_save: other modules to train and save in full.
    """

    r: int = field(default=16, metadata={"help": "rows of A; consecutive output rows share one row"})
    alpha: float = field(default=1.0, metadata={"help": "scaling of the update R(A) ⊙ b ⊙ W"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    init_A: str = field(default="kaiming", metadata={"help": f"initialisation of A: one of {INIT_A_CHOICES}"})
    init_b_zero: bool = field(default=True, metadata={"help": "b = 0 at start (no change at step 0)"})
    unmerge_backup_below: float = field(
        default=1e-3, metadata={"help": "merge keeps weights whose merge factor is below this, for exact unmerge"}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default="all-linear", metadata={"help": "module names, regex or 'all-linear'"}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules to skip"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "extra modules to train/save"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.SPP
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if not is_int(self.r) or self.r <= 0:
            raise ValueError(f"SPPConfig.r must be a positive integer, got {self.r!r}")
        if not is_real(self.alpha):
            raise ValueError(f"SPPConfig.alpha must be a finite number, got {self.alpha!r}")
        if not is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SPPConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init_A not in INIT_A_CHOICES:
            raise ValueError(f"SPPConfig.init_A must be one of {INIT_A_CHOICES}, got {self.init_A!r}")
        if not isinstance(self.init_b_zero, bool):
            raise ValueError(f"SPPConfig.init_b_zero must be True or False, got {self.init_b_zero!r}")
        if not is_real(self.unmerge_backup_below) or self.unmerge_backup_below < 0:
            raise ValueError(f"SPPConfig.unmerge_backup_below must be a finite number >= 0, "
                             f"got {self.unmerge_backup_below!r}")
        if self.target_modules is None or (not isinstance(self.target_modules, str) and not self.target_modules):
            raise ValueError("SPPConfig.target_modules is empty: name the layers to adapt or use 'all-linear'")
