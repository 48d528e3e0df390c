"""Gradual pruning during SPT's prompt tuning: the plan, Wanda's running norms, ``gradual_prune_step``,
the checkpoint state and ``GradualPruningCallback``.

At every pruning event ``t`` of the config's grid (``SPTConfig.pruning_steps()``) the cubic schedule
gives a global sparsity ``s_t``; every prunable linear ``i`` of the decoder blocks then holds

    Z_i(t) = max(zeros it has now, round(Z_i^final * s_t / s_final))

zeros, where ``Z_i^final`` is its count at the target (uniform: ``round(s_final * numel_i)``; OWL:
its share of the layer allocation; N:M: ``nm_final_zeros``). At ``prune_end_step``
``s_t = s_final``, so every linear ends at exactly ``Z_i^final``. New zeros are chosen among the
still-kept weights only (masks only grow), by the configured pruner:

- ``magnitude``: ``|W|``;
- ``wanda``: ``|W_ij| * ||X_j||``, with ``||X_j||`` from ``calibration`` batches if given (run block by
  block through the model *with its prompts*, as ``sp.prune`` does), else from the running input
  norms (``RunningNorms``) collected during training forwards since the previous pruning event
  (padding tokens included, as the hooks cannot see the attention mask).

Zeros are spread over output rows as evenly as the existing zeros allow (``grow_keep_mask``), which
is exactly Wanda's / row-wise magnitude's per-row rule when the layer starts dense. With
``target_pattern="N:M"`` a new zero goes only to a group of M that has fewer than M - N
(``grow_keep_mask_nm``), so the last event leaves every layer exactly N:M. Both rules live in
``sparse_peft/sparsity/growth.py``.

Who holds what: every ``SPTModel`` has one ``GradualPruning`` (``tuner.gradual_pruning``) with each
adapter's ``PruningPlan`` (the prunable linears, the zeros each ends with, the events applied) and
the ``RunningNorms``. The tuner tells it about new adapters (``add_adapter``), allocation changes
(``replace_plan``) and unloading (``clear``); ``gradual_prune_step``, ``save_pruning_state`` /
``load_pruning_state`` and ``GradualPruningCallback`` reach it with ``gradual_pruning_of(model)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..._distributed import full_tensor, is_sharded, rank
from ...sparsity.bitmask import bits_to_mask, mask_to_bits, packed_row_bytes
from ...sparsity.calibration import block_linears, find_decoder_blocks, run_blockwise
from ...sparsity.growth import grow_keep_mask, grow_keep_mask_nm
from ...sparsity.owl import allocate_zero_counts, outlier_ratio, owl_block_sparsities
from ...sparsity.schedule import cubic_sparsity
from ...sparsity.selection import unstructured_zero_count, write_masked_weight_
from ...sparsity.wanda import InputNormStat, wanda_scores
from .layer import SPTLayer

# --- the plan ---------------------------------------------------------------------------------------


@dataclass
class PruningPlan:
    """Every prunable linear of the decoder blocks and the count of zeros it must end with."""

    linears: dict[str, nn.Linear]
    final_zeros: dict[str, int]
    block_of: dict[str, int]
    done_steps: list[int] = field(default_factory=list)  # pruning events already applied
    # The zeros counted after the last change this plan made (None: count again). Only pruning
    # events and a resumed state change the base during training, so the steps between events
    # need not scan every weight.
    counted_zeros: Optional[dict[str, int]] = None

    def current_zeros(self) -> dict[str, int]:
        """Each linear's zeros, counted once after every change the plan makes (``recount``)."""
        if self.counted_zeros is None:
            # full_tensor: under FSDP a rank holds some rows; the count is summed over the shards.
            self.counted_zeros = {name: int(full_tensor((lin.weight.detach() == 0).sum()))
                                  for name, lin in self.linears.items()}
        return self.counted_zeros

    def recount(self) -> dict[str, int]:
        """Count every linear's zeros again (after the plan changed the weights)."""
        self.counted_zeros = None
        return self.current_zeros()

    @property
    def needs_pruning(self) -> bool:
        """Whether some linear is still short of its final count of zeros."""
        current = self.current_zeros()
        return any(current[name] < self.final_zeros[name] for name in self.linears)


def make_pruning_plan(config, groups, layer_sparsities: dict[int, float]) -> PruningPlan:
    """Final zeros per linear for ``config.target_sparsity`` under its allocation.

    ``groups``: per decoder block, ``(name, linear)`` of the linears pruning acts on.
    A model already at (or above) the target's global count of zeros keeps its topology as it is
    (e.g. one pruned with OWL before SPT). Otherwise every linear gets ``round(s * numel)`` zeros
    (uniform) or its share of the OWL layer sparsities with the global count exactly
    ``round(target * total)`` (the same rule as ``sp.prune(allocation="owl")``).
    """
    linears, block_of = {}, {}
    for index, group in enumerate(groups):
        for name, linear in group:
            linears[name] = linear
            block_of[name] = index
    current = {name: int((lin.weight == 0).sum()) for name, lin in linears.items()}
    numels = {name: lin.weight.numel() for name, lin in linears.items()}
    target = config.target_sparsity
    if target is None:
        return PruningPlan(linears, dict(current), block_of)
    if config.nm_pattern is not None:
        return PruningPlan(linears, nm_final_zeros(linears, config.nm_pattern), block_of)
    total = sum(numels.values())
    target_total = unstructured_zero_count(target, total)
    if sum(current.values()) >= target_total:
        return PruningPlan(linears, dict(current), block_of)
    if config.allocation == "uniform":
        final = {name: unstructured_zero_count(target, n) for name, n in numels.items()}
    else:
        names = list(linears)
        weighted = sum(layer_sparsities[block_of[n]] * numels[n] for n in names) / total
        if abs(weighted - target) > 0.01:
            raise ValueError(f"SPTConfig.layer_sparsities average {weighted:.4f} over the model's weights, not "
                             f"target_sparsity={target}: they must spread the target over the layers")
        counts = allocate_zero_counts([layer_sparsities[block_of[n]] for n in names], [numels[n] for n in names],
                                      target_total)
        final = dict(zip(names, counts))
    over = [f"{name} ({current[name]} zeros > {final[name]})" for name in linears if current[name] > final[name]]
    if over:
        raise ValueError(f"SPT only adds zeros, but these layers are already sparser than their target at "
                         f"target_sparsity={target} (allocation={config.allocation!r}): {', '.join(over[:5])}"
                         f"{' ...' if len(over) > 5 else ''}. Use the allocation the model was pruned with.")
    return PruningPlan(linears, final, block_of)


def nm_final_zeros(linears: dict[str, nn.Linear], pattern: tuple[int, int]) -> dict[str, int]:
    """Zeros per linear at N:M: every group of M consecutive inputs ends with at most N nonzeros, so
    with ``max(M - N, its zeros now)`` zeros. A group may already hold more than M - N zeros (weights
    that are exactly 0 in the dense checkpoint, or an earlier unstructured prune); it is N:M as it is
    and SPT never un-prunes, so those stay."""
    n, m = pattern
    final = {}
    for name, linear in linears.items():
        if linear.weight.shape[1] % m:
            raise ValueError(f"SPT target_pattern {n}:{m}: layer {name!r} has {linear.weight.shape[1]} inputs, "
                             f"not a multiple of {m}")
        zeros_per_group = (linear.weight == 0).reshape(-1, m).sum(dim=1)
        final[name] = int(zeros_per_group.clamp(min=m - n).sum())
    return final


@torch.no_grad()
def owl_layer_sparsities(model: nn.Module, sparsity: float, calibration, owl_threshold: float = 5.0,
                         owl_lambda: float = 0.08, show_progress: bool = True) -> dict[int, float]:
    """OWL's per-decoder-layer sparsities for ``sparsity`` (``{layer index: s_l}``), from the outlier
    ratios of the model as it is (nothing is pruned): pass them to ``SPTConfig(allocation="owl",
    layer_sparsities=...)``. Same rule as ``sp.prune(allocation="owl")`` (see sparsity/owl.py)."""
    ratios: list[float] = []

    def measure_block(index, stats):
        ratios.append(outlier_ratio([wanda_scores(lin.weight, stat) for lin, stat in stats.values()], owl_threshold))

    run_blockwise(model, calibration, lambda lin: InputNormStat(lin.in_features, device=lin.weight.device),
                  measure_block, desc="OWL outlier ratios", show_progress=show_progress)
    groups = block_linears(*find_decoder_blocks(model))
    numels = [sum(lin.weight.numel() for _, lin in group) for group in groups]
    return dict(enumerate(owl_block_sparsities(ratios, numels, float(sparsity), owl_lambda)))


# --- Wanda's running input norms --------------------------------------------------------------------


class _NormHook:
    """Forward hook adding a linear's inputs to its running ``sum x_j^2`` during training forwards."""

    def __init__(self, stat: InputNormStat):
        self.stat = stat

    def __call__(self, module, inputs, output):
        if module.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.stat.add(inputs[0].detach())


class RunningNorms:
    """For Wanda without calibration batches: every pruned linear's running ``sum x_j^2`` over the
    training forwards since the last pruning event (forward hooks that count only when the module
    is training and grad is on). ``stats`` maps a linear's name to its ``InputNormStat``; it is
    empty while no hooks are attached."""

    def __init__(self):
        self.stats: dict[str, InputNormStat] = {}
        self._hook_handles: list = []

    def start(self, linears: dict[str, nn.Linear]) -> None:
        """Attach fresh statistics to ``linears`` (replacing any attached before)."""
        self.stop()
        for name, linear in linears.items():
            stat = InputNormStat(linear.in_features, device=linear.weight.device)
            self.stats[name] = stat
            self._hook_handles.append(linear.register_forward_hook(_NormHook(stat)))

    def reset(self) -> None:
        """Start the statistics afresh (after a pruning event: the next one scores the model as it is now)."""
        for stat in self.stats.values():
            stat.sum_sq.zero_()
            stat.n_tokens = 0

    def stop(self) -> None:
        """Remove the hooks and drop the statistics."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        self.stats = {}

    def collected(self, name: str) -> Optional[InputNormStat]:
        """The statistics of linear ``name``, or None if none were counted since the last reset."""
        stat = self.stats.get(name)
        return stat if stat is not None and stat.n_tokens > 0 else None


# --- the owner --------------------------------------------------------------------------------------


class GradualPruning:
    """An SPT model's gradual pruning: each adapter's ``PruningPlan`` and the ``RunningNorms``.

    Created by ``SPTModel`` (``tuner.gradual_pruning``); ``gradual_pruning_of`` finds it from a
    PeftModel. ``tuner`` is the ``SPTModel``, read for its adapters' configs and its model.
    """

    def __init__(self, tuner: nn.Module):
        self.tuner = tuner
        self.plans: dict[str, PruningPlan] = {}
        self.running_norms = RunningNorms()

    def adapter_name(self, adapter_name: Optional[str] = None) -> str:
        """``adapter_name``, or the tuner's active adapter when None."""
        return adapter_name or self.tuner.active_adapters[0]

    def config(self, adapter_name: Optional[str] = None):
        """The ``SPTConfig`` of ``adapter_name`` (default: the active adapter)."""
        return self.tuner.peft_config[self.adapter_name(adapter_name)]

    def plan(self, adapter_name: Optional[str] = None) -> Optional[PruningPlan]:
        """The plan of ``adapter_name`` (default: the active adapter), None if it does not prune."""
        return self.plans.get(self.adapter_name(adapter_name))

    def require_plan(self, adapter_name: Optional[str] = None) -> tuple[str, PruningPlan]:
        """``(adapter name, plan)``; raises if the adapter does not prune gradually."""
        adapter_name = self.adapter_name(adapter_name)
        plan = self.plans.get(adapter_name)
        if plan is None:
            raise ValueError(f"SPT adapter {adapter_name!r} does not prune gradually (target_sparsity is None, or it "
                             "was loaded for inference): there is no pruning state to save or load")
        return adapter_name, plan

    def add_adapter(self, adapter_name: str, config, groups) -> None:
        """Plan the pruning of a newly injected adapter (``groups`` as for ``make_pruning_plan``), and
        start Wanda's running norms if it prunes with Wanda. An adapter loaded for inference, or
        without ``target_sparsity``, gets no plan."""
        if config.inference_mode or config.target_sparsity is None:
            return
        plan = make_pruning_plan(config, groups, config.layer_sparsities)
        self.plans[adapter_name] = plan
        if plan.needs_pruning and config.pruner == "wanda":
            self.running_norms.start(plan.linears)

    def replace_plan(self, adapter_name: str, plan: PruningPlan) -> None:
        """Use ``plan`` for ``adapter_name`` from now on (a new allocation); the events already
        applied stay applied."""
        previous = self.plans.get(adapter_name, plan)
        plan.done_steps = list(previous.done_steps)
        self.plans[adapter_name] = plan

    def clear(self) -> None:
        """Forget every plan and remove the running-norm hooks (the adapters are unloaded)."""
        self.running_norms.stop()
        self.plans = {}

    def refresh_fingerprints(self) -> None:
        """The masks changed: every SPT layer records the new fingerprint of its q/k/v/o masks."""
        for module in self.tuner.model.modules():
            if isinstance(module, SPTLayer):
                module.refresh_fingerprint()

    def restart_running_norms(self, adapter_name: str) -> None:
        """After a pruning event (or a resumed state) of ``adapter_name``: Wanda's running norms count
        from here on; once the target is reached (or the schedule has ended) no more statistics are
        needed and the hooks go."""
        plan, config = self.plans[adapter_name], self.config(adapter_name)
        self.running_norms.reset()
        if (plan.done_steps and plan.done_steps[-1] >= config.prune_end_step) or not plan.needs_pruning:
            self.running_norms.stop()


def gradual_pruning_of(model: nn.Module) -> GradualPruning:
    """The ``GradualPruning`` of a model with an SPT adapter (the PeftModel or its ``SPTModel``)."""
    owner = getattr(model, "gradual_pruning", None)  # a PeftModel passes attribute look-ups on to its tuner
    if not isinstance(owner, GradualPruning):
        raise TypeError(f"expected a model with an SPT adapter (get_peft_model(model, sp.SPTConfig(...))), "
                        f"got {type(model).__name__}")
    return owner


# --- one pruning step -------------------------------------------------------------------------------


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
    before = keep.numel() - int(torch.count_nonzero(keep))
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
    pruning = gradual_pruning_of(peft_model)
    adapter_name = pruning.adapter_name(adapter_name)
    config = pruning.config(adapter_name)
    plan = pruning.plan(adapter_name)
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
            new_zeros = _prune(pruning, config, plan, targets, to_prune, calibration)
            pruning.refresh_fingerprints()
        plan.done_steps.append(event)
        current = plan.recount()
        pruning.restart_running_norms(adapter_name)
    else:
        sparsity = None
    layers = {name: current[name] / lin.weight.numel() for name, lin in plan.linears.items()} if plan else {}
    numel = sum(lin.weight.numel() for lin in plan.linears.values()) if plan else 0
    measured = sum(current.values()) / numel if numel else 0.0
    return PruneStepReport(step=step, event_step=event if sparsity is not None else None,
                           scheduled_sparsity=sparsity if sparsity is not None else measured,
                           global_sparsity=measured, new_zeros=new_zeros, layers=layers)


def _prune(pruning: GradualPruning, config, plan, targets, to_prune, calibration) -> int:
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
        run_blockwise(pruning.tuner.model, calibration,
                      lambda lin: InputNormStat(lin.in_features, device=lin.weight.device),
                      prune_block, desc="SPT gradual wanda", show_progress=False)
        return pruned[0]
    empty = [name for name in to_prune if pruning.running_norms.collected(name) is None]
    if empty:
        raise ValueError(f"Wanda needs activation norms to prune {sorted(empty)[0]!r}: none were collected since "
                         "the last pruning event. Pass calibration=[token batches] to gradual_prune_step / "
                         "GradualPruningCallback, or run training forwards (model.train()) before this step.")
    # Under data parallelism each rank saw other tokens: sum the norms first so all ranks prune alike.
    return sum(_prune_linear(plan.linears[name],
                             partial(wanda_scores, stat=pruning.running_norms.collected(name).all_reduce_()),
                             targets[name], pattern) for name in sorted(to_prune))


# --- resuming: the pruned base is not in a Trainer checkpoint ------------------------------------------

#: Written next to the adapter in every Trainer checkpoint taken while SPT prunes gradually.
PRUNING_STATE_FILE = "spt_pruning_state.safetensors"
_STATE_FORMAT = "sparse-peft/spt-pruning-state/1"


def _kept_checksum(weight: torch.Tensor, keep: torch.Tensor) -> float:
    """Sum of the kept weights, leaving out the ``finfo.tiny`` stand-ins that pruning writes for kept
    weights that were exactly zero: the same for the original base and for its pruned copy, and
    different for another base (or one pruned further than the saved masks)."""
    tiny = torch.finfo(weight.dtype).tiny
    kept = weight.detach()[keep]
    return float(kept[kept.abs() > tiny].double().sum())


def _pruning_state_tensors(plan: PruningPlan) -> dict[str, torch.Tensor]:
    """Each pruned linear's keep mask (bits) and kept checksum, from the whole (gathered) weight."""
    tensors = {}
    for name, linear in plan.linears.items():
        weight = full_tensor(linear.weight.detach())
        keep = weight != 0
        tensors[f"{name}.keep_bits"] = mask_to_bits(keep).cpu()
        tensors[f"{name}.kept_checksum"] = torch.tensor(_kept_checksum(weight, keep), dtype=torch.float64)
    return tensors


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
    adapter_name, plan = gradual_pruning_of(peft_model).require_plan(adapter_name)
    tensors = _pruning_state_tensors(plan)
    metadata = {"format": _STATE_FORMAT, "adapter": adapter_name, "done_steps": json.dumps(plan.done_steps),
                "final_zeros": json.dumps(plan.final_zeros)}
    path = Path(save_directory) / PRUNING_STATE_FILE
    if rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)
    return path


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
    pruning = gradual_pruning_of(peft_model)
    adapter_name, plan = pruning.require_plan(adapter_name)
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
    pruning.refresh_fingerprints()
    pruning.restart_running_norms(adapter_name)
    return list(plan.done_steps)


# --- the Trainer callback ---------------------------------------------------------------------------


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
        config = gradual_pruning_of(model).config(self.adapter_name)
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
        plan = gradual_pruning_of(model).plan(self.adapter_name)
        if plan is None:
            return
        # Under FSDP gathering the masks is a collective: every rank takes part, rank 0 writes.
        sharded = any(is_sharded(linear.weight) for linear in plan.linears.values())
        if sharded or (state.is_world_process_zero and checkpoint.is_dir()):
            save_pruning_state(model, checkpoint, self.adapter_name)
