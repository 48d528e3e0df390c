"""SquareHead distillation (Kurtic et al. 2023): recover a sparse student from its dense teacher.

    L = CE + λ · Σ_l mean_tokens((h_s^l - h_t^l)²) / (mean_tokens((h_t^l)²) + ε)

over the hidden state after every decoder layer (``hidden_states[1:]`` of a transformers model),
padding excluded. Normalising by the teacher's own energy makes every layer count about the same,
whatever the scale of its activations.

Three ways to use it:
- ``SquareHeadLoss`` on two tuples of hidden states (custom loops);
- ``SquareHeadTrainer``, a drop-in ``transformers.Trainer`` that holds the frozen teacher (on any
  device, in any dtype) and adds the term to the student's CE;
- ``logit_distillation_loss`` adds the logit term of the same paper's recipe, ``KL(teacher ‖ student)``
  of the next-token distributions (``SquareHeadTrainer(logit_lambda=...)``, recovery.py
  ``--logit-lambda``); it needs the teacher at training time (its logits are not cached);
- ``cache_teacher_hidden_states`` precomputes the teacher's hidden states for a fixed dataset, so
  training needs no teacher forward (memory: examples x layers x seq_len x hidden x bytes per
  value; for the SmolLM2-135M, 30 x 128 x 576 x 2 bytes = 4.4 MB per 128-token example in bf16).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .._progress import progress

try:
    from transformers import Trainer
except ImportError:  # pragma: no cover - transformers is a dependency
    Trainer = object


class SquareHeadLoss(nn.Module):
    """The normalised per-layer hidden-state MSE between a student and its teacher.

    Args:
        eps: added to the teacher's mean square (a layer whose output is all zero costs nothing).
        layers: which entries of ``hidden_states`` to match; default ``None`` = every layer output
            (``hidden_states[1:]``, the embeddings at index 0 are the same for both).
        reduction: ``"sum"`` over layers (the paper) or ``"mean"``.
    """

    def __init__(self, eps: float = 1e-6, layers: Optional[Sequence[int]] = None, reduction: str = "sum"):
        super().__init__()
        if not eps > 0:
            raise ValueError(f"SquareHeadLoss eps must be > 0, got {eps!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"SquareHeadLoss reduction must be 'sum' or 'mean', got {reduction!r}")
        self.eps = float(eps)
        self.layers = None if layers is None else list(layers)
        self.reduction = reduction

    def per_layer(self, student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                  attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One normalised MSE per matched layer (fp32 vector)."""
        if len(student_hidden) != len(teacher_hidden):
            raise ValueError(f"SquareHead: the student has {len(student_hidden)} hidden states, the teacher "
                             f"{len(teacher_hidden)}; distillation needs the same depth")
        indices = self.layers if self.layers is not None else range(1, len(student_hidden))
        losses = []
        for index in indices:
            student, teacher = student_hidden[index], teacher_hidden[index]
            if student.shape != teacher.shape:
                raise ValueError(f"SquareHead layer {index}: student hidden state {tuple(student.shape)} vs teacher "
                                 f"{tuple(teacher.shape)}")
            student = student.float()
            teacher = teacher.to(device=student.device, dtype=torch.float32).detach()
            squared_error = (student - teacher).square().mean(dim=-1)  # (batch, seq)
            teacher_energy = teacher.square().mean(dim=-1)
            if attention_mask is not None:
                keep = attention_mask.to(student.device, torch.float32)
                if keep.shape != squared_error.shape:
                    raise ValueError(f"SquareHead: attention_mask {tuple(keep.shape)} does not match the hidden "
                                     f"states' (batch, seq) {tuple(squared_error.shape)}")
                tokens = keep.sum().clamp_min(1.0)
                mse = (squared_error * keep).sum() / tokens
                energy = (teacher_energy * keep).sum() / tokens
            else:
                mse, energy = squared_error.mean(), teacher_energy.mean()
            losses.append(mse / (energy + self.eps))
        return torch.stack(losses)

    def forward(self, student_hidden, teacher_hidden, attention_mask=None) -> torch.Tensor:
        per_layer = self.per_layer(student_hidden, teacher_hidden, attention_mask)
        return per_layer.sum() if self.reduction == "sum" else per_layer.mean()


def logit_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            attention_mask: Optional[torch.Tensor] = None, temperature: float = 1.0) -> torch.Tensor:
    """``T² · KL(softmax(teacher / T) ‖ softmax(student / T))`` per token, averaged over the real
    tokens (``attention_mask`` 1), in fp32.

    The forward KL (teacher first) is the usual distillation term: it is the cross-entropy against the
    teacher's whole next-token distribution minus the teacher's entropy, so it is 0 exactly when the
    distributions agree and its gradient is ``softmax(student) - softmax(teacher)``, CE's with soft
    targets. ``T²`` keeps the gradient's size independent of ``T`` (Hinton et al.).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit distillation: student logits {tuple(student_logits.shape)} vs teacher "
                         f"{tuple(teacher_logits.shape)}; the teacher needs the same vocabulary")
    if not temperature > 0:
        raise ValueError(f"logit distillation temperature must be > 0, got {temperature!r}")
    student_log_probs = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = torch.log_softmax(teacher_logits.to(student_logits.device, torch.float32).detach()
                                          / temperature, dim=-1)
    per_token = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=-1)
    if attention_mask is None:
        return per_token.mean() * temperature ** 2
    keep = attention_mask.to(per_token.device, torch.float32)
    if keep.shape != per_token.shape:
        raise ValueError(f"logit distillation: attention_mask {tuple(keep.shape)} does not match the logits' "
                         f"(batch, seq) {tuple(per_token.shape)}")
    return (per_token * keep).sum() / keep.sum().clamp_min(1.0) * temperature ** 2


def distillation_loss(student_outputs, teacher_hidden, teacher_logits=None, *, squarehead_lambda: float,
                      logit_lambda: float = 0.0, squarehead_loss: Optional[SquareHeadLoss] = None,
                      attention_mask: Optional[torch.Tensor] = None, temperature: float = 1.0):
    """``(CE + squarehead_lambda · SquareHead + logit_lambda · KL, parts)`` for one batch: the loss of
    ``SquareHeadTrainer`` and of custom loops. ``student_outputs`` needs ``loss`` (labels given) and
    ``hidden_states``; a term whose weight is 0 is not computed (its teacher input may be None)."""
    ce = student_outputs.loss
    distill = logit = torch.zeros((), device=ce.device)
    if squarehead_lambda > 0:
        distill = (squarehead_loss or SquareHeadLoss())(student_outputs.hidden_states, teacher_hidden, attention_mask)
    if logit_lambda > 0:
        logit = logit_distillation_loss(student_outputs.logits, teacher_logits, attention_mask, temperature)
    loss = ce + squarehead_lambda * distill.to(ce.dtype) + logit_lambda * logit.to(ce.dtype)
    return loss, {"ce": float(ce.detach()), "squarehead": float(distill.detach()), "logit_kd": float(logit.detach())}


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, inputs: dict):
    """The frozen teacher's outputs (``hidden_states`` and ``logits``) for ``inputs``, moved to the
    teacher's device."""
    device = next(teacher.parameters()).device
    teacher_inputs = {k: v.to(device) for k, v in inputs.items()
                      if k in ("input_ids", "attention_mask", "position_ids") and torch.is_tensor(v)}
    return teacher(**teacher_inputs, output_hidden_states=True, use_cache=False)


def teacher_hidden_states(teacher: nn.Module, inputs: dict) -> tuple[torch.Tensor, ...]:
    """The frozen teacher's hidden states for ``inputs`` (moved to the teacher's device)."""
    return teacher_outputs(teacher, inputs).hidden_states


class CachedTeacherDataset(torch.utils.data.Dataset):
    """Wraps a dataset of ``{"input_ids", ...}`` items and adds the teacher's hidden states to each
    (stacked to one ``(layers + 1, seq, hidden)`` tensor, in ``dtype``), computed once up front."""

    def __init__(self, dataset, teacher: nn.Module, dtype: torch.dtype = torch.bfloat16, show_progress: bool = True):
        self.dataset = dataset
        self.hidden = []
        teacher.eval()
        for i in progress(range(len(dataset)), "teacher hidden states", show_progress):
            item = dataset[i]
            batch = {k: v.unsqueeze(0) for k, v in item.items()
                     if k in ("input_ids", "attention_mask") and torch.is_tensor(v)}
            states = teacher_hidden_states(teacher, batch)
            self.hidden.append(torch.stack([h[0] for h in states]).to("cpu", dtype))

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return dict(self.dataset[i], teacher_hidden_states=self.hidden[i])


def cache_teacher_hidden_states(teacher: nn.Module, dataset, dtype: torch.dtype = torch.bfloat16,
                                show_progress: bool = True) -> CachedTeacherDataset:
    """The cheaper mode: teacher hidden states for a fixed dataset, computed once (see the module doc
    for the memory it takes)."""
    return CachedTeacherDataset(dataset, teacher, dtype=dtype, show_progress=show_progress)


class SquareHeadTrainer(Trainer):
    """``transformers.Trainer`` whose loss is ``CE + squarehead_lambda · SquareHead
    + logit_lambda · KL(teacher ‖ student)``.

    Args:
        teacher_model: the dense teacher (frozen here: ``eval()``, no gradients). Put it on another
            device or in lower precision before passing it; inputs are moved to it. Not needed when
            the dataset comes from ``cache_teacher_hidden_states``.
        squarehead_lambda: weight of the distillation term (``0`` gives plain CE).
        squarehead_loss: a configured ``SquareHeadLoss`` (default: every layer, summed).
        logit_lambda: weight of ``logit_distillation_loss`` (default 0: off). Needs ``teacher_model``.
        temperature: the logit term's temperature.

    The CE and distillation parts of the last step are kept in ``self.last_loss_parts``.
    """

    def __init__(self, *args, teacher_model: Optional[nn.Module] = None, squarehead_lambda: float = 1.0,
                 squarehead_loss: Optional[SquareHeadLoss] = None, logit_lambda: float = 0.0,
                 temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if squarehead_lambda < 0:
            raise ValueError(f"squarehead_lambda must be >= 0, got {squarehead_lambda!r}")
        if logit_lambda < 0:
            raise ValueError(f"logit_lambda must be >= 0, got {logit_lambda!r}")
        if logit_lambda > 0 and teacher_model is None:
            raise ValueError("SquareHeadTrainer(logit_lambda > 0) needs teacher_model=...: the teacher's logits "
                             "are computed during training, not cached")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.logit_lambda, self.temperature = float(logit_lambda), float(temperature)
        self.teacher_model = teacher_model
        if teacher_model is not None:
            teacher_model.eval()
            teacher_model.requires_grad_(False)
        self.squarehead_lambda = float(squarehead_lambda)
        self.squarehead_loss = squarehead_loss or SquareHeadLoss()
        self.last_loss_parts: dict[str, float] = {}

    def _set_signature_columns_if_needed(self):
        # The Trainer drops dataset columns the model's forward does not take; keep the cached states.
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and "teacher_hidden_states" not in self._signature_columns:
            self._signature_columns.append("teacher_hidden_states")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cached = inputs.pop("teacher_hidden_states", None)
        outputs = model(**inputs, output_hidden_states=True)
        teacher = None
        if self.logit_lambda > 0 or (self.squarehead_lambda > 0 and cached is None):
            if self.teacher_model is None:
                raise ValueError("SquareHeadTrainer needs teacher_model=..., or a dataset from "
                                 "cache_teacher_hidden_states")
            teacher = teacher_outputs(self.teacher_model, inputs)
        # cached: (batch, layers + 1, seq, hidden) -> per layer
        teacher_hidden = cached.unbind(dim=1) if cached is not None else getattr(teacher, "hidden_states", None)
        loss, self.last_loss_parts = distillation_loss(
            outputs, teacher_hidden, getattr(teacher, "logits", None), squarehead_lambda=self.squarehead_lambda,
            logit_lambda=self.logit_lambda, squarehead_loss=self.squarehead_loss,
            attention_mask=inputs.get("attention_mask"), temperature=self.temperature)
        return (loss, outputs) if return_outputs else loss
