"""The SEFT layer: a frozen pruned linear plus a trainable sparse delta whose positions evolve.

State per adapter (all O(|A|) or O(changes), never out x in):
- ``seft_index``: the trainable positions ``A`` (flat, ``|A|`` fixed), ``seft_delta`` their values;
- ``seft_frozen_index`` / ``seft_frozen_delta``: deltas of positions that left ``A`` (they keep
  what they learned) and ``-W`` for re-grown positions that must start at 0;
- ``seft_added`` / ``seft_removed``: how the topology differs from the base's mask (always the same
  count, so the layer's nonzero count never changes).
The base weight is never edited until ``merge``. Positions index the out x in weight row-major, for a
``Conv1D`` base too (read through its transposed view, ``base_view``), so they mean the same for every base.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..._distributed import RowShards, RowShardSum, all_reduce_sum_, full_tensor, set_rows_
from ...sparsity.masks import is_nm_sparse, mask_fingerprint, restore_mask
from .._shared import DerivedMask, adapter_dtype, attach_sparsity_mask, base_view, mask_fingerprints
from .functional import (SparseLayout, coalesce, effective_weight, grow_within_groups, largest, smallest,
                         smallest_per_group, sparse_delta_linear, sparse_layout, without)

# Buffers whose length changes as the topology evolves; loading resizes them to the saved length.
VARIABLE_BUFFERS = ("seft_frozen_index", "seft_frozen_delta", "seft_added", "seft_removed")


class SEFTLayer(DerivedMask, BaseTunerLayer):
    adapter_layer_names = ("seft_delta",)
    other_param_names = ("density", "grow_into", "seft_index", "seft_fingerprint") + VARIABLE_BUFFERS

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.density = {}
        self.grow_into = {}  # adapter name -> "any" (pruned positions may grow) or "kept" (the mask never moves)
        self.seft_delta = nn.ParameterDict({})
        self.seft_index = BufferDict({}, persistent=True)
        self.seft_frozen_index = BufferDict({}, persistent=True)
        self.seft_frozen_delta = BufferDict({}, persistent=True)
        self.seft_added = BufferDict({}, persistent=True)
        self.seft_removed = BufferDict({}, persistent=True)
        self.seft_fingerprint = mask_fingerprints(self)
        self._disable_adapters = False
        self.merged_adapters = []
        # (flat positions, original values) of every base weight the merge changed: unmerge is exact.
        self._merge_backup: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        # Dense gradient accumulated during the steps before a topology update (None otherwise);
        # under FSDP only this rank's rows of it, summed over ranks (``_grad_shard_sum``).
        self.grad_accum: Optional[torch.Tensor] = None
        self._grad_shard_sum: Optional[RowShardSum] = None
        self._row_shards: Optional[RowShards] = None
        self.collecting = False
        self._layouts: dict = {}  # adapter name -> (index tensors, their versions, SparseLayout)
        # (n, m) when the base layer is exactly N:M sparse: topology updates stay inside groups.
        self.nm_pattern: Optional[tuple[int, int]] = None
        attach_sparsity_mask(self, "SEFT", quantized_ok=False)
        self.kwargs = kwargs

    # --- creation -------------------------------------------------------------------------------

    def update_layer(self, adapter_name: str, density: float, init_indices: str = "random", seed: int = 0,
                     grow_into: str = "any", layer_seed: int = 0, inference_mode: bool = False) -> None:
        mask = self.sparsity_mask
        numel, nnz = mask.numel(), int(mask.sum())
        size = max(1, round(density * numel))
        if size > nnz:
            raise ValueError(f"SEFT density={density} asks for {size} trainable positions in a layer with only {nnz} "
                             f"nonzeros of {numel} (sparsity {1 - nnz / numel:.3f}); A starts on nonzeros, so use "
                             f"density <= {nnz / numel:.4f}")
        # An N:M-sparse base keeps its pattern: every re-grown position then switches off a partner
        # in its own group of m (2:4 is checked first: a 2:4 layer is 4:8 too, and 2:4 is stricter).
        # N:M means at most n of every m and about n/m of the weights (a kept weight that is exactly 0
        # in the checkpoint lowers the count a little); an unstructured mask at n/m never fits by chance.
        self.nm_pattern = next(((n, m) for n, m in ((2, 4), (4, 8))
                                if 0.99 * numel * n <= nnz * m <= numel * n and is_nm_sparse(mask, n, m)), None)
        if self.nm_pattern is not None and 2 * size > nnz:
            # With |A| <= nnz / 2 the active positions outside A alone can fill every grown slot, so
            # an update always finds positions that keep each group at N nonzeros.
            n, m = self.nm_pattern
            raise ValueError(f"SEFT density={density} asks for {size} trainable positions in a {n}:{m}-sparse layer "
                             f"with {nnz} nonzeros; keeping the pattern needs at most half of them trainable, "
                             f"so use density <= {nnz / 2 / numel:.4f}")
        if grow_into not in ("any", "kept"):
            raise ValueError(f"SEFT grow_into must be 'any' or 'kept', got {grow_into!r}")
        if grow_into == "kept" and 2 * size > nnz:
            # Growth then picks only nonzeros outside A: with |A| <= nnz / 2 there are always as many as dropped.
            raise ValueError(f"SEFT density={density} with grow_into='kept' asks for {size} trainable positions in a "
                             f"layer with {nnz} nonzeros; growing only into nonzeros needs at most half of them "
                             f"trainable, so use density <= {nnz / 2 / numel:.4f}")
        weight = base_view(self).weight
        device = weight.device
        nonzero = mask.view(-1).nonzero().squeeze(-1)
        if init_indices == "random":
            # Seeded per layer (not from the global RNG) so every rank and every run picks the same set.
            generator = torch.Generator().manual_seed(seed * 1_000_003 + layer_seed)
            chosen = nonzero[torch.randperm(nonzero.numel(), generator=generator)[:size].to(device)]
        elif init_indices == "magnitude":
            magnitude = weight.detach().reshape(-1)[nonzero].abs().float()
            chosen = nonzero[largest(magnitude, size)]
        else:
            raise ValueError(f"SEFT init_indices must be 'random' or 'magnitude', got {init_indices!r}")
        empty_index = torch.zeros(0, dtype=torch.int64, device=device)
        self.density[adapter_name] = float(density)
        self.grow_into[adapter_name] = grow_into
        self.seft_index[adapter_name] = torch.sort(chosen).values.to(torch.int64)
        # Δ in the base dtype; get_peft_model upcasts it to fp32 on a bf16/fp16 base unless asked not to
        # (its updates start far below a bf16 weight's resolution). The frozen deltas stay fp32.
        self.seft_delta[adapter_name] = nn.Parameter(torch.zeros(size, dtype=adapter_dtype(weight), device=device))
        self.seft_frozen_index[adapter_name] = empty_index.clone()
        self.seft_frozen_delta[adapter_name] = torch.zeros(0, dtype=torch.float32, device=device)
        self.seft_added[adapter_name] = empty_index.clone()
        self.seft_removed[adapter_name] = empty_index.clone()
        self.seft_fingerprint[adapter_name] = mask_fingerprint(mask).to(device)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # --- the current state ----------------------------------------------------------------------

    def _active_seft_adapter(self) -> Optional[str]:
        names = [n for n in self.active_adapters if n in self.seft_delta]
        if len(names) > 1:
            raise ValueError(f"SEFT runs one adapter at a time (each moves the layer's topology its own way), "
                             f"but {names} are active; call set_adapter with one of them")
        return names[0] if names else None

    def current_mask(self, adapter_name: str, base_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The adapter's topology ``M`` (bool, out x in, transient); ``base_mask``: the base's mask if
        the caller has it already (derived from a gathered weight)."""
        mask = (self.sparsity_mask if base_mask is None else base_mask).clone()
        flat = mask.view(-1)
        flat[self.seft_added[adapter_name]] = True
        flat[self.seft_removed[adapter_name]] = False
        return mask

    def merge_target_mask(self, adapter_names: Optional[list[str]] = None) -> torch.Tensor:
        """The mask a merge of ``adapter_names`` (default: the active SEFT adapter) ends with: its
        evolved topology, not the base's (``sp.merge_and_unload_sparse`` re-masks with this). In the
        base weight's stored layout (transposed for a ``Conv1D``), as it is compared with that weight."""
        names = [n for n in (adapter_names or self.active_adapters) if n in self.seft_delta]
        if len(names) != 1:
            raise ValueError(f"SEFT merges one adapter per layer, got {names}")
        return base_view(self).to_stored(self.current_mask(names[0]))

    def unmerged_base_weight(self) -> torch.Tensor:
        """The base weight without the merged adapter (a merge moves SEFT's topology; the backup undoes
        it), out x in (a ``Conv1D``'s is a transposed view)."""
        weight = base_view(self).weight
        if not self.merged:
            return weight
        original = weight.detach().clone(memory_format=torch.contiguous_format)  # row-major for the flat positions
        positions, values = self._merge_backup
        original.view(-1)[positions] = values
        return original

    def effective_weight(self, adapter_name: str, base_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(W + F + Δ) ⊙ M`` (fp32): the weight this adapter makes (what merge writes). Under FSDP the
        weight and ``Δ`` are gathered (every rank must call it); ``base_weight``: the whole unmerged
        base weight if the caller has gathered it already."""
        if base_weight is None:
            base_weight = full_tensor(self.unmerged_base_weight().detach())
        return effective_weight(base_weight, self.seft_index[adapter_name],
                                full_tensor(self.seft_delta[adapter_name].detach()),
                                self.seft_frozen_index[adapter_name], self.seft_frozen_delta[adapter_name],
                                self.seft_removed[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W_eff - W`` (fp32, transient, out x in): what merging this adapter adds to the base weight
        (for a ``Conv1D`` base, its transpose)."""
        base_weight = full_tensor(self.unmerged_base_weight().detach())
        return self.effective_weight(adapter_name, base_weight) - base_weight.float()

    def layout(self, adapter_name: str) -> SparseLayout:
        """Where the adapter's changes sit (``sparse_layout``), kept until an index set changes (a
        topology update, a load): sorting them on every forward would cost more than the rest of it."""
        index_sets = (self.seft_frozen_index[adapter_name], self.seft_index[adapter_name],
                      self.seft_removed[adapter_name])
        versions = tuple(t._version for t in index_sets)
        cached = self._layouts.get(adapter_name)
        # The cache holds the index tensors themselves: the same objects at the same versions (no
        # in-place change, no replacement) mean the same topology.
        if cached is None or any(a is not b for a, b in zip(cached[0], index_sets)) or cached[1] != versions:
            cached = (index_sets, versions, sparse_layout(*index_sets, (self.out_features, self.in_features)))
            self._layouts[adapter_name] = cached
        return cached[2]

    # --- dense gradient for growing ---------------------------------------------------------------

    def accumulate_rows(self, start: int, stop: int, grad_rows: torch.Tensor) -> None:
        """Add one block of rows of the dense weight gradient (called by the backward while collecting).

        The accumulator has the base weight's dtype (at least bf16 precision is enough to rank
        positions by |gradient|): one weight-sized tensor per layer from the first collecting
        backward until the topology update frees it. Under FSDP each rank keeps the rows of its own
        shard, summed over ranks as they come (the whole gradient would be out x in on every rank).
        """
        if self._row_shards is not None:
            if self._grad_shard_sum is None:
                dtype = self.get_base_layer().weight.dtype
                self._grad_shard_sum = RowShardSum(self._row_shards, self.in_features, dtype, grad_rows.device)
                self.grad_accum = self._grad_shard_sum.local
            self._grad_shard_sum.add(start, stop, grad_rows)
            return
        if self.grad_accum is None:  # out x in, as the flat positions
            weight = self.get_base_layer().weight
            self.grad_accum = torch.zeros(self.out_features, self.in_features, dtype=weight.dtype, device=weight.device)
        self.grad_accum[start:stop] += grad_rows.to(self.grad_accum.dtype)

    def start_collecting(self) -> None:
        # Called between steps, where FSDP's parameters are sharded: the backward (which sees the
        # gathered weight) learns here which rows this rank owns.
        self._row_shards = RowShards.of(base_view(self).weight, "SEFT")
        self.collecting = True

    def stop_collecting(self) -> None:
        self.collecting = False
        self.grad_accum = None
        self._grad_shard_sum = None

    def sum_grad_accum_over_ranks(self) -> None:
        """Sum ``grad_accum`` over data-parallel ranks (DDP: each rank holds its own batch's gradient).
        Under FSDP the backward summed each shard's rows already."""
        if self._grad_shard_sum is None and self.grad_accum is not None:
            all_reduce_sum_(self.grad_accum)

    def _whole_grad_accum(self) -> torch.Tensor:
        """The accumulated gradient of the whole layer (under FSDP gathered from the shards: transient)."""
        return self.grad_accum if self._grad_shard_sum is None else self._grad_shard_sum.full()

    # --- topology update ------------------------------------------------------------------------

    def update_topology(self, adapter_name: str, drop_fraction: float, drop_criterion: str = "weight",
                        sensitivity_criterion: str = "taylor", regrow_init: str = "zero",
                        optimizer: Optional[torch.optim.Optimizer] = None, grad_scale: float = 1.0) -> dict:
        """Drop ``drop_fraction`` of ``A``, grow as many at the largest accumulated gradient, and prune
        one active weight outside ``A`` per re-grown pruned position. Returns the counts.

        Requires ``grad_accum`` (collected by the backward while ``collecting``); under data
        parallelism the caller sums it over ranks first (``sum_grad_accum_over_ranks``) so every rank
        decides the same. Under FSDP the decision is made on the whole layer, gathered on every rank
        (weight, ``Δ`` and gradient: transient, one layer at a time), and each rank writes back the
        part of ``Δ`` and of its optimizer state it holds.
        """
        if self.merged:
            raise RuntimeError("SEFT cannot change the topology of a merged layer; unmerge first")
        if self.grad_accum is None:
            raise RuntimeError("SEFT topology update without an accumulated gradient: no backward ran while "
                               "collecting (call sp.seft_step after every optimizer.step, or use SEFTCallback)")
        index, delta = self.seft_index[adapter_name], self.seft_delta[adapter_name]
        size = index.numel()
        n_drop = min(size, int(round(drop_fraction * size)))
        counts = dict(dropped=n_drop, grown=n_drop, regrown=0, pruned=0)
        if n_drop == 0:
            return counts
        # The accumulator as it is (in the base dtype): |gradient| ranks the same in any float dtype that
        # holds it, and the Taylor sensitivity below is formed in fp32. A whole-layer fp32 copy
        # (4 bytes a weight) is made only to scale it.
        grad = self._whole_grad_accum().reshape(-1)
        if grad_scale != 1.0:
            grad = grad.float() * grad_scale
        base_weight = full_tensor(self.unmerged_base_weight().detach())
        delta_values = full_tensor(delta.detach())
        weight = self.effective_weight(adapter_name, base_weight).view(-1)
        mask = self.current_mask(adapter_name, (base_weight != 0).contiguous()).view(-1)

        # 1. drop: these slots stop training; their positions keep what they learned (frozen delta).
        if drop_criterion == "weight":
            drop_score = weight[index].abs()
        elif drop_criterion == "delta":
            drop_score = delta_values.abs()
        else:
            raise ValueError(f"SEFT drop_criterion must be 'weight' or 'delta', got {drop_criterion!r}")
        drop_slots = smallest(drop_score, n_drop)
        dropped = index[drop_slots]
        frozen_index = torch.cat([self.seft_frozen_index[adapter_name], dropped])
        frozen_delta = torch.cat([self.seft_frozen_delta[adapter_name], delta_values[drop_slots].float()])

        # 2. grow at the largest |gradient| outside A (the just-dropped in A: no flip-flop); "kept": at nonzeros only
        grow_score = grad.abs()
        kept_only = self.grow_into[adapter_name] == "kept"
        if self.nm_pattern is None or kept_only:
            grow_score[index] = -1.0
            grow_score.masked_fill_(~mask & kept_only, -1.0)
            grown = largest(grow_score, n_drop)
        else:
            grow_score[index] = float("-inf")
            staying = index[torch.ones_like(index, dtype=torch.bool).index_fill_(0, drop_slots, False)]
            grown = grow_within_groups(grow_score, mask, staying, n_drop, self.nm_pattern[1])
        regrown = grown[~mask[grown]]  # pruned positions coming back
        del grow_score  # a weight-sized transient: freed before the sensitivity is formed

        # 3. keep the count: prune one active weight outside the new A per re-grown position.
        new_index = index.clone()
        new_index[drop_slots] = grown
        pruned = regrown.new_zeros(0)
        if regrown.numel():
            pruned = self._least_sensitive(regrown, weight, grad, mask, new_index, sensitivity_criterion)
            # A re-grown position starts at exactly 0: cancel whatever W + F holds there.
            frozen_index, frozen_delta = without(frozen_index, frozen_delta, torch.cat([regrown, pruned]))
            original = base_weight.reshape(-1)
            cancel = -original[regrown].float()
            frozen_index = torch.cat([frozen_index, regrown[cancel != 0]])
            frozen_delta = torch.cat([frozen_delta, cancel[cancel != 0]])
            self._move_topology(adapter_name, switch_on=regrown, switch_off=pruned)
        frozen_index, frozen_delta = coalesce(frozen_index, frozen_delta)
        self.seft_frozen_index[adapter_name] = frozen_index
        self.seft_frozen_delta[adapter_name] = frozen_delta

        # 4. the slots take their new positions; their values and optimizer moments start over.
        with torch.no_grad():
            index.copy_(new_index)
            set_rows_(delta, drop_slots, 0.0)  # under FSDP each rank holds some of the slots
        if optimizer is not None:
            grown_grad = grad[grown].float() if regrow_init == "gradient" else None
            reset_optimizer_slots(optimizer, delta, drop_slots, grown_grad)
        counts.update(regrown=int(regrown.numel()), pruned=int(pruned.numel()))
        return counts

    def _least_sensitive(self, regrown: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor,
                         new_index: torch.Tensor, criterion: str) -> torch.Tensor:
        """The active positions outside the new ``A`` to switch off, one per re-grown position: the
        least sensitive (``|w · g|`` or ``|w|``), in the re-grown positions' own groups when N:M."""
        if criterion == "taylor":
            sensitivity = (weight * grad).abs_()  # weight is fp32 (or wider): so is the product
        elif criterion == "magnitude":
            sensitivity = weight.abs()
        else:
            raise ValueError(f"SEFT sensitivity_criterion must be 'taylor' or 'magnitude', got {criterion!r}")
        sensitivity.masked_fill_(~mask, float("inf"))
        sensitivity[new_index] = float("inf")
        if self.nm_pattern is None:
            # |A| <= nnz, so at least as many active positions lie outside the new A as were re-grown.
            return smallest(sensitivity, regrown.numel())
        # The partners are in the re-grown positions' own groups (grow_within_groups made room).
        m = self.nm_pattern[1]
        need = torch.bincount(regrown // m, minlength=mask.numel() // m)
        pruned = smallest_per_group(sensitivity, need, m)
        if not bool(torch.isfinite(sensitivity[pruned]).all()):
            raise RuntimeError(f"SEFT {self.nm_pattern[0]}:{m} update found no partner to switch off "
                               f"in a group (a bug: grow_within_groups guarantees one)")
        return pruned

    def _move_topology(self, adapter_name: str, switch_on: torch.Tensor, switch_off: torch.Tensor) -> None:
        """Record positions switched on / off relative to the base mask (equal counts)."""
        added, removed = self.seft_added[adapter_name], self.seft_removed[adapter_name]
        back_on = torch.isin(switch_on, removed)  # removed earlier, now back: simply not removed any more
        removed, _ = without(removed, None, switch_on[back_on])
        added = torch.cat([added, switch_on[~back_on]])
        back_off = torch.isin(switch_off, added)
        added, _ = without(added, None, switch_off[back_off])
        removed = torch.cat([removed, switch_off[~back_off]])
        self.seft_added[adapter_name] = torch.sort(added).values
        self.seft_removed[adapter_name] = torch.sort(removed).values


def reset_optimizer_slots(optimizer: torch.optim.Optimizer, param: torch.Tensor, slots: torch.Tensor,
                          grad: Optional[torch.Tensor] = None) -> None:
    """Reset the optimizer state of ``param[slots]`` (they now stand for other positions).

    Tensors in the state shaped like ``param`` (Adam's moments, momentum buffers) are zeroed at the
    slots, or, with ``grad``, set as if one step had seen that gradient (Adam: m = (1-β1) g,
    v = (1-β2) g²). Scalars such as Adam's step count are shared by the tensor and left alone.
    """
    state = optimizer.state.get(param)
    if not state:
        return
    betas = next((group.get("betas") for group in optimizer.param_groups
                  if any(p is param for p in group["params"])), None)
    for key, value in state.items():
        if not torch.is_tensor(value) or value.shape != param.shape:
            continue
        # set_rows_: under FSDP the state is sharded like the parameter, each rank writes its slots.
        if grad is not None and betas is not None and key == "exp_avg":
            set_rows_(value, slots, ((1 - betas[0]) * grad).to(value.dtype))
        elif grad is not None and betas is not None and key == "exp_avg_sq":
            set_rows_(value, slots, ((1 - betas[1]) * grad.square()).to(value.dtype))
        else:
            set_rows_(value, slots, 0)


class Linear(nn.Module, SEFTLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, density: float = 0.02, init_indices: str = "random",
                 seed: int = 0, grow_into: str = "any", layer_seed: int = 0, **kwargs) -> None:
        super().__init__()
        SEFTLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, density, init_indices, seed, grow_into=grow_into, layer_seed=layer_seed)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """``W ← restore_mask((W + F + Δ) ⊙ M, M)``: exactly the topology's count of nonzeros."""
        adapter_names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.seft_delta]
        if not adapter_names:
            return
        if len(adapter_names) > 1 or self.merged:
            raise ValueError(f"SEFT merges one adapter per layer (each has its own topology); asked to merge "
                             f"{adapter_names} with {self.merged_adapters} already merged")
        name = adapter_names[0]
        weight = base_view(self).weight  # out x in view: copy_ below writes the stored weight in place
        merged = self.effective_weight(name)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs or infs in the merged weights: adapter {name!r} seems to be broken")
        mask = self.current_mask(name)
        # Every position the merge may change: A, frozen deltas and the topology's switches.
        changed = torch.unique(torch.cat([self.seft_index[name], self.seft_frozen_index[name],
                                          self.seft_added[name], self.seft_removed[name]]))
        self._merge_backup = (changed, weight.detach().reshape(-1)[changed].clone())
        with torch.no_grad():
            weight.copy_(restore_mask(merged.to(weight.dtype), mask))
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        positions, values = self._merge_backup
        with torch.no_grad():
            # (row, column) of the out x in view: writes through to a Conv1D's transposed storage too.
            base_view(self).weight[positions // self.in_features, positions % self.in_features] = values
        self.merged_adapters.clear()
        self._merge_backup = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        name = self._active_seft_adapter()
        if self.merged or name is None:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        result = sparse_delta_linear(x, self.seft_delta[name], base_view(self).weight, self.seft_index[name],
                                     self.seft_frozen_index[name], self.seft_frozen_delta[name],
                                     self.seft_removed[name], self if self.training else None, self.layout(name))
        if base.bias is not None:
            result = result + base.bias.to(result.dtype)
        return result

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def __repr__(self) -> str:
        return "seft." + super().__repr__()
