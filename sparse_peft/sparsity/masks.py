"""Masks: where a weight is allowed to be nonzero.

A mask is a bool tensor shaped like the weight; ``True`` marks a kept (possibly trained) position,
``False`` a pruned one that must stay exactly ``0.0``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

#: The layer types pruning and the sparse tuners handle: ``nn.Linear`` (weight out x in,
#: ``y = x Wᵀ + b``) and transformers' ``Conv1D`` (GPT-2 family: weight in x out, ``y = x W + b``).
LINEAR_TYPES = (nn.Linear, Conv1D)

# Odd multiplier for the positional checksum (Knuth's multiplicative hash); the modulus keeps each
# term below 2**31 so the int64 sum cannot overflow for layers of up to 2**32 positions.
_HASH_MULT = 2654435761
_HASH_MOD = 2**31 - 1
# Positions a fingerprint hashes at a time: their int64 indices (8 bytes a position, 2 MiB here) stay
# small next to a layer's, which glibc would otherwise keep in its heap after the tuners' setup.
_FINGERPRINT_CHUNK = 1 << 18


def weight_mask(weight: torch.Tensor) -> torch.Tensor:
    """The mask a pruned weight carries: ``weight != 0``."""
    return weight.detach() != 0


def sparsity_of(mask_or_weight: torch.Tensor) -> float:
    """Fraction of zeros (for a bool mask: of ``False`` entries)."""
    t = mask_or_weight if mask_or_weight.dtype == torch.bool else mask_or_weight != 0
    return 1.0 - t.count_nonzero().item() / t.numel()


def parse_pattern(pattern: str) -> tuple[int, int]:
    """Parse an ``"N:M"`` pattern (at most N nonzeros in every M consecutive inputs)."""
    try:
        n_str, m_str = str(pattern).split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        raise ValueError(f"pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}") from None
    if not (0 < n < m):
        raise ValueError(f"pattern {pattern!r} needs 0 < N < M, got N={n}, M={m}")
    return n, m


def parse_target(target) -> dict:
    """The keyword argument of ``prune`` that a sparsity target written as text stands for.

    ``"0.5"``, ``"50%"`` or ``0.5`` -> ``{"sparsity": 0.5}`` (a fraction in [0, 1));
    ``"2:4"`` -> ``{"pattern": "2:4"}`` (N:M, ``0 < N < M``). So ``prune(model, **parse_target(text))``
    prunes to what a command line or a results table names. Raises ValueError naming the value.
    """
    text = str(target).strip()
    if ":" in text:
        n, m = parse_pattern(text)
        return {"pattern": f"{n}:{m}"}
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = None
    if isinstance(target, bool) or value is None or not 0.0 <= value < 1.0:
        raise ValueError(f"sparsity target must be in [0, 1) (a fraction such as 0.5 or 50%) or an N:M pattern "
                         f"such as 2:4, got {target!r}")
    return {"sparsity": value}


def check_nm_divides(in_features: int, m: int, layer_name: str) -> None:
    """N:M groups run along the input dimension, so M must divide it."""
    if in_features % m != 0:
        raise ValueError(
            f"layer {layer_name!r}: N:M pattern with M={m} does not divide in_features={in_features}"
        )


def is_nm_sparse(weight_or_mask: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of ``m`` consecutive inputs of every row has at most ``n`` nonzeros."""
    kept = weight_or_mask if weight_or_mask.dtype == torch.bool else weight_or_mask != 0
    out_features, in_features = kept.shape
    if in_features % m != 0:
        return False
    per_group = kept.reshape(out_features, in_features // m, m).sum(dim=-1)
    return bool((per_group <= n).all())


def mask_fingerprint(mask: torch.Tensor) -> torch.Tensor:
    """A small int64 tensor ``[numel, nnz, checksum]`` that identifies a mask.

    Adapters store it instead of the whole mask so that loading them onto a base whose sparsity
    pattern differs can be refused (the checksum depends on every kept position).
    """
    flat = mask.reshape(-1)
    checksum, kept = torch.zeros((), dtype=torch.int64, device=mask.device), 0
    for start in range(0, flat.numel(), _FINGERPRINT_CHUNK):
        flat_idx = flat[start:start + _FINGERPRINT_CHUNK].nonzero().squeeze(-1).to(torch.int64).add_(start)
        kept += flat_idx.numel()
        checksum += flat_idx.mul_(_HASH_MULT).remainder_(_HASH_MOD).sum()
    return torch.stack(
        [torch.tensor(mask.numel(), dtype=torch.int64), torch.tensor(kept, dtype=torch.int64), checksum.cpu()]
    )


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer pruning and the sparse tuners handle (``LINEAR_TYPES``)."""
    return isinstance(module, LINEAR_TYPES)


class LinearView:
    """A linear-like module seen as ``y = x Wᵀ + b`` with ``W`` out x in, whatever its storage.

    Scores, masks, N:M groups, reports and adapters all work in the out x in sense (a row per
    output, N:M groups along consecutive inputs), so they mean the same for ``nn.Linear`` and for
    transformers' ``Conv1D``, which stores ``W`` transposed. ``weight`` is a view (``Conv1D``:
    ``weight.T``, no copy): in-place writes to it (``copy_``, index assignment) land in the stored
    weight. ``to_stored`` turns an out x in tensor into the stored layout, for assigning
    ``.weight.data``. Properties are read on access, so a view stays valid after ``.data`` is
    replaced.
    """

    __slots__ = ("module", "transposed")

    def __init__(self, module: nn.Module):
        if not is_linear(module):
            raise TypeError(f"expected torch.nn.Linear or transformers' Conv1D, got {type(module).__name__}")
        self.module = module
        self.transposed = isinstance(module, Conv1D)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as out x in (a view of the parameter, not a copy)."""
        return self.module.weight.T if self.transposed else self.module.weight

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[1 if self.transposed else 0]

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[0 if self.transposed else 1]

    def to_stored(self, out_in: torch.Tensor) -> torch.Tensor:
        """An out x in tensor in the layout the module stores its weight in (contiguous)."""
        return out_in.T.contiguous() if self.transposed else out_in


def linear_view(module: nn.Module) -> LinearView:
    """``module`` (``nn.Linear`` or ``Conv1D``) as an out x in linear; see ``LinearView``."""
    return LinearView(module)


def named_linears(model: nn.Module, include_lm_head: bool = False):
    """Yield ``(name, module)`` for the linear layers that pruning and sparse adapters target:
    ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2 family; see ``linear_view`` for its layout).

    The output head (and anything tied to the input embeddings) is left out unless asked for:
    pruning it costs far more accuracy than it saves.
    """
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if not is_linear(module):
            continue
        if not include_lm_head and (module is out_emb or name.split(".")[-1] == "lm_head"):
            continue
        yield name, module


def restore_mask(weight: torch.Tensor, mask: torch.Tensor, sign_source: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``weight`` with exactly the support ``mask``: ``+0.0`` outside, nonzero inside.

    Inside the mask a value may be exactly ``0.0`` (an update that cancels the weight, a SparseGPT
    update that lands on 0, underflow when casting down); that would silently raise the layer's
    sparsity and change its mask, so such entries become the dtype's smallest normal number
    (``finfo.tiny``: about 1e-38 in fp32/bf16, 6e-5 in fp16), with the sign of ``sign_source``
    (e.g. the unrounded value) or of the zero itself: far below anything that changes an output.
    The one place every pruner and every merge keeps the support exact.
    """
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    kept = torch.where(mask, weight, zero)  # +0.0 outside, never -0.0
    landed_on_zero = mask & (kept == 0)
    if landed_on_zero.any():
        sign = (weight if sign_source is None else sign_source).to(weight.dtype)
        tiny = torch.copysign(torch.full_like(kept, torch.finfo(weight.dtype).tiny), sign)
        kept = torch.where(landed_on_zero, tiny, kept)
    return kept
