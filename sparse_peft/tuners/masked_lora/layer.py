"""The masked LoRA layer: ``y = x Wᵀ + scaling · dropout(x) ((B A) ⊙ M)ᵀ``.

The mask ``M`` is ``W != 0`` of the base, derived where it is needed. Training runs through
``sparse_peft.delta_linear``: it saves what LoRA saves (the input, ``A``, ``B``) and rebuilds
``(B A) ⊙ M`` a block of rows at a time in the backward, where ``G = (dYᵀ X) ⊙ M`` gives
``dB = s · G Aᵀ`` and ``dA = s · Bᵀ G``; no out x in tensor lives from the forward to the backward.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...delta_linear import MaskedLowRankUpdate, delta_linear
from ...sparsity.masks import mask_fingerprint, restore_mask
from .._shared import DerivedMask, adapter_dtype, attach_sparsity_mask, base_view, fuses_base, mask_fingerprints


class MaskedLoraLayer(DerivedMask, BaseTunerLayer):
    adapter_layer_names = ("masked_lora_A", "masked_lora_B")
    # masked_lora_fingerprint is saved with the adapter so loading onto a base with another mask fails loudly.
    other_param_names = ("r", "lora_alpha", "scaling", "masked_lora_dropout", "masked_lora_fingerprint")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r = {}
        self.lora_alpha = {}
        self.scaling = {}
        self.masked_lora_dropout = nn.ModuleDict({})
        self.masked_lora_A = nn.ParameterDict({})
        self.masked_lora_B = nn.ParameterDict({})
        self.masked_lora_fingerprint = mask_fingerprints(self)
        self._disable_adapters = False
        self.merged_adapters = []
        attach_sparsity_mask(self, "masked LoRA")
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights: bool = True, inference_mode: bool = False) -> None:
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.masked_lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        weight = self.get_base_layer().weight
        A = torch.empty(r, self.in_features, dtype=torch.float32)
        B = torch.empty(self.out_features, r, dtype=torch.float32)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init_lora_weights:
            nn.init.zeros_(B)  # the model is unchanged at step 0
        else:
            nn.init.normal_(B, std=0.1)
        dtype = adapter_dtype(weight)
        self.masked_lora_A[adapter_name] = nn.Parameter(A.to(weight.device, dtype))
        self.masked_lora_B[adapter_name] = nn.Parameter(B.to(weight.device, dtype))
        self.masked_lora_fingerprint[adapter_name] = mask_fingerprint(self.sparsity_mask).to(weight.device)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def update(self, adapter_name: str) -> MaskedLowRankUpdate:
        """The adapter's ``s · (B A) ⊙ M`` as ``delta_linear`` builds it, a block of rows at a time."""
        return MaskedLowRankUpdate(self.masked_lora_A[adapter_name], self.masked_lora_B[adapter_name],
                                   self.scaling[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling · (B A) ⊙ M`` (fp32 or wider, dense): exactly zero at every pruned position.

        Out x in like the mask, whatever the base stores (a ``Conv1D`` holds its transpose).
        """
        weight = self.unmerged_base_weight().detach()
        dtype = torch.promote_types(self.masked_lora_A[adapter_name].dtype, torch.float32)
        return self.update(adapter_name).weight_rows(0, self.out_features, weight, dtype, with_base=False)


class Linear(nn.Module, MaskedLoraLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 16,
                 lora_dropout: float = 0.0, init_lora_weights: bool = True, **kwargs) -> None:
        super().__init__()
        MaskedLoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if self.quantized_base:
            names = [name for name in adapter_names if name in self.masked_lora_A]
            if names:
                # W + all merged updates, re-quantized once from the unmerged weight
                merged = self.unmerged_base_weight().float()
                for name in list(self.merged_adapters) + names:
                    merged = merged + self.get_delta_weight(name)
                self.merge_into_quantized(merged, names, safe_merge)
            return
        for name in adapter_names:
            if name not in self.masked_lora_A:
                continue
            base = self.get_base_layer()
            view = base_view(self)  # out x in, as the delta; a Conv1D stores the transpose
            merged = view.weight.detach().float() + self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs or infs in the merged weights: adapter {name!r} seems to be broken")
            base.weight.data = view.to_stored(restore_mask(merged.to(base.weight.dtype), self.sparsity_mask))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        if self.quantized_base:
            self.unmerge_quantized()  # exact: the snapshot of the quantized weight goes back
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.masked_lora_A:
                continue
            base = self.get_base_layer()
            view = base_view(self)  # out x in, as the delta; a Conv1D stores the transpose
            restored = view.weight.detach().float() - self.get_delta_weight(name)
            base.weight.data = view.to_stored(restore_mask(restored.to(base.weight.dtype), self.sparsity_mask))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.masked_lora_A]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        if fuses_base(self, active, self.masked_lora_dropout, x):
            # One GEMM with W + ΔW per block of rows, forward and backward: what LoRA costs plus the
            # dYᵀ X product the masked update needs.
            weight = self.unmerged_base_weight().detach()  # out x in (a Conv1D's transposed view)
            return delta_linear(x, weight, base.bias, self.update(active[0]))
        # The base runs itself (hooks, a quantized kernel); the update reads W only for its mask.
        weight = self.update_weight_source()
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            x_in = self.masked_lora_dropout[name](x)
            delta = delta_linear(x_in, weight, None, self.update(name), with_base=False)
            result = result + delta.to(result.dtype)
        return result

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def __repr__(self) -> str:
        return "masked_lora." + super().__repr__()
