"""Sparsity reports: how many exact zeros each linear layer holds, and which N:M pattern it meets.

Linear layers are ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2 family); shapes and N:M
groups are reported in the out x in sense for both (``linear_view``), so a ``Conv1D`` reads like
the ``nn.Linear`` it stands for.

Works on a plain transformers model and on a peft-wrapped one: a tuner layer (anything with
``get_base_layer()``) is reported through its base linear, under the base model's module name,
so a report taken before wrapping and one taken after (or after ``merge_and_unload``) line up.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from torch import nn

from .masks import is_linear, is_nm_sparse, linear_view
from .quantized import dequantized_weight, is_quantized_linear

# Patterns worth naming, strictest first (2:4 implies 4:8, so the first match is the most useful).
_REPORTED_PATTERNS = ((2, 4), (4, 8))
_PEFT_PREFIX = "base_model.model."


@dataclass
class LayerSparsity:
    """Zeros of one linear layer's weight: its out x in ``shape``, ``numel`` weights, ``zeros`` exact
    zeros, ``sparsity = zeros / numel``, and the strictest N:M ``pattern`` it meets (``"2:4"`` /
    ``"4:8"``, or None)."""

    shape: tuple[int, ...]
    numel: int
    zeros: int
    sparsity: float
    pattern: str | None  # "2:4" / "4:8" if every group of M inputs has at most N nonzeros

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "numel": self.numel, "zeros": self.zeros,
                "sparsity": self.sparsity, "pattern": self.pattern}


@dataclass
class SparsityReport:
    """What ``sparsity_report(model)`` returns: a ``LayerSparsity`` per linear layer (output head
    excluded), keyed by the base model's module name, and ``global_sparsity``, the zeros of all those
    layers over their weights. ``to_markdown()`` tables it, ``to_dict()`` is JSON-ready, ``plot(path)``
    draws it."""

    global_sparsity: float
    layers: "OrderedDict[str, LayerSparsity]" = field(default_factory=OrderedDict)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers.values())

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers.values())

    def to_dict(self) -> dict:
        return {
            "global_sparsity": self.global_sparsity,
            "numel": self.numel,
            "zeros": self.zeros,
            "layers": {name: layer.to_dict() for name, layer in self.layers.items()},
        }

    def to_markdown(self) -> str:
        lines = ["| layer | shape | numel | zeros | sparsity | N:M |", "| --- | --- | ---: | ---: | ---: | --- |"]
        for name, layer in self.layers.items():
            shape = " x ".join(str(d) for d in layer.shape)
            lines.append(f"| {name} | {shape} | {layer.numel} | {layer.zeros} | "
                         f"{100 * layer.sparsity:.2f}% | {layer.pattern or '-'} |")
        lines.append("")
        lines.append(f"**Global sparsity: {100 * self.global_sparsity:.2f}%** "
                     f"({self.zeros} zeros / {self.numel} weights over {len(self.layers)} linear layers)")
        return "\n".join(lines)

    def plot(self, path) -> None:
        """Write a PNG bar chart of each layer's sparsity (in %), the global sparsity as a dashed line.

        Needs matplotlib (``pip install matplotlib``); without it, ImportError saying so. The figure is
        drawn without pyplot, so the caller's matplotlib backend is left as it is.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("SparsityReport.plot needs matplotlib, which is not installed "
                              "(pip install matplotlib)") from None
        names = list(self.layers)
        values = [100 * layer.sparsity for layer in self.layers.values()]
        fig = Figure(figsize=(max(6, 0.18 * len(names)), 4))
        ax = fig.subplots()
        ax.bar(range(len(names)), values)
        ax.axhline(100 * self.global_sparsity, color="k", linestyle="--", linewidth=1, label="global")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5)
        ax.set_ylabel("sparsity (%)")
        ax.set_ylim(0, 100)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=150)

    def __repr__(self) -> str:
        return (f"SparsityReport(global_sparsity={self.global_sparsity:.4f}, layers={len(self.layers)}, "
                f"zeros={self.zeros}, numel={self.numel})")

    __str__ = __repr__


def _base_name(name: str) -> str:
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    return name.replace(".base_layer", "")


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (or under a peft BaseTuner such as LoraModel)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    if hasattr(model, "peft_config") and isinstance(getattr(model, "model", None), nn.Module):
        return model.model
    return model


def _reported_linears(model: nn.Module):
    """Yield ``(base-model name, linear)``: base layers of tuner layers, then plain linears,
    each once, in module order, without the output head and without adapter-internal linears."""
    model = _unwrap_peft(model)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    seen: set[int] = set()
    tuner_prefixes: list[str] = []
    for name, module in model.named_modules():
        # Adapter sub-layers (lora_A, lora_B, base_layer, ...) live under a tuner layer's name.
        if any(name.startswith(prefix) for prefix in tuner_prefixes):
            continue
        if hasattr(module, "get_base_layer"):
            base = module.get_base_layer()  # innermost, also through nested tuner layers
            # Only linear wrappers stand for their base; a tuner wrapping a whole block (SPT wraps
            # attention) is walked into so the linears inside it are reported.
            if base is not module and is_linear(base):
                tuner_prefixes.append(name + ".")
                module = base
        if not is_linear(module) or id(module) in seen:
            continue
        base_name = _base_name(name)
        if module is out_emb or base_name.split(".")[-1] == "lm_head":
            continue
        seen.add(id(module))
        yield base_name, module


def layer_sparsity(weight) -> LayerSparsity:
    """Zeros and N:M pattern of an out x in weight (N:M groups run along its rows)."""
    kept = weight.detach() != 0
    numel = kept.numel()
    zeros = numel - int(kept.count_nonzero().item())
    pattern = None
    if kept.dim() == 2 and zeros > 0:
        for n, m in _REPORTED_PATTERNS:
            if is_nm_sparse(kept, n, m):
                pattern = f"{n}:{m}"
                break
    return LayerSparsity(tuple(weight.shape), numel, zeros, zeros / numel if numel else 0.0, pattern)


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Exact zero counts of every linear layer (output head excluded), and the global sparsity
    ``sum(zeros) / sum(numel)`` over them (of a bitsandbytes-quantized layer: its dequantized weight)."""
    layers: OrderedDict[str, LayerSparsity] = OrderedDict()
    for name, linear in _reported_linears(model):
        # a bitsandbytes layer stores packed codes: its zeros are those of the dequantized weight
        weight = dequantized_weight(linear) if is_quantized_linear(linear) else linear_view(linear).weight
        layers[name] = layer_sparsity(weight)
    numel = sum(layer.numel for layer in layers.values())
    zeros = sum(layer.zeros for layer in layers.values())
    return SparsityReport(global_sparsity=zeros / numel if numel else 0.0, layers=layers)
