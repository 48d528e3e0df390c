"""What drives SEFT's topology during training: ``seft_step`` for custom loops, ``SEFTCallback`` for
``transformers.Trainer``.

Timeline with ``update_interval = U`` and ``grow_window = K``: the backward passes of the K
optimizer steps that end at step ``n·U`` also accumulate the dense weight gradient of every SEFT
layer; right after step ``n·U`` each layer drops, grows and re-prunes, and the accumulator is freed.
With ``update_groups = G`` the layers form G consecutive groups, group ``g`` shifted by
``g·(U // G)`` steps, so only one group holds an accumulator at a time.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..tuners.seft.config import SEFTConfig
from ..tuners.seft.layer import SEFTLayer


def drop_fraction_at(config: SEFTConfig, step: int, total_steps: Optional[int] = None) -> float:
    """The fraction of ``A`` dropped at an update after ``step`` optimizer steps."""
    horizon = config.decay_steps or total_steps
    if config.drop_decay == "constant" or horizon is None:
        return config.drop_fraction
    if step >= horizon:
        return 0.0
    progress = step / horizon
    if config.drop_decay == "cosine":
        return config.drop_fraction * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.drop_fraction * (1.0 - progress)


def _seft_adapter(peft_model, adapter_name: Optional[str]) -> tuple[str, SEFTConfig]:
    configs = getattr(peft_model, "peft_config", None)
    if not configs:
        raise TypeError(f"seft_step needs a PeftModel with a SEFT adapter, got {type(peft_model).__name__}")
    if adapter_name is None:
        active = peft_model.active_adapter
        adapter_name = active if isinstance(active, str) else active[0]
    config = configs.get(adapter_name)
    if not isinstance(config, SEFTConfig):
        raise ValueError(f"adapter {adapter_name!r} is not a SEFT adapter (it is {type(config).__name__})")
    return adapter_name, config


def seft_layers(peft_model, adapter_name: str) -> dict[str, SEFTLayer]:
    return {name.removeprefix("base_model.model."): module for name, module in peft_model.named_modules()
            if isinstance(module, SEFTLayer) and adapter_name in module.seft_delta}


def _collects_during(config: SEFTConfig, step: int, total_steps: Optional[int], offset: int = 0) -> bool:
    """Whether the backward of optimizer step ``step`` (1-based) feeds the next update of a layer whose
    updates come ``offset`` steps after ``n * update_interval``."""
    interval, window, local = config.update_interval, config.grow_window, step - offset
    position = local % interval
    if local < 1 or not (position == 0 or position > interval - window):
        return False
    next_update = math.ceil(local / interval) * interval + offset
    return drop_fraction_at(config, next_update, total_steps) > 0


def update_offsets(config: SEFTConfig, names: list[str]) -> dict[str, int]:
    """Each layer's update offset: ``names`` (module order) in ``update_groups`` consecutive groups,
    group ``g`` at ``g * (update_interval // update_groups)`` steps."""
    groups, spacing = config.update_groups, config.update_interval // config.update_groups
    return {name: (i * groups // len(names)) * spacing for i, name in enumerate(names)}


@torch.no_grad()
def seft_step(peft_model, optimizer: Optional[torch.optim.Optimizer], step: int, total_steps: Optional[int] = None,
              adapter_name: Optional[str] = None) -> dict[str, dict]:
    """Call after every ``optimizer.step()`` with ``step`` = optimizer steps done so far (1, 2, ...).

    At update steps (``step % update_interval == 0``; with ``update_groups`` each group at its own
    offset) the updating SEFT layers drop, grow and re-prune;
    the return value maps layer names to ``{"dropped", "grown", "regrown", "pruned"}`` counts (empty
    on other steps). ``optimizer`` gets its state reset at the slots that changed (pass ``None`` if
    there is none). Call it with ``step=0`` before the first step when ``grow_window`` equals
    ``update_interval`` (``SEFTCallback`` does that itself).
    """
    adapter_name, config = _seft_adapter(peft_model, adapter_name)
    layers = seft_layers(peft_model, adapter_name)
    offsets = update_offsets(config, list(layers))
    changes: dict[str, dict] = {}
    updating = {name: layer for name, layer in layers.items()
                if step - offsets[name] > 0 and (step - offsets[name]) % config.update_interval == 0}
    if updating:
        fraction = drop_fraction_at(config, step, total_steps)
        ready = [layer for layer in updating.values() if layer.grad_accum is not None]
        if fraction > 0 and ready:
            if len(ready) != len(updating):
                missing = [name for name, layer in updating.items() if layer.grad_accum is None]
                raise RuntimeError(f"SEFT update at step {step}: no gradient was accumulated for {missing[:3]} "
                                   f"(were they used in the forward?)")
            for name, layer in updating.items():
                layer.sum_grad_accum_over_ranks()  # every rank decides on the same gradient
                changes[name] = layer.update_topology(
                    adapter_name, fraction, drop_criterion=config.drop_criterion,
                    sensitivity_criterion=config.sensitivity_criterion, regrow_init=config.regrow_init,
                    optimizer=optimizer)
        for layer in updating.values():
            layer.stop_collecting()
    _arm_collection(layers, config, step + 1, total_steps)
    return changes


def _arm_collection(layers: dict[str, SEFTLayer], config: SEFTConfig, step: int, total_steps: Optional[int]) -> None:
    """Start collecting in the layers whose next update the backward of step ``step`` feeds."""
    offsets = update_offsets(config, list(layers))
    for name, layer in layers.items():
        if _collects_during(config, step, total_steps, offsets[name]):
            layer.start_collecting()


def seft_summary(changes: dict[str, dict]) -> dict[str, int]:
    """Totals over layers of what one ``seft_step`` changed."""
    keys = ("dropped", "grown", "regrown", "pruned")
    return {key: sum(layer[key] for layer in changes.values()) for key in keys}


def _trainer_callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError:  # transformers is a dependency; this only keeps the module importable alone
        return object
    return TrainerCallback


class SEFTCallback(_trainer_callback_base()):
    """Runs ``seft_step`` after every optimizer step of a ``transformers.Trainer``.

    ``history`` keeps the totals of every update (``{"step", "dropped", "grown", "regrown",
    "pruned"}``); the totals are also logged (``seft/regrown`` etc.) when the Trainer logs.
    """

    def __init__(self, adapter_name: Optional[str] = None):
        self.adapter_name = adapter_name
        self.history: list[dict] = []
        self._pending_log: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # Fresh or resumed: arm the gradient collection for the coming step, as seft_step would have.
        adapter_name, config = _seft_adapter(model, self.adapter_name)
        _arm_collection(seft_layers(model, adapter_name), config, state.global_step + 1, state.max_steps)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        changes = seft_step(model, optimizer, state.global_step, total_steps=state.max_steps,
                            adapter_name=self.adapter_name)
        if changes:
            totals = seft_summary(changes)
            self.history.append(dict(step=state.global_step, **totals))
            self._pending_log = {f"seft/{key}": float(value) for key, value in totals.items()}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._pending_log:
            logs.update(self._pending_log)
            self._pending_log = {}
