"""The SPT tuner: wraps each chosen decoder layer's self-attention in ``SPTAttention``.

Besides the prompts, the tuner holds a ``GradualPruning`` (``tuner.gradual_pruning``, see
``pruning.py``): it tells it about every adapter it injects, allocation changes and unloading.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ...sparsity.calibration import block_linears, find_decoder_blocks
from ...sparsity.quantized import first_quantized_linear
from ...sparsity.selection import unstructured_zero_count
from .config import ATTENTION_KEY, TARGET_MODULES_HELP
from .layer import MERGE_REFUSAL, SPTAttention, SPTLayer
from .pruning import GradualPruning, make_pruning_plan

# Architectures whose attention SPTAttention re-implements the query path of (rotate-half RoPE over
# the whole head, q/k/v/o as separate nn.Linear, GQA by num_key_value_heads, scaling = head_dim^-0.5,
# no q/k norms, no logit soft-capping), checked against transformers 5.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
WHY_UNSUPPORTED = {
    "gpt_neox": "its attention uses one fused query_key_value projection (no separate k/v projection to project "
                "prompts with) and partial rotary embeddings",
    "opt": "it has learned absolute positions and an attention module with another signature (out_proj, no "
           "position_embeddings)",
    "gpt2": "it uses a fused c_attn Conv1D projection",
    "qwen3": "its attention normalises queries and keys (q_norm/k_norm), which the prompt path does not reproduce",
    "gemma": "its attention uses another scaling and normalisation",
    "gemma2": "its attention soft-caps logits and mixes sliding/global layers with another scaling",
    "phi3": "its attention uses a fused qkv_proj",
}


def _base_name(name: str) -> str:
    return name.replace(".base_layer", "")


def check_architecture(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in SUPPORTED_MODEL_TYPES:
        return model_type
    why = WHY_UNSUPPORTED.get(model_type, "its attention module has not been checked against SPT's prompt path")
    raise ValueError(f"SPT does not support model_type={model_type!r}: {why}. Supported: "
                     f"{', '.join(SUPPORTED_MODEL_TYPES)} (see docs/spt.md)")


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    blocks_name, blocks = find_decoder_blocks(model)
    for index, block in enumerate(blocks):
        attn = getattr(block, "self_attn", None)
        if attn is None:
            raise ValueError(f"decoder layer {blocks_name}.{index} has no self_attn module for SPT to wrap")
    return blocks_name, blocks


def block_prunable_linears(blocks_name: str, blocks: nn.ModuleList) -> list[list[tuple[str, nn.Linear]]]:
    """Per decoder block, ``(base-model name, linear)`` of the linears pruning acts on."""
    return [[(_base_name(name), linear) for name, linear in group] for group in block_linears(blocks_name, blocks)]


def measured_block_sparsities(groups) -> dict[int, float]:
    sparsities = {}
    for index, group in enumerate(groups):
        numel = sum(linear.weight.numel() for _, linear in group)
        zeros = sum(int((linear.weight == 0).sum()) for _, linear in group)
        sparsities[index] = zeros / numel if numel else 0.0
    return sparsities


def prompt_lengths_for(layer_sparsities: dict[int, float], base_prompt_length: int,
                       layers: list[int]) -> dict[int, int]:
    """``p_l = max(1, round(p_base * s_l / mean(s)))`` (round half up) for ``layers``; the mean is over
    every decoder layer, so a layer sparser than the model's average gets a longer prompt."""
    mean = sum(layer_sparsities.values()) / len(layer_sparsities)
    if mean <= 0:
        raise ValueError("every decoder layer has sparsity 0: SPT's prompt lengths follow the layers' sparsity, so "
                         "prune the model first or set SPTConfig.target_sparsity")
    return {l: max(1, math.floor(base_prompt_length * layer_sparsities[l] / mean + 0.5)) for l in layers}


class SPTModel(BaseTuner):
    """Creates an SPT (sparsity-aware prompt tuning) model from a transformers Llama / Qwen2 / Mistral.

    Example::

        >>> import sparse_peft as sp
        >>> from peft import get_peft_model
        >>> config = sp.SPTConfig(base_prompt_length=8, target_sparsity=0.5, prune_end_step=100)
        >>> peft_model = get_peft_model(dense_model, config)
        >>> trainer = Trainer(model=peft_model, ..., callbacks=[sp.GradualPruningCallback()])
        >>> sp.spt_prompt_lengths(peft_model)     # {0: 8, 1: 8, ...}
    """

    prefix: str = "spt_"
    tuner_layer_cls = SPTLayer
    target_module_mapping: dict = {}

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self.gradual_pruning = GradualPruning(self)
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # --- creation ----------------------------------------------------------------------------------

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config  # target_modules are resolved from the model in _prepare_model

    def _prepare_model(self, peft_config, model: nn.Module):
        """Check the architecture, resolve the layer allocation and the prompt lengths, set the targets."""
        check_architecture(model)
        blocks_name, blocks = decoder_blocks(model)
        n_layers = len(blocks)
        layers = list(range(n_layers)) if peft_config.layers is None else list(peft_config.layers)
        outside = [i for i in layers if i >= n_layers]
        if outside:
            raise ValueError(f"SPTConfig.layers {outside} do not exist: the model has {n_layers} decoder layers")
        targets = {f"{blocks_name}.{i}.self_attn" if blocks_name else f"{i}.self_attn" for i in layers}
        if peft_config.target_modules is not None and set(peft_config.target_modules) != targets:
            raise ValueError(f"SPTConfig.target_modules={sorted(peft_config.target_modules)} is not what SPT sets for "
                             f"the decoder layers that get prompts ({sorted(targets)}): {TARGET_MODULES_HELP}")
        for index in layers:
            attn = blocks[index].self_attn
            if isinstance(attn, BaseTunerLayer) and not isinstance(attn, SPTLayer):
                raise TypeError(f"decoder layer {index}'s attention already carries a {type(attn).__name__} adapter; "
                                "SPT cannot stack on another method")
        groups = block_prunable_linears(blocks_name, blocks)
        if peft_config.layer_sparsities is None:
            peft_config.layer_sparsities = self._resolve_layer_sparsities(peft_config, groups)
        else:
            missing = sorted(set(range(n_layers)) - set(peft_config.layer_sparsities))
            extra = sorted(set(peft_config.layer_sparsities) - set(range(n_layers)))
            if missing or extra:
                raise ValueError(f"SPTConfig.layer_sparsities must name every decoder layer 0..{n_layers - 1}: "
                                 f"missing {missing}, unknown {extra}")
            if peft_config.allocation == "uniform" and peft_config.target_sparsity is not None and any(
                    abs(s - peft_config.target_sparsity) > 1e-9 for s in peft_config.layer_sparsities.values()):
                raise ValueError("SPTConfig.layer_sparsities differ between layers but allocation='uniform'; "
                                 "use allocation='owl' for a non-uniform allocation")
        if peft_config.prompt_lengths is None:
            peft_config.prompt_lengths = prompt_lengths_for(peft_config.layer_sparsities,
                                                            peft_config.base_prompt_length, layers)
        elif sorted(peft_config.prompt_lengths) != layers:
            raise ValueError(f"SPTConfig.prompt_lengths names layers {sorted(peft_config.prompt_lengths)}, "
                             f"but the prompts go to layers {layers}")
        peft_config.target_modules = targets
        self._groups = groups

    @staticmethod
    def _resolve_layer_sparsities(config, groups) -> dict[int, float]:
        """The sparsity each decoder layer has when tuning ends (see docs/spt.md)."""
        measured = measured_block_sparsities(groups)
        target = config.target_sparsity
        if target is None:
            return measured
        if config.allocation == "uniform":
            return {index: float(target) for index in measured}
        numel = sum(linear.weight.numel() for group in groups for _, linear in group)
        zeros = sum(int((linear.weight == 0).sum()) for group in groups for _, linear in group)
        if zeros >= unstructured_zero_count(target, numel):
            return measured  # already pruned (with OWL) to the target: its layers' sparsities are the allocation
        raise ValueError(
            f"allocation='owl' on a model at sparsity {zeros / numel:.4f}, below target_sparsity={target}: the OWL "
            "layer sparsities need calibration data. Compute them first and pass them in: "
            "SPTConfig(..., allocation='owl', layer_sparsities=sp.owl_layer_sparsities(model, "
            f"{target}, calibration))")

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs):
        found = first_quantized_linear(self.model)
        if found is not None:
            raise TypeError(f"SPT does not support bitsandbytes-quantized layers ({found[0]!r} is a "
                            f"{type(found[1]).__name__}): it fingerprints and prunes the decoder's float weights "
                            "during training. Run SPT on the unquantized pruned model.")
        match = ATTENTION_KEY.search(current_key)
        if match is None:
            raise ValueError(f"SPT targets decoder layers' self_attn modules, got {current_key!r}")
        index = int(match.group(1))
        length = config.prompt_lengths[index]
        if isinstance(target, SPTLayer):
            target.update_layer(adapter_name, length, config.init_std, inference_mode=config.inference_mode)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(f"layer {current_key!r} already carries a {type(target).__name__} adapter; "
                            "SPT cannot stack on another method")
        new_module = SPTAttention(target, adapter_name, index, length, config.init_std)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # peft's version copies .weight/.bias between a linear and its wrapper; attention modules have
        # none, and the prompts are already created on the device of the layer's q_proj.
        setattr(parent, child_name, new_module)

    def _post_injection_hook(self, model, config, adapter_name):
        self.gradual_pruning.add_adapter(adapter_name, config, self._groups)

    # --- allocation changes ------------------------------------------------------------------------

    def set_layer_sparsities(self, layer_sparsities: dict, adapter_name: Optional[str] = None) -> dict[int, int]:
        """Change the target allocation (``{layer index: sparsity}`` for every decoder layer): the prompt
        lengths are recomputed, prompts whose length changes keep their first vectors, and the pruning
        plan follows the new allocation. Returns the new lengths.

        A prompt whose length changes is a new parameter: rebuild the optimizer afterwards.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        config = self.peft_config[adapter_name]
        groups = block_prunable_linears(*decoder_blocks(self.model))
        new_config = type(config)(**{**config.to_dict(), "layer_sparsities": dict(layer_sparsities),
                                     "prompt_lengths": None, "peft_type": None, "target_modules": None})
        missing = sorted(set(range(len(groups))) - set(new_config.layer_sparsities))
        if missing:
            raise ValueError(f"layer_sparsities must name every decoder layer; missing {missing}")
        layers = sorted(config.prompt_lengths)
        lengths = prompt_lengths_for(new_config.layer_sparsities, config.base_prompt_length, layers)
        plan = make_pruning_plan(new_config, groups, new_config.layer_sparsities) \
            if config.target_sparsity is not None and not config.inference_mode else None
        changed = []
        for module in self.model.modules():
            if isinstance(module, SPTLayer) and adapter_name in module.spt_prompt:
                if module.resize_prompt(adapter_name, lengths[module.layer_index], config.init_std):
                    changed.append(module.layer_index)
        config.layer_sparsities = new_config.layer_sparsities
        config.prompt_lengths = lengths
        if plan is not None:
            self.gradual_pruning.replace_plan(adapter_name, plan)
        if changed:
            warnings.warn(f"SPT adapter {adapter_name!r}: prompts of layers {changed} changed length; they are new "
                          "parameters, so rebuild the optimizer")
        return lengths

    # --- merging: refused ----------------------------------------------------------------------------

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None):
        raise ValueError(MERGE_REFUSAL)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        raise ValueError(MERGE_REFUSAL)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None):
        if merge:
            raise ValueError(MERGE_REFUSAL)
        self.gradual_pruning.clear()
        return super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)


def spt_prompt_lengths(peft_model: nn.Module, adapter_name: Optional[str] = None) -> dict[int, int]:
    """``{decoder layer index: prompt length}`` of an SPT adapter (default: the active one)."""
    tuner = spt_tuner(peft_model)
    adapter_name = adapter_name or tuner.active_adapters[0]
    lengths = {}
    for module in tuner.model.modules():
        if isinstance(module, SPTLayer) and adapter_name in module.spt_prompt:
            lengths[module.layer_index] = int(module.spt_prompt[adapter_name].shape[0])
    if not lengths:
        raise ValueError(f"no SPT adapter named {adapter_name!r} in this model")
    return dict(sorted(lengths.items()))


def spt_tuner(model: nn.Module) -> SPTModel:
    """The ``SPTModel`` inside a PeftModel (or the tuner itself)."""
    if isinstance(model, SPTModel):
        return model
    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, SPTModel):
        return tuner
    raise TypeError(f"expected a model with an SPT adapter (get_peft_model(model, sp.SPTConfig(...))), "
                    f"got {type(model).__name__}")
