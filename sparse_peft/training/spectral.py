"""Sparsity Induction, feature level (Jiang et al. 2026): a spectral-norm loss that pushes the
features of every decoder layer toward low rank before pruning.

For one sequence, the output of layer ``l`` is a matrix ``H`` (tokens x hidden, padding rows
removed). Its stable rank ``||H||_F² / ||H||_2²`` lies in ``[1, rank H]`` and is 1 exactly when
``H`` has rank one. The term is

    L_spec = mean over layers l and sequences b of  log(||H_lb||_F² / ||H_lb||_2²)

(``0`` for rank-one features). The log makes it blind to the features' scale, so the model cannot
lower it by shrinking or inflating activations, and gives every layer the same weight whatever its
rank. Why low rank helps pruning: a pruned linear's error on its inputs is ``||ΔW X||_F² =
tr(ΔW X Xᵀ ΔWᵀ)``; when ``X Xᵀ`` is dominated by a few directions, the part of ``ΔW`` outside them
costs nothing, and SparseGPT's compensation has fewer directions to repair. That is the paper's argument;
measured on SmolLM2-135M before Wanda, the opposite sign (a negative weight, raising the rank) is
what helped, lowering it hurt (docs/induction.md).

``||H||_2`` comes from a few power iterations on ``HᵀH`` run without gradient; the loss then
evaluates ``||H v||`` with ``v`` held fixed, whose gradient ``u vᵀ`` is the spectral norm's own
gradient once ``v`` has converged (the device ``torch.nn.utils.spectral_norm`` uses).

Which features: ``features="hidden_states"`` (default) reads every decoder layer's output, the
residual stream. On real LLMs that stream is dominated by a few massive-activation channels, so its
stable rank is already close to 1 (SmolLM2-135M: mean log stable rank 0.25, several layers below
0.01) and the term has almost nothing to push. ``features="linear_inputs"`` reads what the pruned
linears multiply instead: the distinct inputs of the model's prunable linears (the normed stream
for q/k/v and for gate/up, the attention output for o, ``act(gate) * up`` for down), one feature
matrix each, captured with forward pre-hooks.

Use ``SpectralNormLoss`` in a custom loop, ``spectral_compute_loss`` inside any ``compute_loss``,
or ``SpectralNormTrainer`` (a ``transformers.Trainer`` adding the term to the CE).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Sequence

import torch
from torch import nn

from .._validation import is_int, is_real
from ..sparsity.masks import named_linears

try:
    from transformers import Trainer
except ImportError:  # pragma: no cover - transformers is a dependency
    Trainer = object

FEATURES = ("hidden_states", "linear_inputs")  # what SpectralNormLoss reads (module docstring)


@torch.no_grad()
def _top_right_singular_vector(features: torch.Tensor, iterations: int) -> torch.Tensor:
    """``[B, d]`` unit vectors near the top right singular vector of each ``[T, d]`` matrix."""
    # Start from the largest-norm token of each sequence: never orthogonal to the top direction
    # unless the matrix is zero, and close to it when one direction dominates (the usual case).
    row_norms = features.norm(dim=-1)
    start = features[torch.arange(features.shape[0], device=features.device), row_norms.argmax(dim=-1)]
    vector = start / start.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    for _ in range(iterations):
        projected = torch.einsum("btd,bd->bt", features, vector)
        vector = torch.einsum("btd,bt->bd", features, projected)
        vector = vector / vector.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return vector


def spectral_norm(features: torch.Tensor, iterations: int = 10) -> torch.Tensor:
    """Largest singular value of each ``[T, d]`` matrix in ``features [B, T, d]`` (or one ``[T, d]``),
    differentiable through the features."""
    single = features.dim() == 2
    batched = features.unsqueeze(0) if single else features
    vector = _top_right_singular_vector(batched.detach(), iterations)
    sigma = torch.einsum("btd,bd->bt", batched, vector).norm(dim=-1)
    return sigma[0] if single else sigma


class SpectralNormLoss(nn.Module):
    """Mean log stable rank of the per-sequence feature matrices of the chosen layers.

    Args:
        iterations: power iterations per matrix (each costs two passes over the features).
        layers: indices into ``hidden_states``; default ``None`` = every decoder layer's output
            (``hidden_states[1:]``, the embeddings at index 0 are left alone).
        eps: added to both squared norms (a zero feature matrix costs 0).
        features: ``"hidden_states"`` (every decoder layer's output) or ``"linear_inputs"`` (the
            distinct inputs of the prunable linears, see the module docstring); with
            ``"linear_inputs"`` ``layers`` indexes that list and nothing is skipped.
    """

    def __init__(self, iterations: int = 10, layers: Optional[Sequence[int]] = None, eps: float = 1e-12,
                 features: str = "hidden_states"):
        super().__init__()
        if features not in FEATURES:
            raise ValueError(f"SpectralNormLoss features must be one of {FEATURES}, got {features!r}")
        self.features = features
        if not is_int(iterations) or iterations <= 0:
            raise ValueError(f"SpectralNormLoss iterations must be a positive integer, got {iterations!r}")
        if not eps > 0:
            raise ValueError(f"SpectralNormLoss eps must be > 0, got {eps!r}")
        self.iterations = iterations
        self.layers = None if layers is None else list(layers)
        self.eps = float(eps)

    def per_layer(self, hidden_states: Sequence[torch.Tensor],
                  attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One mean log stable rank per chosen layer (fp32 vector)."""
        first = 1 if self.features == "hidden_states" else 0  # the embeddings are not a layer's output
        indices = self.layers if self.layers is not None else range(first, len(hidden_states))
        values = []
        for index in indices:
            features = hidden_states[index].float()
            if features.dim() != 3:
                raise ValueError(f"SpectralNormLoss layer {index}: expected hidden states [batch, seq, hidden], "
                                 f"got {tuple(features.shape)}")
            if attention_mask is not None:
                keep = attention_mask.to(features.device, torch.float32)
                if keep.shape != features.shape[:2]:
                    raise ValueError(f"SpectralNormLoss: attention_mask {tuple(keep.shape)} does not match the "
                                     f"hidden states' (batch, seq) {tuple(features.shape[:2])}")
                features = features * keep.unsqueeze(-1)  # a zero row changes no singular value
            frobenius_sq = features.square().sum(dim=(1, 2))
            spectral_sq = spectral_norm(features, self.iterations).square()
            values.append((torch.log(frobenius_sq + self.eps) - torch.log(spectral_sq + self.eps)).mean())
        if not values:
            raise ValueError("SpectralNormLoss: no layers to measure (hidden_states has only the embeddings?)")
        return torch.stack(values)

    def forward(self, hidden_states, attention_mask=None) -> torch.Tensor:
        return self.per_layer(hidden_states, attention_mask).mean()


@contextmanager
def capture_linear_inputs(model: nn.Module):
    """Collect, during the forwards run inside the block, the distinct input tensors of the model's
    prunable linears (``sparse_peft.sparsity.named_linears``) in call order.

    Linears fed the same tensor (q/k/v, gate/up) give one entry: deduplicated by identity, which is
    safe because every captured tensor stays alive in the list. Meant for the dense model before
    pruning; on a peft-wrapped model the adapters' own linears would be captured too.
    """
    captured: list[torch.Tensor] = []
    seen: set[int] = set()

    def keep_input(module, args):
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) not in seen:
            seen.add(id(args[0]))
            captured.append(args[0])

    handles = [linear.register_forward_pre_hook(keep_input) for _, linear in named_linears(model)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def spectral_features(model: nn.Module, inputs: dict, features: str = "hidden_states"):
    """Run ``model(**inputs)`` and return ``(outputs, feature tensors)`` for ``SpectralNormLoss``."""
    if features == "linear_inputs":
        with capture_linear_inputs(model) as captured:
            outputs = model(**inputs)
        if not captured:
            raise ValueError("spectral features='linear_inputs': the model ran no prunable nn.Linear")
        return outputs, captured
    if features != "hidden_states":
        raise ValueError(f"spectral features must be one of {FEATURES}, got {features!r}")
    outputs = model(**inputs, output_hidden_states=True)
    return outputs, outputs.hidden_states


def spectral_compute_loss(model: nn.Module, inputs: dict, spectral_lambda: float,
                          spectral_loss: Optional[SpectralNormLoss] = None, return_parts: bool = False):
    """``CE + spectral_lambda · SpectralNormLoss`` for one batch (``inputs`` with ``labels``).
    With ``return_parts`` also returns ``(outputs, {"ce": ..., "spectral": ...})``."""
    spectral_loss = spectral_loss or SpectralNormLoss()
    outputs, features = spectral_features(model, inputs, spectral_loss.features)
    ce = outputs.loss
    if ce is None:
        raise ValueError("spectral_compute_loss: the model returned no loss; pass labels in inputs")
    spectral = spectral_loss(features, inputs.get("attention_mask"))
    loss = ce + spectral_lambda * spectral.to(ce.dtype)
    if return_parts:
        return loss, outputs, {"ce": float(ce.detach()), "spectral": float(spectral.detach())}
    return loss


class SpectralNormTrainer(Trainer):
    """``transformers.Trainer`` whose loss is ``CE + spectral_lambda · SpectralNormLoss``: the
    feature-level induction stage, run on the dense model before pruning.

    Args:
        spectral_lambda: weight of the term (``0`` gives plain CE). Positive lowers the features'
            stable rank (the paper's direction); negative raises it, which is what measured better
            before Wanda on SmolLM2-135M (docs/induction.md). The term is bounded both ways: the log
            stable rank lies in ``[0, log min(tokens, features)]``.
        spectral_loss: a configured ``SpectralNormLoss`` (default: every layer's output, 10 power
            iterations; ``SpectralNormLoss(features="linear_inputs")`` for the linears' inputs).

    The CE and spectral parts of the last step are kept in ``self.last_loss_parts``.
    """

    def __init__(self, *args, spectral_lambda: float = 0.1, spectral_loss: Optional[SpectralNormLoss] = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if not is_real(spectral_lambda):
            raise ValueError(f"spectral_lambda must be a finite number, got {spectral_lambda!r}")
        self.spectral_lambda = float(spectral_lambda)
        self.spectral_loss = spectral_loss or SpectralNormLoss()
        self.last_loss_parts: dict[str, float] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs, parts = spectral_compute_loss(model, inputs, self.spectral_lambda, self.spectral_loss,
                                                     return_parts=True)
        self.last_loss_parts = parts
        return (loss, outputs) if return_outputs else loss
