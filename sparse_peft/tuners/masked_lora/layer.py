"""The masked LoRA layer: ``y = x Wᵀ + scaling · dropout(x) ((B A) ⊙ M)ᵀ``."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...sparsity.masks import mask_fingerprint, restore_mask
from .._shared import attach_sparsity_mask, base_view


class MaskedLoraLayer(BaseTunerLayer):
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
        self.masked_lora_fingerprint = BufferDict({}, persistent=True)
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
        self.masked_lora_A[adapter_name] = nn.Parameter(A.to(weight.device))
        self.masked_lora_B[adapter_name] = nn.Parameter(B.to(weight.device))
        self.masked_lora_fingerprint[adapter_name] = mask_fingerprint(self.sparsity_mask).to(weight.device)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling · (B A) ⊙ M`` in fp32: exactly zero at every pruned position.

        Out x in like the mask, whatever the base stores (a ``Conv1D`` holds its transpose).
        """
        A = self.masked_lora_A[adapter_name]
        B = self.masked_lora_B[adapter_name]
        delta = (B.float() @ A.float()) * self.scaling[adapter_name]
        return delta * self.sparsity_mask


class Linear(nn.Module, MaskedLoraLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 16,
                 lora_dropout: float = 0.0, init_lora_weights: bool = True, **kwargs) -> None:
        super().__init__()
        MaskedLoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
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
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        fused = self._fused_weight(x)
        if fused is not None:
            return F.linear(x, fused, self.base_layer.bias)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.masked_lora_A:
                continue
            A = self.masked_lora_A[name]
            delta = self.get_delta_weight(name).to(A.dtype)
            x_in = self.masked_lora_dropout[name](x.to(A.dtype))
            result = result + F.linear(x_in, delta).to(result.dtype)
        return result

    def _fused_weight(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``W + Σ ΔW`` when one GEMM with it computes exactly what the two-branch forward means, else None.

        ``x (W + ΔW)ᵀ`` costs one GEMM forward and two backward (dX, and dΔW, which the adapter needs
        anyway); ``x Wᵀ + x ΔWᵀ`` costs two forward and three backward (its training step took 2.4x
        LoRA's on SmolLM2 on the CPU; the fused one is 1.45x faster than it). The fused weight is exactly
        zero where W is pruned (ΔW is masked). Only for a plain fp32 nn.Linear base without hooks and
        adapters without dropout (dropout applies to the adapter's input alone); otherwise the two
        branches run as written.
        """
        base = self.base_layer
        active = [name for name in self.active_adapters if name in self.masked_lora_A]
        if (not active or type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks
                or base.weight.dtype != torch.float32 or x.dtype != torch.float32
                or any(not isinstance(self.masked_lora_dropout[name], nn.Identity) for name in active)):
            return None
        weight = base.weight
        for name in active:
            weight = weight + self.get_delta_weight(name)
        return weight

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def __repr__(self) -> str:
        return "masked_lora." + super().__repr__()
