"""``y = x (W + ΔW)ᵀ + bias`` for a frozen weight ``W`` and a weight update ``ΔW`` made from a few small
trainable tensors, with nothing of size out x in kept between the forward and the backward.

Masked LoRA (``ΔW = s · (B A) ⊙ M``) and SPP (``ΔW = α · R(A) ⊙ b ⊙ W``) are both of this shape.
Written with plain autograd, ``ΔW`` (or ``W + ΔW``) is an out x in tensor per layer that autograd
keeps alive until the backward: for an 8B model that is about 28 GB in fp32, where LoRA keeps only
activations. Here the update is a function of a block of rows, ``delta_rows(start, stop, weight_rows)``,
and both passes rebuild it one block of rows at a time:

    forward    y[:, rows]  = x (W[rows] + ΔW[rows])ᵀ
    backward   dx         += dy[:, rows] (W[rows] + ΔW[rows])
               G[rows]     = dy[:, rows]ᵀ x          the gradient of ΔW[rows]
               d(params)  += autograd of ΔW[rows] = delta_rows(...) against G[rows]

What is saved for the backward is ``x`` and references to ``W`` and the trainable tensors, what
LoRA saves. Each transient is at most ``block_elements`` elements. The GEMMs run in ``x``'s dtype
(bf16 tensor cores / AMX where there are), the update is summed onto ``W`` in the wider dtype.
``grad_sink(start, stop, G_rows)``, when given, sees the dense gradient of the effective weight one
block at a time (SEFT accumulates it before a topology update). With ``with_base=False`` the
update alone is applied (``y = x ΔWᵀ``; the caller runs the base layer itself, e.g. when the base
layer has hooks or the update's input went through dropout).

The mask of a pruned layer is ``W != 0`` (every merge in this package keeps that exact), so an
update that needs it derives it from ``weight_rows`` inside ``delta_rows``: no mask is stored.

``weight`` may also be a function returning it (``weight()``, out x in): a quantized base keeps only
its packed weight, so the forward and the backward each call it for a transient dequantized copy
that is freed when the pass ends, instead of saving one out x in tensor per layer for the backward.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

#: Largest transient (elements) one block of rows may hold: 4 Mi elements, 16 MiB in fp32. Large
#: enough that each block is an efficient GEMM, small next to a 7B model's activations.
BLOCK_ELEMENTS = 1 << 22

DeltaRows = Callable[[int, int, torch.Tensor], torch.Tensor]
#: A frozen weight (out x in), or a function that returns it on each call (see the module docstring).
WeightSource = Union[torch.Tensor, Callable[[], torch.Tensor]]


def row_blocks(out_features: int, in_features: int, block_elements: Optional[int] = None):
    """``(start, stop)`` of consecutive row blocks of at most ``block_elements`` elements (at least one
    row; default ``BLOCK_ELEMENTS``, read at call time)."""
    rows = max(1, (block_elements or BLOCK_ELEMENTS) // max(1, in_features))
    for start in range(0, out_features, rows):
        yield start, min(out_features, start + rows)


def _block_weight(weight_rows: torch.Tensor, delta: torch.Tensor, with_base: bool, dtype: torch.dtype) -> torch.Tensor:
    """``W[rows] + ΔW[rows]`` (or ``ΔW[rows]``) in ``dtype``, summed in the wider of the two dtypes."""
    if not with_base:
        return delta.to(dtype)
    wide = torch.promote_types(weight_rows.dtype, delta.dtype)
    return (weight_rows.to(wide) + delta.to(wide)).to(dtype)


def blockwise_linear(x_2d: torch.Tensor, weight: torch.Tensor, delta_rows: DeltaRows, with_base: bool,
                     block_elements: Optional[int] = None) -> torch.Tensor:
    """``x (W + ΔW)ᵀ`` (or ``x ΔWᵀ``) for 2-D ``x``, no autograd, one block of rows of ``ΔW`` at a time."""
    out_features, in_features = weight.shape
    pieces = []
    with torch.no_grad():
        for start, stop in row_blocks(out_features, in_features, block_elements):
            weight_rows = weight[start:stop]
            block = _block_weight(weight_rows, delta_rows(start, stop, weight_rows), with_base, x_2d.dtype)
            pieces.append(x_2d @ block.t())
    return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]


def blockwise_grad_input(grad_2d: torch.Tensor, weight: torch.Tensor, delta_rows: DeltaRows, with_base: bool,
                         block_elements: Optional[int] = None) -> torch.Tensor:
    """``dy (W + ΔW)`` (or ``dy ΔW``) for 2-D ``dy``, no autograd, one block of rows at a time."""
    out_features, in_features = weight.shape
    grad_x = grad_2d.new_zeros(grad_2d.shape[0], in_features)
    with torch.no_grad():
        for start, stop in row_blocks(out_features, in_features, block_elements):
            weight_rows = weight[start:stop]
            block = _block_weight(weight_rows, delta_rows(start, stop, weight_rows), with_base, grad_2d.dtype)
            grad_x.addmm_(grad_2d[:, start:stop], block)
    return grad_x


def weight_grad_rows(grad_rows: torch.Tensor, x_2d: torch.Tensor) -> torch.Tensor:
    """``G[rows] = dy[:, rows]ᵀ x``, the gradient of the effective weight's rows, in fp32 (or wider):
    the GEMM runs in the inputs' dtype, its result feeds fp32 optimizer state."""
    return (grad_rows.t() @ x_2d).to(torch.promote_types(x_2d.dtype, torch.float32))


class DeltaLinear(torch.autograd.Function):
    """See the module docstring. ``params`` are the tensors ``delta_rows`` reads (their gradients)."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta_rows, with_base, block_elements, grad_sink, *params):
        # A weight function is called again in the backward: only x and the parameters are saved.
        ctx.weight_fn = weight if callable(weight) else None
        if ctx.weight_fn is not None:
            weight = _frozen(weight(), x)
            ctx.save_for_backward(x, *params)
        else:
            ctx.save_for_backward(x, weight, *params)
        ctx.delta_rows, ctx.with_base, ctx.block_elements = delta_rows, with_base, block_elements
        ctx.grad_sink = grad_sink
        ctx.has_bias = bias is not None
        out_features, in_features = weight.shape
        y = blockwise_linear(x.reshape(-1, in_features), weight, delta_rows, with_base, block_elements)
        if bias is not None and with_base:
            y = y + bias.to(y.dtype)
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_y):
        if ctx.weight_fn is not None:
            x, *params = ctx.saved_tensors
            weight = _frozen(ctx.weight_fn(), x)
        else:
            x, weight, *params = ctx.saved_tensors
        out_features, in_features = weight.shape
        x_2d = x.reshape(-1, in_features)
        grad_2d = grad_y.reshape(-1, out_features)
        need_x = ctx.needs_input_grad[0]
        need_params = [ctx.needs_input_grad[7 + i] for i in range(len(params))]
        grad_x = torch.zeros_like(x_2d) if need_x else None
        grad_params: list[Optional[torch.Tensor]] = [None] * len(params)
        trainable = [p for p, need in zip(params, need_params) if need]
        for start, stop in row_blocks(out_features, in_features, ctx.block_elements):
            weight_rows = weight[start:stop]
            grad_rows = grad_2d[:, start:stop]
            with torch.enable_grad():
                delta = ctx.delta_rows(start, stop, weight_rows)
            if need_x:
                grad_x.addmm_(grad_rows, _block_weight(weight_rows, delta.detach(), ctx.with_base, x.dtype))
            train_block = bool(trainable) and delta.requires_grad
            if train_block or ctx.grad_sink is not None:
                grad_delta = weight_grad_rows(grad_rows, x_2d)
                if ctx.grad_sink is not None:
                    ctx.grad_sink(start, stop, grad_delta)
            if train_block:
                # autograd of the small graph delta_rows built turns G[rows] into the parameters' gradients
                block_grads = iter(torch.autograd.grad(delta, trainable, grad_delta.to(delta.dtype), allow_unused=True))
                for i, need in enumerate(need_params):
                    if need:
                        g = next(block_grads)
                        if g is not None:
                            grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
            del delta
        grad_bias = None
        if ctx.has_bias and ctx.with_base and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(dim=0)
        grad_x = grad_x.view(x.shape) if grad_x is not None else None
        return (grad_x, None, grad_bias, None, None, None, None, *grad_params)


def _frozen(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What a weight function returned, checked against the input and detached."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"delta_linear: input with {x.shape[-1]} features for a weight of shape {tuple(weight.shape)}")
    return weight.detach()


def delta_linear(x: torch.Tensor, weight: WeightSource, bias: Optional[torch.Tensor], delta_rows: DeltaRows,
                 params: Sequence[torch.Tensor], *, with_base: bool = True, block_elements: Optional[int] = None,
                 grad_sink: Optional[Callable[[int, int, torch.Tensor], None]] = None) -> torch.Tensor:
    """``x (W + ΔW)ᵀ + bias`` (``with_base``) or ``x ΔWᵀ``, ``ΔW[start:stop] = delta_rows(start, stop, W[start:stop])``.

    ``weight`` (out, in) is frozen (no gradient is computed for it), or a function returning it that
    the forward and the backward each call once (a quantized base dequantized per call); ``params`` are the trainable
    tensors ``delta_rows`` reads, in any dtype (the update is summed onto ``W`` in the wider dtype,
    and the GEMMs run in ``x``'s dtype). ``delta_rows`` must be a pure function of its arguments and
    ``params``: the backward calls it again.
    """
    if callable(weight):
        return DeltaLinear.apply(x, weight, bias, delta_rows, with_base, block_elements, grad_sink, *params)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"delta_linear: input with {x.shape[-1]} features for a weight of shape {tuple(weight.shape)}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("delta_linear keeps the base weight frozen, but weight.requires_grad is True")
    return DeltaLinear.apply(x, weight, bias, delta_rows, with_base, block_elements, grad_sink, *params)
