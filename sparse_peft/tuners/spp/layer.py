"""The SPP layer: ``y = x Wᵀ + α · dropout(x) (R(A) ⊙ b ⊙ W)ᵀ`` on a frozen pruned linear."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...sparsity.masks import mask_fingerprint, restore_mask
from .._shared import DerivedMask, adapter_dtype, attach_sparsity_mask, base_view, fuses_base, mask_fingerprints
from .functional import merge_factor, spp_delta_weight
from ... import ops


class SPPLayer(DerivedMask, BaseTunerLayer):
    adapter_layer_names = ("spp_A", "spp_b")
    # spp_fingerprint is saved with the adapter so loading onto a base with another mask fails loudly.
    other_param_names = ("r", "alpha", "unmerge_backup_below", "spp_dropout", "spp_fingerprint")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r = {}
        self.alpha = {}
        self.unmerge_backup_below = {}
        self.spp_dropout = nn.ModuleDict({})
        self.spp_A = nn.ParameterDict({})
        self.spp_b = nn.ParameterDict({})
        self.spp_fingerprint = mask_fingerprints(self)
        self._disable_adapters = False
        self.merged_adapters = []
        # (flat indices, original values) of the weights whose merge factor was ~0 at the last merge;
        # unmerge puts those back exactly instead of dividing by ~0.
        self._merge_backup: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        attach_sparsity_mask(self, "SPP")
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, r: int, alpha: float, dropout: float = 0.0, init_A: str = "kaiming",
                     init_b_zero: bool = True, unmerge_backup_below: float = 1e-3,
                     inference_mode: bool = False) -> None:
        if r <= 0:
            raise ValueError(f"SPP r must be a positive integer, got {r!r}")
        # More rows of A than output rows would leave rows of A that no output row reads (they get no
        # gradient); one row of A per output row is already the finest grouping, so use that.
        r = min(r, self.out_features)
        self.r[adapter_name] = r
        self.alpha[adapter_name] = float(alpha)
        self.unmerge_backup_below[adapter_name] = float(unmerge_backup_below)
        self.spp_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = self.get_base_layer().weight.device
        # Drawn in fp32; get_peft_model keeps the adapter in fp32 on a bf16/fp16 base unless asked not
        # to (b's updates start tiny relative to 1).
        A = torch.empty(r, self.in_features, dtype=torch.float32, device=device)
        b = torch.empty(self.out_features, 1, dtype=torch.float32, device=device)
        if init_A == "kaiming":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # bound 1/sqrt(in_features), as LoRA's A
        elif init_A == "normal":
            nn.init.normal_(A, std=1.0 / math.sqrt(self.in_features))
        elif init_A == "ones":
            nn.init.ones_(A)
        else:
            raise ValueError(f"SPP init_A must be 'kaiming', 'normal' or 'ones', got {init_A!r}")
        if init_b_zero:
            nn.init.zeros_(b)  # ΔW = 0: the model is unchanged at step 0
        else:
            nn.init.normal_(b, std=1.0)
        dtype = adapter_dtype(self.get_base_layer().weight)
        self.spp_A[adapter_name] = nn.Parameter(A.to(dtype))
        self.spp_b[adapter_name] = nn.Parameter(b.to(dtype))
        self.spp_fingerprint[adapter_name] = mask_fingerprint(self.sparsity_mask).to(device)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _merge_factor(self, adapter_names: list[str]) -> torch.Tensor:
        """``1 + Σ α · R(A) ⊙ b`` over ``adapter_names`` (fp32, out x in).

        Summing (not multiplying one factor per adapter) is what the unmerged forward computes when
        several adapters are active, so merged and unmerged outputs agree.
        """
        device = next(iter(self.spp_A.values())).device
        factor = torch.ones(self.out_features, self.in_features, dtype=torch.float32, device=device)
        for name in adapter_names:
            A, b = self.spp_A[name], self.spp_b[name]
            factor += merge_factor(factor.shape, A.detach().float(), b.detach().float(), self.alpha[name])
        return factor

    def _unmerged_weight(self) -> torch.Tensor:
        """The base weight as it was before merging (fp32, out x in)."""
        if self.quantized_base:
            return self.unmerged_base_weight().float()  # the snapshot of the quantized weight, exact
        weight = base_view(self).weight.detach()
        if not self.merged:
            return weight.float()
        factor = self._merge_factor(self.merged_adapters)
        # A factor of exactly 0 (only possible with the backup disabled) leaves the merged value in place.
        # contiguous: the backup's flat positions index it row-major (a Conv1D's view is transposed).
        restored = (weight.float() / torch.where(factor == 0, torch.ones_like(factor), factor)).contiguous()
        if self._merge_backup is not None:
            indices, values = self._merge_backup
            restored.view(-1)[indices.to(restored.device)] = values.to(restored.device, torch.float32)
        return restored

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``α · R(A) ⊙ b ⊙ W`` in fp32, with ``W`` the unmerged base weight: zero wherever ``W`` is.

        Out x in like the mask, whatever the base stores (a ``Conv1D`` holds its transpose).
        """
        A, b = self.spp_A[adapter_name], self.spp_b[adapter_name]
        return spp_delta_weight(self._unmerged_weight(), A.float(), b.float(), self.alpha[adapter_name])


class Linear(nn.Module, SPPLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 16, alpha: float = 1.0,
                 dropout: float = 0.0, init_A: str = "kaiming", init_b_zero: bool = True,
                 unmerge_backup_below: float = 1e-3, **kwargs) -> None:
        super().__init__()
        SPPLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, alpha, dropout, init_A, init_b_zero, unmerge_backup_below)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """``W ← W ⊙ (1 + Σ α · R(A) ⊙ b)``: multiplicative, so every zero of ``W`` stays zero."""
        adapter_names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.spp_A]
        if not adapter_names:
            return
        if self.quantized_base:
            # W ⊙ (1 + Σ updates) from the unmerged weight, re-quantized once
            factor = self._merge_factor(list(self.merged_adapters) + adapter_names)
            self.merge_into_quantized(self._unmerged_weight() * factor, adapter_names, safe_merge)
            return
        # Merging on top of merged adapters: go back to the original weight and merge them all at
        # once, so the result is W ⊙ (1 + sum of updates) exactly as in the unmerged forward.
        to_merge = list(self.merged_adapters) + adapter_names
        if self.merged:
            self.unmerge()
        # Out x in (a Conv1D's transposed view): copy_ into it below writes the stored weight in place.
        weight = base_view(self).weight
        original = weight.detach()
        factor = self._merge_factor(to_merge)
        merged = original.float() * factor
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs or infs in the merged weights: adapters {adapter_names} seem to be broken")
        backup_below = max(self.unmerge_backup_below[name] for name in to_merge)
        near_zero = self.sparsity_mask & (factor.abs() < backup_below)
        indices = near_zero.view(-1).nonzero().squeeze(-1)
        self._merge_backup = (indices, original.reshape(-1)[indices].clone()) if indices.numel() else None
        with torch.no_grad():
            weight.copy_(restore_mask(merged.to(weight.dtype), self.sparsity_mask))
        self.merged_adapters.extend(to_merge)

    def unmerge(self) -> None:
        """``W ← W / (1 + Σ α · R(A) ⊙ b)``; weights whose factor was ~0 come back from the backup."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        if self.quantized_base:
            self.unmerge_quantized()  # exact: the snapshot of the quantized weight goes back
            return
        weight = base_view(self).weight  # out x in view: copy_ writes the stored weight in place
        restored = self._unmerged_weight()
        with torch.no_grad():
            weight.copy_(restore_mask(restored.to(weight.dtype), self.sparsity_mask))
        self.merged_adapters.clear()
        self._merge_backup = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.spp_A]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        if fuses_base(self, active, self.spp_dropout, x):
            weight = base_view(self).weight.detach()  # out x in (a Conv1D's transposed view)
            # W ⊙ (1 + α R(A) ⊙ b) in one GEMM: on CUDA the Triton kernel builds it tile by tile (reading a
            # Conv1D's weight through its strides); elsewhere its PyTorch twin builds it a block of rows at
            # a time (sp.ops picks). Neither keeps an out x in tensor.
            name = active[0]
            return ops.spp_linear(x, weight, self.spp_A[name], self.spp_b[name], self.alpha[name], base.bias)
        # The base runs itself (hooks, a quantized kernel); the update reads W (dequantized per call
        # for a quantized base) a block of rows at a time.
        weight = self.update_weight_source()
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            x_in = self.spp_dropout[name](x)
            delta = ops.spp_delta(x_in, weight, self.spp_A[name], self.spp_b[name], self.alpha[name])
            result = result + delta.to(result.dtype)
        return result

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def __repr__(self) -> str:
        return "spp." + super().__repr__()
