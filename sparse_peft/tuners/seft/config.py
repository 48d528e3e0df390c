"""Configuration of SEFT (Sparsity Evolution Fine-Tuning, Xiao et al. 2025)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ..._validation import is_int, is_real

DROP_DECAYS = ("cosine", "linear", "constant")
DROP_CRITERIA = ("weight", "delta")
GROW_CRITERIA = ("gradient",)
SENSITIVITY_CRITERIA = ("taylor", "magnitude")
REGROW_INITS = ("zero", "gradient")
INIT_INDICES = ("random", "magnitude")
GROW_INTO = ("any", "kept")


@dataclass
class SEFTConfig(PeftConfig):
    """Configuration of a [`SEFTModel`].

    SEFT trains a sparse delta ``Δ`` on an index set ``A`` of each target linear (``|A|`` =
    ``density`` x numel, chosen among the weight's nonzeros), and every ``update_interval`` steps
    moves ``A`` (drop and grow) and the layer's sparse topology ``M`` with it, keeping every layer's
    count of nonzeros exactly:

        W_eff = (W + F + Δ) ⊙ M        (F: frozen deltas of positions that left A)
        merge:  W ← (W + F + Δ) ⊙ M_final

    On an N:M-sparse layer (2:4 or 4:8, read from the base's mask) every change stays inside one
    group of M, so the pattern holds after every update and after merge; there ``density`` must be at
    most half the layer's fraction of nonzeros.

    Topology updates are driven by ``sp.seft_step(peft_model, optimizer, step)`` after each
    ``optimizer.step()``, or by ``sp.SEFTCallback()`` under ``transformers.Trainer``.

    Args:
        density: fraction of each layer's positions that is trainable, in (0, 1); ``|A|`` is
            ``round(density * out * in)`` (at least 1) and must not exceed the layer's nonzeros.
        update_interval: optimizer steps between topology updates (> 0).
        drop_fraction: fraction of ``A`` dropped (and regrown) at the first update, in [0, 1].
        drop_decay: how the fraction decays to 0 over ``decay_steps``: ``"cosine"`` (default),
            ``"linear"`` or ``"constant"`` (no decay).
        decay_steps: the step at which the drop fraction reaches 0 (no updates after it). ``None``
            takes the run's total steps (``SEFTCallback`` reads ``max_steps``; ``seft_step`` takes
            ``total_steps=``); with neither, the fraction stays at ``drop_fraction`` (``"constant"``).
        drop_criterion: ``"weight"`` drops the entries of ``A`` with the smallest ``|W + Δ|``
            (the weights that matter least), ``"delta"`` those with the smallest ``|Δ|`` (the entries
            training moved least). A dropped entry keeps its trained value; it stops being trained.
        grow_criterion: ``"gradient"``: grow where the accumulated dense gradient ``|Σ_t ∂L/∂W|``
            over the last ``grow_window`` steps is largest; pruned positions may grow (reactivation).
        grow_into: where growth may go: ``"any"`` (default) outside ``A``, pruned positions
            included, so the mask moves (each layer keeps its count, an N:M layer its pattern);
            ``"kept"`` only the base's nonzeros outside ``A``, so the mask never moves and the merged
            model has the pruned model's mask bit for bit (the sensitivity prune never runs). With
            ``"kept"`` ``density`` must be at most half the layer's fraction of nonzeros, so that
            every update finds as many kept positions outside ``A`` as it drops.
        grow_window: optimizer steps before each update during which the dense gradient is
            accumulated (>= 1). That costs one out x in buffer in the base weight's dtype per
            collecting layer during the window only; it is freed after the update.
        update_groups: the layers (in module order) split into this many consecutive groups whose
            updates are spread evenly over ``update_interval``: group ``g`` updates
            ``g * (update_interval // update_groups)`` steps after group 0. Each layer still updates
            every ``update_interval`` steps, but only one group collects the dense gradient at a
            time, so the collection holds about ``1 / update_groups`` of the targeted weights
            instead of all of them. Needs ``grow_window <= update_interval // update_groups``.
            Default 1: every layer updates at the same step.
        sensitivity_criterion: which active weight outside ``A`` is pruned for each reactivated
            position: ``"taylor"`` the smallest ``|w · g|`` (first-order Taylor, ``g`` the accumulated
            gradient), ``"magnitude"`` the smallest ``|w|``.
        regrow_init: optimizer moments of a regrown slot: ``"zero"`` (fresh, the default) or
            ``"gradient"`` (Adam's first and second moments from the accumulated gradient).
        init_indices: how ``A`` is chosen among the nonzeros at creation: ``"random"`` (seeded,
            the default) or ``"magnitude"`` (the largest ``|W|``).
        seed: seed of the random initial index set (the same on every rank).
        target_modules: module names, a regex, or ``"all-linear"`` (every linear but the head).
        exclude_modules: module names or a regex not to adapt.
        modules_to_save: other modules to train and save in full.
    """

    density: float = field(default=0.02, metadata={"help": "trainable fraction of each layer's positions"})
    update_interval: int = field(default=20, metadata={"help": "optimizer steps between topology updates"})
    drop_fraction: float = field(default=0.3, metadata={"help": "fraction of A dropped at the first update"})
    drop_decay: str = field(default="cosine", metadata={"help": f"one of {DROP_DECAYS}"})
    decay_steps: Optional[int] = field(default=None, metadata={"help": "step where the drop fraction hits 0"})
    drop_criterion: str = field(default="weight", metadata={"help": f"one of {DROP_CRITERIA}"})
    grow_criterion: str = field(default="gradient", metadata={"help": f"one of {GROW_CRITERIA}"})
    grow_into: str = field(default="any", metadata={"help": f"one of {GROW_INTO}"})
    grow_window: int = field(default=2, metadata={"help": "steps of dense gradient accumulated before an update"})
    update_groups: int = field(default=1, metadata={"help": "groups of layers whose updates are staggered"})
    sensitivity_criterion: str = field(default="taylor", metadata={"help": f"one of {SENSITIVITY_CRITERIA}"})
    regrow_init: str = field(default="zero", metadata={"help": f"one of {REGROW_INITS}"})
    init_indices: str = field(default="random", metadata={"help": f"one of {INIT_INDICES}"})
    seed: int = field(default=0, metadata={"help": "seed of the initial index set"})
    target_modules: Optional[Union[list[str], str]] = field(
        default="all-linear", metadata={"help": "module names, regex or 'all-linear'"}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules to skip"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "extra modules to train/save"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.SEFT
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if not is_real(self.density) or not 0.0 < self.density < 1.0:
            raise ValueError(f"SEFTConfig.density must be in (0, 1), got {self.density!r}")
        if not is_int(self.update_interval) or self.update_interval <= 0:
            raise ValueError(f"SEFTConfig.update_interval must be a positive integer, got {self.update_interval!r}")
        if not is_real(self.drop_fraction) or not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(f"SEFTConfig.drop_fraction must be in [0, 1], got {self.drop_fraction!r}")
        if self.decay_steps is not None and (not is_int(self.decay_steps) or self.decay_steps <= 0):
            raise ValueError(f"SEFTConfig.decay_steps must be a positive integer or None, got {self.decay_steps!r}")
        if not is_int(self.grow_window) or not 1 <= self.grow_window <= self.update_interval:
            raise ValueError(f"SEFTConfig.grow_window must be an integer in [1, update_interval="
                             f"{self.update_interval}], got {self.grow_window!r}")
        if not is_int(self.update_groups) or not 1 <= self.update_groups <= self.update_interval:
            raise ValueError(f"SEFTConfig.update_groups must be an integer in [1, update_interval="
                             f"{self.update_interval}], got {self.update_groups!r}")
        if self.grow_window > self.update_interval // self.update_groups:
            raise ValueError(f"SEFTConfig.grow_window={self.grow_window} is longer than the "
                             f"{self.update_interval // self.update_groups} steps between two groups' updates "
                             f"(update_interval={self.update_interval} // update_groups={self.update_groups}): "
                             "lower grow_window or update_groups, or raise update_interval")
        if not is_int(self.seed):
            raise ValueError(f"SEFTConfig.seed must be an integer, got {self.seed!r}")
        for name, choices in (("drop_decay", DROP_DECAYS), ("drop_criterion", DROP_CRITERIA),
                              ("grow_criterion", GROW_CRITERIA), ("sensitivity_criterion", SENSITIVITY_CRITERIA),
                              ("regrow_init", REGROW_INITS), ("init_indices", INIT_INDICES),
                              ("grow_into", GROW_INTO)):
            if getattr(self, name) not in choices:
                raise ValueError(f"SEFTConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.target_modules is None or (not isinstance(self.target_modules, str) and not self.target_modules):
            raise ValueError("SEFTConfig.target_modules is empty: name the layers to adapt or use 'all-linear'")
