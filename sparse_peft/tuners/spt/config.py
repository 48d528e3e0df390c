"""Configuration of SPT (Sparsity-aware Prompt Tuning, Zhang et al., CPAL 2026)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ..._validation import check_sparsity, is_int, is_real

SCHEDULES = ("cubic",)
PRUNERS = ("wanda", "magnitude")
ALLOCATIONS = ("uniform", "owl")
DEFAULT_NUM_PRUNE_STEPS = 10
# The modules SPT wraps, as get_peft_model names them in target_modules: a decoder layer's self_attn.
ATTENTION_KEY = re.compile(r"(?:^|\.)(\d+)\.self_attn$")
TARGET_MODULES_HELP = ("SPT wraps the whole self-attention module of each decoder layer that gets prompts (the prompts "
                       "are extra keys and values, not an adapter on linears), and get_peft_model sets "
                       "target_modules to those modules itself. Leave target_modules unset; to give prompts to some "
                       "decoder layers only, use SPTConfig.layers=[layer indices]")


def _int_keyed(mapping, name: str, value_check, what: str) -> dict:
    """``{int: value}`` from a dict whose keys may be strings (adapter_config.json stores them so)."""
    if not isinstance(mapping, dict):
        raise ValueError(f"SPTConfig.{name} must be a dict {{layer index: {what}}}, got {mapping!r}")
    out = {}
    for key, value in mapping.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"SPTConfig.{name}: key {key!r} is not a layer index") from None
        if index < 0 or str(index) != str(key).strip():
            raise ValueError(f"SPTConfig.{name}: key {key!r} is not a layer index (an integer >= 0)")
        if not value_check(value):
            raise ValueError(f"SPTConfig.{name}[{index}] must be {what}, got {value!r}")
        out[index] = value
    return dict(sorted(out.items()))


@dataclass
class SPTConfig(PeftConfig):
    """Configuration of an [`SPTModel`].

    SPT gives decoder layer ``l`` its own ``p_l`` trainable prompt vectors (``p_l x hidden``). They are
    projected by the layer's own (sparse) ``k_proj`` / ``v_proj``, every query of the layer attends to
    them (a softmax over the prompts alone, no causal mask, no RoPE on the prompt keys), and the
    result goes through ``o_proj`` and a per-head gate that starts at 0, so the model is unchanged at
    step 0. The lengths follow each layer's sparsity::

        p_l = max(1, round(base_prompt_length * s_l / mean_l(s_l)))      (round half up)

    with ``s_l`` the sparsity layer ``l`` has at the end of tuning (see ``layer_sparsities``).
    While the prompts train, the model is pruned gradually (``sp.gradual_prune_step`` or
    ``sp.GradualPruningCallback``) from its current sparsity to ``target_sparsity`` along the cubic
    schedule ``s_t = s_f + (s_0 - s_f)(1 - (t - start) / (end - start))^3``.

    Args:
        base_prompt_length: ``p_base`` (> 0), the prompt length of a layer of average sparsity.
        target_sparsity: the sparsity gradual pruning reaches at ``prune_end_step``, in (0, 1).
            ``None`` (default) prunes nothing: the model must already be pruned and the lengths
            follow the sparsity each decoder layer has when the adapter is created.
        target_pattern: ``"N:M"`` (e.g. ``"2:4"``) to end at exactly N nonzeros in every group of M
            consecutive inputs instead of an unstructured sparsity. ``target_sparsity`` is then
            ``1 - N/M`` (set when not given); every pruning event adds zeros only where a group still
            has room, so the schedule's counts hold on the way and the pattern holds at the end.
            Uniform allocation only.
        initial_sparsity: ``s_0`` of the schedule, in [0, target_sparsity]. A model sparser than the
            schedule at a step is left as it is (masks only grow), so ``0`` suits both a dense and
            a partially pruned model; a dense model with ``s_0 > 0`` is pruned to ``s_0`` at once at
            ``prune_start_step``.
        schedule: ``"cubic"`` (Zhu & Gupta 2017), the only schedule.
        pruner: ``"wanda"`` (``|W| * ||X||``, row-wise) or ``"magnitude"`` (``|W|``, row-wise), re-scored
            at every pruning step over the still-kept weights.
        prune_start_step, prune_end_step: the schedule runs from ``prune_start_step`` (``s_0``) to
            ``prune_end_step`` (``target_sparsity``, reached exactly), counted in optimizer steps.
        num_prune_steps: pruning events after the start: at ``start + round(k (end - start) / n)``,
            ``k = 1..n`` (plus one at ``start``). Default 10 when ``prune_interval`` is not given.
        prune_interval: instead of ``num_prune_steps``: prune every ``prune_interval`` steps from
            ``start`` (and always at ``end``). Give at most one of the two.
        allocation: how the target sparsity is spread over decoder layers: ``"uniform"`` (every linear
            at ``target_sparsity``) or ``"owl"`` (outlier-weighted: from ``layer_sparsities``, e.g.
            ``sp.owl_layer_sparsities(model, 0.7, calibration)``, or measured from a model that is
            already pruned with OWL to ``target_sparsity``).
        layer_sparsities: ``{layer index: sparsity}`` of every decoder layer at the end of tuning.
            Filled in by ``get_peft_model`` when not given (and saved with the adapter).
        layers: indices of the decoder layers that get prompts; ``None`` = all of them. Every decoder
            layer is pruned either way.
        prompt_lengths: ``{layer index: p_l}``; filled in by ``get_peft_model`` from the formula above
            and saved with the adapter, so loading rebuilds the same shapes. Give it only to reproduce
            an adapter.
        init_std: the prompt vectors start as ``N(0, init_std^2)`` (> 0). Prompts feed ``k_proj`` /
            ``v_proj`` in place of normalised hidden states, whose RMS is about 1.
        target_modules: set by ``get_peft_model`` to the self-attention modules of ``layers`` (and saved
            with the adapter); any other value is refused. Choose the layers with ``layers``.
        modules_to_save: other modules to train and save in full.
    """

    base_prompt_length: int = field(default=8, metadata={"help": "prompt length of a layer of average sparsity"})
    target_sparsity: Optional[float] = field(default=None, metadata={"help": "sparsity reached by gradual pruning"})
    target_pattern: Optional[str] = field(default=None, metadata={"help": "N:M pattern reached by gradual pruning"})
    initial_sparsity: float = field(default=0.0, metadata={"help": "s_0 of the cubic schedule"})
    schedule: str = field(default="cubic", metadata={"help": f"one of {SCHEDULES}"})
    pruner: str = field(default="wanda", metadata={"help": f"one of {PRUNERS}"})
    prune_start_step: int = field(default=0, metadata={"help": "first step of the schedule"})
    prune_end_step: int = field(default=100, metadata={"help": "step at which target_sparsity is reached"})
    num_prune_steps: Optional[int] = field(default=None, metadata={"help": "pruning events after the start"})
    prune_interval: Optional[int] = field(default=None, metadata={"help": "steps between pruning events"})
    allocation: str = field(default="uniform", metadata={"help": f"one of {ALLOCATIONS}"})
    layer_sparsities: Optional[dict] = field(default=None, metadata={"help": "{layer: final sparsity}"})
    layers: Optional[list[int]] = field(default=None, metadata={"help": "decoder layers with prompts (None: all)"})
    prompt_lengths: Optional[dict] = field(default=None, metadata={"help": "{layer: prompt length} (set on creation)"})
    init_std: float = field(default=1.0, metadata={"help": "std of the prompt initialisation"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "set on creation"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "extra modules to train/save"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.SPT
        if not is_int(self.base_prompt_length) or self.base_prompt_length <= 0:
            raise ValueError(f"SPTConfig.base_prompt_length must be a positive integer, got {self.base_prompt_length!r}")
        if self.target_pattern is not None:
            n, m = self.nm_pattern  # validates the text
            if self.target_sparsity is None:
                self.target_sparsity = (m - n) / m
            elif not is_real(self.target_sparsity) or abs(self.target_sparsity - (m - n) / m) > 1e-9:
                raise ValueError(f"SPTConfig.target_pattern={self.target_pattern!r} means target_sparsity={(m - n) / m:g}, "
                                 f"got target_sparsity={self.target_sparsity!r}; give only the pattern")
            if self.allocation != "uniform":
                raise ValueError(f"SPTConfig.target_pattern={self.target_pattern!r} needs allocation='uniform' (every "
                                 f"layer is N:M), got allocation={self.allocation!r}")
        if self.target_sparsity is not None and (not is_real(self.target_sparsity)
                                                 or not 0.0 < self.target_sparsity < 1.0):
            raise ValueError(f"SPTConfig.target_sparsity must be None or a number in (0, 1), got {self.target_sparsity!r}")
        check_sparsity(self.initial_sparsity, "SPTConfig.initial_sparsity")
        if self.target_sparsity is not None and self.initial_sparsity > self.target_sparsity:
            raise ValueError(f"SPTConfig.initial_sparsity={self.initial_sparsity} is above target_sparsity="
                             f"{self.target_sparsity}: the schedule only rises")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"SPTConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"SPTConfig.pruner must be one of {PRUNERS}, got {self.pruner!r}")
        if not is_int(self.prune_start_step) or self.prune_start_step < 0:
            raise ValueError(f"SPTConfig.prune_start_step must be an integer >= 0, got {self.prune_start_step!r}")
        if not is_int(self.prune_end_step) or self.prune_end_step <= self.prune_start_step:
            raise ValueError(f"SPTConfig.prune_end_step must be an integer > prune_start_step="
                             f"{self.prune_start_step}, got {self.prune_end_step!r}")
        if self.num_prune_steps is not None and self.prune_interval is not None:
            raise ValueError(f"give at most one of SPTConfig.num_prune_steps ({self.num_prune_steps!r}) and "
                             f"SPTConfig.prune_interval ({self.prune_interval!r})")
        if self.num_prune_steps is not None and (not is_int(self.num_prune_steps) or self.num_prune_steps < 1):
            raise ValueError(f"SPTConfig.num_prune_steps must be an integer >= 1, got {self.num_prune_steps!r}")
        if self.prune_interval is not None and (not is_int(self.prune_interval) or self.prune_interval < 1):
            raise ValueError(f"SPTConfig.prune_interval must be an integer >= 1, got {self.prune_interval!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"SPTConfig.allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                raise ValueError(f"SPTConfig.layers must be None or a list of layer indices, got {self.layers!r}")
            layers = list(self.layers)
            bad = [i for i in layers if not is_int(i) or i < 0]
            if bad or not layers:
                raise ValueError(f"SPTConfig.layers must be a non-empty list of layer indices (integers >= 0), "
                                 f"got {self.layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"SPTConfig.layers has repeated indices: {self.layers!r}")
            self.layers = sorted(int(i) for i in layers)
        if self.layer_sparsities is not None:
            self.layer_sparsities = _int_keyed(self.layer_sparsities, "layer_sparsities",
                                               lambda v: is_real(v) and 0.0 <= v < 1.0, "a sparsity in [0, 1)")
        if self.prompt_lengths is not None:
            self.prompt_lengths = _int_keyed(self.prompt_lengths, "prompt_lengths",
                                             lambda v: is_int(v) and v >= 1, "a positive integer")
        if not is_real(self.init_std) or self.init_std <= 0:
            raise ValueError(f"SPTConfig.init_std must be a number > 0, got {self.init_std!r}")
        if self.target_modules is not None:
            # Only the value SPT writes itself (a saved adapter_config.json gives it back) is accepted.
            if (isinstance(self.target_modules, str) or not self.target_modules
                    or not all(isinstance(t, str) and ATTENTION_KEY.search(t) for t in self.target_modules)):
                raise ValueError(f"SPTConfig.target_modules={self.target_modules!r} cannot be honoured: "
                                 f"{TARGET_MODULES_HELP}")
            self.target_modules = set(self.target_modules)

    @property
    def nm_pattern(self) -> Optional[tuple[int, int]]:
        """``(N, M)`` of ``target_pattern``, or None."""
        if self.target_pattern is None:
            return None
        parts = str(self.target_pattern).split(":") if isinstance(self.target_pattern, str) else []
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or not 0 < int(parts[0]) < int(parts[1]):
            raise ValueError(f"SPTConfig.target_pattern must be 'N:M' with 0 < N < M (e.g. '2:4'), "
                             f"got {self.target_pattern!r}")
        return int(parts[0]), int(parts[1])

    def pruning_steps(self) -> list[int]:
        """The optimizer steps at which gradual pruning acts, ``prune_start_step`` .. ``prune_end_step``."""
        start, end = self.prune_start_step, self.prune_end_step
        if self.prune_interval is not None:
            steps = list(range(start, end, self.prune_interval)) + [end]
        else:
            n = self.num_prune_steps or DEFAULT_NUM_PRUNE_STEPS
            steps = [start] + [start + math.floor(k * (end - start) / n + 0.5) for k in range(1, n + 1)]
        return sorted(set(steps))
