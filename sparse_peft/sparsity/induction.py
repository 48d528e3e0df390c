"""Sparsity Induction, distribution level (Jiang et al. 2026): function-preserving per-channel
scalings folded into the weights before pruning.

A linear's input column ``j`` can be multiplied by ``s_j > 0`` if whatever produces input feature
``j`` is divided by ``s_j``. In a Llama-style block four producers allow it exactly:

    input RMSNorm weight g        ->  q_proj, k_proj, v_proj columns     (g_j / s_j,  W[:, j] * s_j)
    post-attention RMSNorm g      ->  gate_proj, up_proj columns
    v_proj rows (and bias)        ->  o_proj columns                     (attention mixes tokens, not channels)
    up_proj rows (and bias)       ->  down_proj columns                  (act(gate) * up is linear in up)

With grouped-query attention one kv channel ``(k, i)`` feeds o_proj column ``(h, i)`` of every query
head ``h`` with ``h // n_rep == k``: those columns share one scale.

The scales come from calibration statistics. ``objective="activation"`` sets ``s_j ∝ rms(X_j)^α``
(SmoothQuant-style migration of the activation scale into the weights): with ``α = 1`` the
magnitude ``|W_ij| s_j`` orders every row exactly like Wanda's ``|W_ij| ||X_j||``. Wanda itself
(and OWL's outlier statistics, which are Wanda scores) cannot see any of these scalings, and
SparseGPT only through its damping: see docs/induction.md for the math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .._validation import is_real
from .calibration import as_calibration_batches, find_decoder_blocks, run_blockwise
from .wanda import InputNormStat

# model_type values whose decoder layers are checked to be Llama-shaped (pre-norm RMSNorm with a plain
# multiplicative weight, q/k/v/o attention with repeat_kv GQA, gated MLP down(act(gate) * up)).
# Gemma's RMSNorm multiplies by (1 + weight), GPT-NeoX/OPT use LayerNorm with a bias and parallel or
# post-norm layouts: folding into them would need other rules, so they are refused.
INDUCTION_MODEL_TYPES = ("llama", "qwen2", "mistral")
OBJECTIVES = ("activation",)
PAIRS = ("qkv", "gate_up", "vo", "down")
ROW_SCALED_PAIRS = ("vo", "down")  # their producers are linears (v_proj, up_proj) whose rows are divided


@dataclass
class InductionReport:
    """What ``induce_sparsity`` folded: one scale vector per (block, pair).

    ``scales[name]`` is the fp32 vector that multiplied the consuming linear(s)' input columns
    (for ``vo`` the per-kv-channel vector, before it is repeated over query heads), keyed
    ``"<block prefix>.<pair>"``, e.g. ``"model.layers.0.qkv"``.
    """

    objective: str
    alpha: float
    power_of_two: bool
    scales: dict[str, torch.Tensor] = field(default_factory=dict)

    def spread(self) -> dict[str, float]:
        """max(s) / min(s) per folded pair: how unequal the channels were made."""
        return {name: float(s.max() / s.min()) for name, s in self.scales.items()}

    def to_markdown(self) -> str:
        lines = [f"objective={self.objective}, alpha={self.alpha}, power_of_two={self.power_of_two}", "",
                 "| pair | channels | min scale | max scale | max / min |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, s in self.scales.items():
            lines.append(f"| {name} | {s.numel()} | {float(s.min()):.4g} | {float(s.max()):.4g} | "
                         f"{float(s.max() / s.min()):.3g} |")
        return "\n".join(lines)

    def __repr__(self) -> str:
        spreads = list(self.spread().values())
        worst = f"{max(spreads):.3g}" if spreads else "-"
        return (f"InductionReport(objective={self.objective!r}, alpha={self.alpha}, pairs={len(self.scales)}, "
                f"max_spread={worst})")


@dataclass
class _LlamaBlock:
    """The modules of one Llama-style decoder layer that the folds touch."""

    prefix: str
    input_norm: nn.Module
    post_norm: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    n_rep: int  # query heads per kv head
    head_dim: int


def _require(module: nn.Module, path: str, where: str):
    current = module
    for part in path.split("."):
        if not hasattr(current, part):
            raise ValueError(f"induce_sparsity: {where} has no {path!r}; it covers Llama-style decoder layers "
                             f"(model_type in {INDUCTION_MODEL_TYPES})")
        current = getattr(current, part)
    return current


def _check_norm(norm: nn.Module, hidden: int, where: str) -> None:
    # The fold divides the norm's weight; that is exact only for y = weight * x_normalized.
    weight = getattr(norm, "weight", None)
    if not type(norm).__name__.endswith("RMSNorm") or weight is None or weight.shape != (hidden,):
        raise ValueError(f"induce_sparsity: {where} is {type(norm).__name__} with weight "
                         f"{None if weight is None else tuple(weight.shape)}; expected an RMSNorm with a "
                         f"({hidden},) weight")
    if getattr(norm, "bias", None) is not None:
        raise ValueError(f"induce_sparsity: {where} has a bias; only bias-free RMSNorm can absorb a scale")


def llama_blocks(model: nn.Module) -> list[_LlamaBlock]:
    """The decoder layers of a covered model, validated; ValueError naming the architecture or the
    module that does not fit otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in INDUCTION_MODEL_TYPES:
        raise ValueError(f"induce_sparsity covers Llama-style models (model_type in {INDUCTION_MODEL_TYPES}); "
                         f"got model_type={model_type!r} ({type(model).__name__})")
    if hasattr(model, "peft_config"):
        raise ValueError("induce_sparsity: induce on the base model before wrapping it with peft "
                         "(got a peft-wrapped model)")
    blocks_name, blocks = find_decoder_blocks(model)
    result = []
    for index, block in enumerate(blocks):
        prefix = f"{blocks_name}.{index}" if blocks_name else str(index)
        mods = {key: _require(block, path, f"decoder layer {prefix!r}") for key, path in (
            ("input_norm", "input_layernorm"), ("post_norm", "post_attention_layernorm"),
            ("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
            ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
            ("down", "mlp.down_proj"))}
        for key in ("q", "k", "v", "o", "gate", "up", "down"):
            if not isinstance(mods[key], nn.Linear):
                raise ValueError(f"induce_sparsity: {prefix}.{key}_proj is {type(mods[key]).__name__}, "
                                 "not nn.Linear (quantized or peft-wrapped layers cannot absorb scales)")
        hidden = mods["q"].in_features
        _check_norm(mods["input_norm"], hidden, f"{prefix}.input_layernorm")
        _check_norm(mods["post_norm"], hidden, f"{prefix}.post_attention_layernorm")
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = mods["v"].out_features // n_kv
        if (n_heads % n_kv or head_dim * n_kv != mods["v"].out_features
                or mods["o"].in_features != n_heads * head_dim or mods["up"].out_features != mods["down"].in_features):
            raise ValueError(f"induce_sparsity: {prefix}: heads do not match the projections (num_attention_heads="
                             f"{n_heads}, num_key_value_heads={n_kv}, v_proj out={mods['v'].out_features}, "
                             f"o_proj in={mods['o'].in_features})")
        result.append(_LlamaBlock(prefix=prefix, n_rep=n_heads // n_kv, head_dim=head_dim, **mods))
    return result


def _scales_from_rms(rms: torch.Tensor, alpha: float, power_of_two: bool, floor: float) -> torch.Tensor:
    """``s ∝ rms^α``, geometric mean 1 (the product of all weights' magnitudes is unchanged, so
    low-precision weights stay in range). Dead channels are lifted to ``floor x max(rms)`` first:
    a zero scale cannot be inverted."""
    rms = rms.double()
    rms = rms.clamp_min(float(rms.max()) * floor if float(rms.max()) > 0 else 1.0)
    log_s = alpha * rms.log()
    log_s = log_s - log_s.mean()
    if power_of_two:
        # Multiplying and dividing by powers of two is exact in floating point: the folded model then
        # computes bit-identical results (in bf16 too), at the price of a coarser scale (within √2).
        return torch.exp2(torch.round(log_s / math.log(2))).float()
    return log_s.exp().float()


def _scale_columns_(linear: nn.Linear, scale: torch.Tensor) -> None:
    linear.weight.copy_((linear.weight.float() * scale.to(linear.weight.device)).to(linear.weight.dtype))


def _scale_rows_(linear: nn.Linear, inverse: torch.Tensor) -> None:
    inverse = inverse.to(linear.weight.device)
    linear.weight.copy_((linear.weight.float() * inverse.unsqueeze(1)).to(linear.weight.dtype))
    if linear.bias is not None:  # the bias is part of the produced feature: scale it with the row
        linear.bias.copy_((linear.bias.float() * inverse).to(linear.bias.dtype))


def _scale_norm_(norm: nn.Module, inverse: torch.Tensor) -> None:
    norm.weight.copy_((norm.weight.float() * inverse.to(norm.weight.device)).to(norm.weight.dtype))


@torch.no_grad()
def fold_block_scales_(block: _LlamaBlock, scales: dict[str, torch.Tensor]) -> None:
    """Fold the given per-channel scales (keys from ``PAIRS``) into one block, in place."""
    if "qkv" in scales:
        s = scales["qkv"]
        _scale_norm_(block.input_norm, 1.0 / s)
        for linear in (block.q, block.k, block.v):
            _scale_columns_(linear, s)
    if "gate_up" in scales:
        s = scales["gate_up"]
        _scale_norm_(block.post_norm, 1.0 / s)
        for linear in (block.gate, block.up):
            _scale_columns_(linear, s)
    if "vo" in scales:
        s_kv = scales["vo"]  # one per v_proj output row = per (kv head, head dim)
        _scale_rows_(block.v, 1.0 / s_kv)
        # o_proj column (h, i) reads kv head h // n_rep, channel i (transformers' repeat_kv).
        n_kv = s_kv.numel() // block.head_dim
        s_o = s_kv.reshape(n_kv, 1, block.head_dim).expand(n_kv, block.n_rep, block.head_dim).reshape(-1)
        _scale_columns_(block.o, s_o)
    if "down" in scales:
        s = scales["down"]
        _scale_rows_(block.up, 1.0 / s)
        _scale_columns_(block.down, s)


def _check_options(objective, alpha, pairs, floor) -> tuple[str, ...]:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown induction objective {objective!r}; choose one of {OBJECTIVES}")
    if not is_real(alpha) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"induce_sparsity alpha must be a number in [0, 1], got {alpha!r}")
    pairs = (pairs,) if isinstance(pairs, str) else tuple(pairs)
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown or not pairs:
        raise ValueError(f"induce_sparsity pairs must be a non-empty subset of {PAIRS}, got {pairs!r}")
    if not is_real(floor) or not 0.0 < float(floor) < 1.0:
        raise ValueError(f"induce_sparsity floor must be in (0, 1), got {floor!r}")
    return pairs


def induce_sparsity(
    model: nn.Module,
    calibration,
    *,
    objective: str = "activation",
    alpha: float = 1.0,
    pairs=PAIRS,
    power_of_two: bool = False,
    floor: float = 1e-4,
    show_progress: bool = True,
) -> InductionReport:
    """Fold function-preserving per-channel scales into a Llama-style model, in place.

    Args:
        model: a transformers causal LM of a covered architecture (``INDUCTION_MODEL_TYPES``), dense
            or already pruned (scales keep zeros zero), not peft-wrapped.
        calibration: token batches, as for ``prune`` (padding excluded from the statistics).
        objective: ``"activation"``: ``s_j ∝ rms(X_j)^alpha`` over the calibration tokens of the
            consuming linear's input ``X`` (for ``vo``, the rms over the query heads sharing the kv channel).
        alpha: migration strength in [0, 1]. ``1`` (default) makes ``|W_ij|`` rank every row like
            Wanda's score; ``0`` is the identity.
        pairs: which folds to apply, a subset of ``("qkv", "gate_up", "vo", "down")``.
        power_of_two: round every scale to a power of two so the folded model is bit-identical to
            the original (worth it for bf16/fp16 weights, where other scales add rounding).
        floor: channels whose rms is below ``floor x`` the largest are treated as that small (no zero scale).
        show_progress: tqdm bar over blocks.

    Returns an ``InductionReport`` with the folded scales. The parameter set does not change.
    Raises ValueError for an uncovered architecture (naming it), a decoder layer that does not fit
    (naming it), or bad options.
    """
    pairs = _check_options(objective, alpha, pairs, floor)
    blocks = llama_blocks(model)
    calibration = as_calibration_batches(calibration)
    report = InductionReport(objective=objective, alpha=float(alpha), power_of_two=bool(power_of_two))
    # The statistics each pair's scale is computed from: the input of its (first) consuming linear.
    stat_owner = {"qkv": "q", "gate_up": "gate", "vo": "o", "down": "down"}

    def make_stat(linear):
        return InputNormStat(linear.in_features, device=linear.weight.device)

    def fold(index, stats):
        block = blocks[index]
        rms_by_linear = {id(linear): stat.rms().cpu() for linear, stat in stats.values()}
        scales = {}
        for pair in pairs:
            rms = rms_by_linear[id(getattr(block, stat_owner[pair]))]
            if pair == "vo":
                # Columns (h, i) of o_proj for the n_rep heads h of one kv head share one scale:
                # pool their mean squares.
                n_kv = block.v.out_features // block.head_dim
                rms = rms.reshape(n_kv, block.n_rep, block.head_dim).square().mean(dim=1).sqrt().reshape(-1)
            scales[pair] = _scales_from_rms(rms, float(alpha), power_of_two, float(floor))
            report.scales[f"{block.prefix}.{pair}"] = scales[pair]
        fold_block_scales_(block, scales)

    # Block k's statistics are taken from the outputs of the already folded blocks 0..k-1: the same
    # values as the original model's (the folds preserve the function), one block in memory at a time.
    run_blockwise(model, calibration, make_stat, fold, desc="sparsity induction", show_progress=show_progress)
    return report
