"""Gradual pruning during SPT's prompt tuning: ``gradual_prune_step`` and ``GradualPruningCallback``.

At every pruning event ``t`` of the config's grid (``SPTConfig.pruning_steps()``) the cubic schedule
gives a global sparsity ``s_t``; every prunable linear ``i`` of the decoder blocks then holds

    Z_i(t) = max(zeros it has now, round(Z_i^final * s_t / s_final))

zeros, where ``Z_i^final`` is its count at the target (uniform: ``round(s_final * numel_i)``; OWL:
its share of the layer allocation). At ``prune_end_step`` ``s_t = s_final``, so every linear ends at
exactly ``Z_i^final``. New zeros are chosen among the still-kept weights only (masks only grow),
by the configured pruner:

- ``magnitude``: ``|W|``;
- ``wanda``: ``|W_ij| * ||X_j||``, with ``||X_j||`` from ``calibration`` batches if given (run block by
  block through the model *with its prompts*, as ``sp.prune`` does), else from the running input
  norms the tuner collects during training forwards since the previous pruning event (padding
  tokens included, as the hooks cannot see the attention mask).

Zeros are spread over output rows as evenly as the existing zeros allow (``grow_keep_mask``), which
is exactly Wanda's / row-wise magnitude's per-row rule when the layer starts dense. With
``target_pattern="N:M"`` a new zero goes only to a group of M that has fewer than M - N
(``grow_keep_mask_nm``), so the last event leaves every layer exactly N:M. Both rules live in
``sparse_peft/sparsity/growth.py``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from functools import partial
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .._distributed import full_tensor, is_sharded, rank
from ..sparsity.bitmask import bits_to_mask, mask_to_bits, packed_row_bytes
from ..sparsity.calibration import run_blockwise
from ..sparsity.growth import grow_keep_mask, grow_keep_mask_nm
from ..sparsity.owl import outlier_ratio, owl_block_sparsities
from ..sparsity.schedule import cubic_sparsity
from ..sparsity.selection import write_masked_weight_
from ..sparsity.wanda import InputNormStat, wanda_scores
from ..tuners.spt.layer import SPTLayer
from ..tuners.spt.model import spt_tuner


@dataclass
class PruneStepReport:
    """What ``gradual_prune_step`` did at one call."""

    step: int
    event_step: Optional[int]  # the pruning event applied (the latest one <= step), None if none
    scheduled_sparsity: float  # s_t of the schedule at event_step (the model's sparsity if none)
    global_sparsity: float  # measured over the prunable linears after this call
    new_zeros: int  # weights pruned by this call
    layers: dict[str, float] = field(default_factory=dict)  # linear name -> sparsity after this call

    @property
    def pruned(self) -> bool:
        return self.new_zeros > 0


def _scheduled(config, event_step: int) -> float:
    return cubic_sparsity(event_step, config.prune_end_step - config.prune_start_step, config.target_sparsity,
                          config.initial_sparsity, start_step=config.prune_start_step)


def _targets(plan, current: dict[str, int], sparsity: float, final_sparsity: float) -> dict[str, int]:
    if sparsity >= final_sparsity:
        return {name: max(current[name], plan.final_zeros[name]) for name in plan.linears}
    fraction = sparsity / final_sparsity
    return {name: max(current[name], int(plan.final_zeros[name] * fraction + 0.5)) for name in plan.linears}


@torch.no_grad()
def _prune_linear(linear: nn.Linear, score: Callable[[torch.Tensor], torch.Tensor], n_zeros: int,
                  pattern: Optional[tuple[int, int]] = None) -> int:
    """Prune ``linear`` to ``n_zeros`` zeros by ``score(weight)`` (lowest first).

    The rule spreads zeros over all rows of the layer, so under FSDP the weight is gathered (every
    rank calls this for the same layers in the same order), every rank computes the same mask, and
    each writes back its own rows: one whole layer is transient at a time.
    """
    weight = full_tensor(linear.weight.detach())
    keep = weight != 0
    before = int((~keep).sum())
    scores = score(weight)
    new_keep = grow_keep_mask(scores, keep, n_zeros) if pattern is None else grow_keep_mask_nm(
        scores, keep, n_zeros, *pattern)
    write_masked_weight_(linear, new_keep, weight)
    return n_zeros - before


def gradual_prune_step(peft_model: nn.Module, step: int, calibration=None,
                       adapter_name: Optional[str] = None) -> PruneStepReport:
    """Apply SPT's gradual pruning schedule at optimizer step ``step`` (call it after each step).

    Prunes when the latest pruning event ``<= step`` has not been applied yet (so skipped calls catch
    up, and any call at or after ``prune_end_step`` leaves the model exactly at the target).
    ``calibration``: token batches for Wanda's activation norms (as in ``sp.prune``); without it Wanda
    uses the norms collected during training forwards since the last pruning event.
    Returns a ``PruneStepReport`` (``new_zeros == 0`` when nothing was due).
    """
    tuner = spt_tuner(peft_model)
    adapter_name = adapter_name or tuner.active_adapters[0]
    config = tuner.peft_config[adapter_name]
    plan = tuner.pruning_plans.get(adapter_name)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    current = plan.current_zeros() if plan is not None else {}
    due = [t for t in config.pruning_steps() if t <= step] if plan is not None else []
    event = due[-1] if due else None
    new_zeros = 0
    if event is not None and event not in plan.done_steps:
        sparsity = _scheduled(config, event)
        targets = _targets(plan, current, sparsity, config.target_sparsity)
        to_prune = {name for name in plan.linears if targets[name] > current[name]}
        if to_prune:
            new_zeros = _prune(tuner, config, plan, targets, to_prune, calibration)
            _refresh_fingerprints(tuner)
        plan.done_steps.append(event)
        current = plan.recount()
        _restart_running_norms(tuner, config, plan)
    else:
        sparsity = None
    layers = {name: current[name] / lin.weight.numel() for name, lin in plan.linears.items()} if plan else {}
    numel = sum(lin.weight.numel() for lin in plan.linears.values()) if plan else 0
    measured = sum(current.values()) / numel if numel else 0.0
    return PruneStepReport(step=step, event_step=event if sparsity is not None else None,
                           scheduled_sparsity=sparsity if sparsity is not None else measured,
                           global_sparsity=measured, new_zeros=new_zeros, layers=layers)


def _refresh_fingerprints(tuner) -> None:
    """The masks changed: every SPT layer records the new fingerprint of its q/k/v/o masks."""
    for module in tuner.model.modules():
        if isinstance(module, SPTLayer):
            module.refresh_fingerprint()


def _restart_running_norms(tuner, config, plan) -> None:
    """Wanda's running norms count from the last pruning event on; once the target is reached
    (or the schedule has ended) no more statistics are needed and the hooks go."""
    tuner.reset_running_norms()
    if (plan.done_steps and plan.done_steps[-1] >= config.prune_end_step) or not plan.needs_pruning:
        tuner._stop_running_norms()


def _prune(tuner, config, plan, targets, to_prune, calibration) -> int:
    pattern = config.nm_pattern
    if config.pruner == "magnitude":
        return sum(_prune_linear(plan.linears[name], lambda weight: weight.abs().float(), targets[name], pattern)
                   for name in sorted(to_prune))
    if calibration is not None:
        by_module = {id(linear): name for name, linear in plan.linears.items()}
        pruned = [0]

        def prune_block(index, stats):
            for linear, stat in stats.values():
                name = by_module.get(id(linear))
                if name in to_prune:
                    pruned[0] += _prune_linear(linear, partial(wanda_scores, stat=stat), targets[name], pattern)

        # Block-sequential as in sp.prune: block k is scored on the outputs of the already pruned blocks
        # before it, with the prompts in place (they are part of the model being pruned).
        run_blockwise(tuner.model, calibration, lambda lin: InputNormStat(lin.in_features, device=lin.weight.device),
                      prune_block, desc="SPT gradual wanda", show_progress=False)
        return pruned[0]
    empty = [name for name in to_prune if tuner.running_norms.get(name) is None
             or tuner.running_norms[name].n_tokens == 0]
    if empty:
        raise ValueError(f"Wanda needs activation norms to prune {sorted(empty)[0]!r}: none were collected since "
                         "the last pruning event. Pass calibration=[token batches] to gradual_prune_step / "
                         "GradualPruningCallback, or run training forwards (model.train()) before this step.")
    # Under data parallelism each rank saw other tokens: sum the norms first so all ranks prune alike.
    return sum(_prune_linear(plan.linears[name], partial(wanda_scores, stat=tuner.running_norms[name].all_reduce_()),
                             targets[name], pattern) for name in sorted(to_prune))


@torch.no_grad()
def owl_layer_sparsities(model: nn.Module, sparsity: float, calibration, owl_threshold: float = 5.0,
                         owl_lambda: float = 0.08, show_progress: bool = True) -> dict[int, float]:
    """OWL's per-decoder-layer sparsities for ``sparsity`` (``{layer index: s_l}``), from the outlier
    ratios of the model as it is (nothing is pruned): pass them to ``SPTConfig(allocation="owl",
    layer_sparsities=...)``. Same rule as ``sp.prune(allocation="owl")`` (see sparsity/owl.py)."""
    from ..sparsity.calibration import block_linears, find_decoder_blocks

    ratios: list[float] = []

    def measure_block(index, stats):
        ratios.append(outlier_ratio([wanda_scores(lin.weight, stat) for lin, stat in stats.values()], owl_threshold))

    run_blockwise(model, calibration, lambda lin: InputNormStat(lin.in_features, device=lin.weight.device),
                  measure_block, desc="OWL outlier ratios", show_progress=show_progress)
    groups = block_linears(*find_decoder_blocks(model))
    numels = [sum(lin.weight.numel() for _, lin in group) for group in groups]
    return dict(enumerate(owl_block_sparsities(ratios, numels, float(sparsity), owl_lambda)))


# --- resuming: the pruned base is not in a Trainer checkpoint ------------------------------------------

#: Written next to the adapter in every Trainer checkpoint taken while SPT prunes gradually.
PRUNING_STATE_FILE = "spt_pruning_state.safetensors"
_STATE_FORMAT = "sparse-peft/spt-pruning-state/1"


def _pruning_plan(peft_model, adapter_name: Optional[str]):
    tuner = spt_tuner(peft_model)
    adapter_name = adapter_name or tuner.active_adapters[0]
    plan = tuner.pruning_plans.get(adapter_name)
    if plan is None:
        raise ValueError(f"SPT adapter {adapter_name!r} does not prune gradually (target_sparsity is None, or it was "
                         "loaded for inference): there is no pruning state to save or load")
    return tuner, adapter_name, plan


def _kept_checksum(weight: torch.Tensor, keep: torch.Tensor) -> float:
    """Sum of the kept weights, leaving out the ``finfo.tiny`` stand-ins that pruning writes for kept
    weights that were exactly zero: the same for the original base and for its pruned copy, and
    different for another base (or one pruned further than the saved masks)."""
    tiny = torch.finfo(weight.dtype).tiny
    kept = weight.detach()[keep]
    return float(kept[kept.abs() > tiny].double().sum())


def save_pruning_state(peft_model: nn.Module, save_directory: str | os.PathLike,
                       adapter_name: Optional[str] = None) -> Path:
    """Save what SPT's gradual pruning has done so far: the keep-mask of every linear it prunes (one
    bit per weight), the pruning events applied and each linear's final count of zeros.

    ``save_pretrained`` (and so every Trainer checkpoint) holds the prompts only, and gradual pruning
    changes the base model; ``load_pruning_state`` re-applies these masks to a fresh copy of the model
    the run started from, so training can resume. ``GradualPruningCallback`` writes this file into
    every checkpoint by itself. Returns the file's path.

    Under FSDP the masks are gathered from the shards: call it on every rank; rank 0 writes the file.
    """
    _, adapter_name, plan = _pruning_plan(peft_model, adapter_name)
    tensors = _pruning_state_tensors(plan)
    metadata = {"format": _STATE_FORMAT, "adapter": adapter_name, "done_steps": json.dumps(plan.done_steps),
                "final_zeros": json.dumps(plan.final_zeros)}
    path = Path(save_directory) / PRUNING_STATE_FILE
    if rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)
    return path


def _pruning_state_tensors(plan) -> dict[str, torch.Tensor]:
    """Each pruned linear's keep mask (bits) and kept checksum, from the whole (gathered) weight."""
    tensors = {}
    for name, linear in plan.linears.items():
        weight = full_tensor(linear.weight.detach())
        keep = weight != 0
        tensors[f"{name}.keep_bits"] = mask_to_bits(keep).cpu()
        tensors[f"{name}.kept_checksum"] = torch.tensor(_kept_checksum(weight, keep), dtype=torch.float64)
    return tensors


@torch.no_grad()
def load_pruning_state(peft_model: nn.Module, directory: str | os.PathLike,
                       adapter_name: Optional[str] = None) -> list[int]:
    """Re-apply a saved pruning state (``save_pruning_state``; a Trainer checkpoint of a run with
    ``GradualPruningCallback``) to ``peft_model``, built on a fresh copy of the model that run started
    from with the same ``SPTConfig``. Call it before ``trainer.train(resume_from_checkpoint=directory)``:

        peft_model = get_peft_model(fresh_model, config)
        sp.load_pruning_state(peft_model, "out/checkpoint-300")
        trainer.train(resume_from_checkpoint="out/checkpoint-300")

    Every linear is checked first (the same layers and shapes, the same final counts of zeros, and the
    kept weights equal to the ones the masks were made on); on any mismatch it raises, naming the
    layer, and changes nothing. Then the masks are written (pruned weights become exact zeros) and
    the events already applied are marked done, so the next event is the first one after the
    checkpoint. Wanda's running input norms start afresh from the resumed forwards. Returns the
    events applied before the checkpoint.
    """
    tuner, adapter_name, plan = _pruning_plan(peft_model, adapter_name)
    path = Path(directory)
    path = path / PRUNING_STATE_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no SPT pruning state at {path} (GradualPruningCallback writes {PRUNING_STATE_FILE} "
                                "into each checkpoint it sees saved; sp.save_pruning_state writes one by hand)")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != _STATE_FORMAT:
            raise ValueError(f"{path} is not an SPT pruning state (format {metadata.get('format')!r}, expected "
                             f"{_STATE_FORMAT!r})")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    saved_names = {key.rsplit(".", 1)[0] for key in tensors}
    if saved_names != set(plan.linears):
        missing, extra = sorted(set(plan.linears) - saved_names), sorted(saved_names - set(plan.linears))
        raise ValueError(f"the pruning state in {path} is for other layers: "
                         + (f"it has no mask for {missing[0]!r}" if missing else f"{extra[0]!r} is not in this model"))
    saved_final = json.loads(metadata["final_zeros"])
    keeps = {}
    for name, linear in plan.linears.items():
        out_features, in_features = linear.weight.shape
        bits = tensors[f"{name}.keep_bits"]
        if tuple(bits.shape) != (out_features, packed_row_bytes(in_features)):
            raise ValueError(f"{name}: the saved mask is for a weight of another shape (bits {tuple(bits.shape)}, "
                             f"this weight is {out_features}x{in_features})")
        if saved_final[name] != plan.final_zeros[name]:
            raise ValueError(f"{name}: the saved run prunes it to {saved_final[name]} zeros, this SPTConfig to "
                             f"{plan.final_zeros[name]}: resume with the config the run started with")
        keep = bits_to_mask(bits, in_features).to(linear.weight.device)
        saved_sum = float(tensors[f"{name}.kept_checksum"])
        here = _kept_checksum(linear.weight, keep)
        if abs(here - saved_sum) > 1e-9 * max(1.0, abs(saved_sum)):
            raise ValueError(f"{name}: the kept weights sum to {here!r} here but {saved_sum!r} in {path}: this is not "
                             "the model the run started from (load a fresh copy of that base model)")
        keeps[name] = keep
    for name, keep in keeps.items():
        write_masked_weight_(plan.linears[name], keep)
    plan.done_steps = json.loads(metadata["done_steps"])
    plan.recount()
    _refresh_fingerprints(tuner)
    _restart_running_norms(tuner, tuner.peft_config[adapter_name], plan)
    return list(plan.done_steps)


class GradualPruningCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that runs ``gradual_prune_step`` at the start of training and
    after every optimizer step, so the prompts train against the sparsity the model has at each step.

    Args:
        calibration: token batches for Wanda's norms (default: running norms from training forwards).
        adapter_name: the SPT adapter whose config holds the schedule (default: the active one).

    ``history`` keeps the ``PruneStepReport`` of every call that pruned. Training that stops before
    ``prune_end_step`` would leave the model short of the target, so it is refused at the start.
    Each checkpoint the Trainer saves also gets the pruning state (``PRUNING_STATE_FILE``): resume
    with ``sp.load_pruning_state(peft_model, checkpoint)`` before ``trainer.train(resume_from_checkpoint=...)``.
    """

    def __init__(self, calibration=None, adapter_name: Optional[str] = None):
        self.calibration = calibration
        self.adapter_name = adapter_name
        self.history: list[PruneStepReport] = []

    def _step(self, model, step: int) -> None:
        report = gradual_prune_step(model, step, calibration=self.calibration, adapter_name=self.adapter_name)
        if report.pruned:
            self.history.append(report)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tuner = spt_tuner(model)
        config = tuner.peft_config[self.adapter_name or tuner.active_adapters[0]]
        if config.target_sparsity is not None and state.max_steps and state.max_steps < config.prune_end_step:
            raise ValueError(f"SPTConfig.prune_end_step={config.prune_end_step} is after the last training step "
                             f"(max_steps={state.max_steps}): the model would not reach target_sparsity="
                             f"{config.target_sparsity}. Lower prune_end_step or train longer.")
        self._step(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._step(model, state.global_step)

    def on_save(self, args, state, control, model=None, **kwargs):
        # The checkpoint holds the prompts, not the pruned base: without the masks it cannot resume.
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        tuner = spt_tuner(model)
        adapter_name = self.adapter_name or tuner.active_adapters[0]
        if adapter_name not in tuner.pruning_plans:
            return
        # Under FSDP gathering the masks is a collective: every rank takes part, rank 0 writes.
        sharded = any(is_sharded(linear.weight) for linear in tuner.pruning_plans[adapter_name].linears.values())
        if sharded or (state.is_world_process_zero and checkpoint.is_dir()):
            save_pruning_state(model, checkpoint, adapter_name)
