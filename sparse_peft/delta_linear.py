"""``y = x (W + ΔW)ᵀ + bias`` for a frozen weight ``W`` and a weight update ``ΔW`` made from a few small
trainable tensors, with nothing of size out x in kept between the forward and the backward.

Masked LoRA (``ΔW = s · (B A) ⊙ M``) and SPP (``ΔW = α · R(A) ⊙ b ⊙ W``) are both of this shape.
Written with plain autograd, ``ΔW`` (or ``W + ΔW``) is an out x in tensor per layer that autograd
keeps alive until the backward: for an 8B model that is about 28 GB in fp32, where LoRA keeps only
activations. Here a ``RowUpdate`` builds the effective weight one block of rows at a time, and both
passes rebuild it:

    forward    y[:, rows]  = x (W[rows] + ΔW[rows])ᵀ
    backward   dx         += dy[:, rows] (W[rows] + ΔW[rows])
               G[rows]     = dy[:, rows]ᵀ x          the gradient of ΔW[rows]
               d(params)  += RowUpdate.param_grads(rows, G[rows])

What is saved for the backward is ``x`` and references to ``W`` and the trainable tensors, what
LoRA saves. Each transient is at most ``BLOCK_ELEMENTS`` elements (``DEVICE_BLOCK_ELEMENTS`` on a
GPU). The big GEMMs run in ``x``'s dtype (bf16 tensor cores / AMX where there are; ``G`` in fp32 on
a CPU without AMX, ``weight_grad_dtype``); a ``RowUpdate`` forms ``W + ΔW`` in that dtype with one
rounding (what the merged model holds) and turns ``G`` into fp32 gradients for its parameters. With
``with_base=False`` the update alone is applied (``y = x ΔWᵀ``; the caller runs the base layer
itself, e.g. when the base layer has hooks or the update's input went through dropout).

Each pass takes its block-sized scratch tensors (the block of ``W + ΔW``, its mask, ``G[rows]``) by
name from a ``Workspace`` and writes into them with ``out=`` and in-place ops, so its loop allocates
nothing per block. On a CPU the process keeps that workspace between passes (``pass_workspace``):
once glibc's mmap threshold has adapted, blocks of a few MiB allocated and freed one after another
come from its heap, and those freed between activations stay in the resident set. The kept buffers
are bounded: a few names, each as large as the largest block a pass asked for (``workspace_bytes``;
``release_workspace`` frees them).

The mask of a pruned layer is ``W != 0`` (every merge in this package keeps that exact), so an
update that needs it derives it from the block of ``W`` it is given: no mask is stored. On a CPU,
for large blocks, the updates' element-wise passes over a block run as one loop compiled by
``torch.compile`` (``_cpu_fusion``: masked LoRA's uses of the mask, which then is not written at all,
and SPP's ``W + W ⊙ change`` in bf16 / fp16), with the eager ops' results bit for bit.

``weight`` may also be a function returning it (``weight()``, out x in): a quantized base keeps only
its packed weight, so the forward and the backward each call it for a transient dequantized copy
that is freed when the pass ends, instead of saving one out x in tensor per layer for the backward.
"""

from __future__ import annotations

import functools
import math
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Protocol, Sequence, Union

import torch

from . import _blocks, _cpu_fusion

#: Largest transient (elements) one block of rows may hold: 4 Mi elements, 16 MiB in fp32. Large
#: enough that each block is an efficient GEMM, small next to a 7B model's activations.
BLOCK_ELEMENTS = 1 << 22
#: The block on a GPU: 16 Mi elements (32 MiB in bf16). Each block costs each pass a dozen small
#: kernels and the Python calls that queue them; at a few hundred tokens a GPU finishes those faster
#: than the host issues them, so the step time grew with the number of blocks (a 2048-wide layer of
#: 4x MLP took four blocks of 4 Mi where one does). A few such transients stay small next to the
#: activations of the batches trained on a GPU.
DEVICE_BLOCK_ELEMENTS = 1 << 24

#: A frozen weight (out x in), or a function that returns it on each call (see the module docstring).
WeightSource = Union[torch.Tensor, Callable[[], torch.Tensor]]

#: A parameter's gradient contribution from one block: (index into ``params``, the rows of the
#: parameter it covers or ``None`` for the whole parameter, the gradient).
GradPiece = tuple[int, Optional[slice], torch.Tensor]


class Workspace:
    """Where a pass takes its scratch tensors, by name. This one allocates a new tensor each time: what
    a ``RowUpdate`` returns through it outlives the call (a whole ``ΔW`` for merging, say)."""

    def take(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialized tensor. In a ``ReusedWorkspace`` a name's tensors share memory: whatever was
        taken under the name before is overwritten. Names in use: ``grad`` (the loops' ``G[rows]``),
        ``update``, ``mask``, ``cast``, ``result``, ``sampled`` and ``masked`` (the ``RowUpdate``s')."""
        return torch.empty(shape, dtype=dtype, device=device)


#: A workspace that allocates every tensor: the default wherever a result must outlive the call.
FRESH = Workspace()


class ReusedWorkspace(Workspace):
    """One buffer per (name, device), grown to the largest request and reused by every later ``take``
    of that name, whatever the dtype."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.device], torch.Tensor] = {}

    def take(self, name, shape, dtype, device):
        nbytes = math.prod(shape) * dtype.itemsize
        key = (name, torch.device(device))
        if key not in self.buffers or self.buffers[key].numel() < nbytes:
            self.buffers.pop(key, None)  # freed before the larger one is allocated
            # A normal tensor even under inference_mode: a later training pass writes into it.
            with torch.inference_mode(False):
                self.buffers[key] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return self.buffers[key][:nbytes].view(dtype).view(shape)

    @property
    def nbytes(self) -> int:
        return sum(buffer.numel() for buffer in self.buffers.values())


_kept_workspace: Optional[ReusedWorkspace] = None  # the CPU passes' workspace while no pass holds it
_kept_lock = threading.Lock()


@contextmanager
def pass_workspace(device: torch.device) -> Iterator[ReusedWorkspace]:
    """The workspace of one pass on ``device``, reused from block to block. On a CPU the process keeps
    it for the next pass (one at most: a pass running meanwhile, in another thread, gets its own, freed
    when it ends); elsewhere each pass has its own, which the device's caching allocator recycles."""
    global _kept_workspace
    if torch.device(device).type != "cpu":
        yield ReusedWorkspace()
        return
    with _kept_lock:
        workspace, _kept_workspace = _kept_workspace, None
    workspace = workspace if workspace is not None else ReusedWorkspace()
    try:
        yield workspace
    finally:
        with _kept_lock:
            if _kept_workspace is None:
                _kept_workspace = workspace


def workspace_bytes() -> int:
    """Bytes the CPU workspace kept between passes holds (0 when there is none)."""
    workspace = _kept_workspace
    return workspace.nbytes if workspace is not None else 0


def release_workspace() -> None:
    """Free the CPU workspace kept between passes (call it between passes: the next one allocates anew)."""
    global _kept_workspace
    with _kept_lock:
        _kept_workspace = None


class RowUpdate(Protocol):
    """How one method's ``ΔW`` is built and differentiated a block of rows at a time."""

    params: Sequence[torch.Tensor]

    def mask_rows(self, weight_rows: torch.Tensor, dtype: torch.dtype,
                  workspace: Workspace = FRESH) -> Optional[torch.Tensor]:
        """What the block's two backward calls share (its mask), or None: computed once per block."""
        ...

    def weight_rows(self, start: int, stop: int, weight_rows: torch.Tensor, dtype: torch.dtype,
                    with_base: bool, mask: Optional[torch.Tensor] = None,
                    workspace: Workspace = FRESH) -> torch.Tensor:
        """``W[rows] + ΔW[rows]`` (``with_base``) or ``ΔW[rows]``, in ``dtype``, without autograd; its
        block-sized tensors (the result included) taken from ``workspace``."""
        ...

    def param_grads(self, start: int, stop: int, weight_rows: torch.Tensor, grad_rows: torch.Tensor,
                    mask: Optional[torch.Tensor] = None, workspace: Workspace = FRESH) -> list[GradPiece]:
        """The parameters' gradients from ``G[rows]`` (``grad_rows``, in ``weight_grad_dtype`` of the
        activations; ``mask``, from ``mask_rows``, in theirs; the update may overwrite ``grad_rows``).
        The pieces are new tensors (they are summed after the block)."""
        ...


def row_blocks(out_features: int, in_features: int, block_elements: Optional[int] = None,
               device: Optional[torch.device] = None):
    """``(start, stop)`` of consecutive row blocks of at most ``block_elements`` elements (at least one
    row; default, read at call time: ``BLOCK_ELEMENTS`` on a CPU or with no device given,
    ``DEVICE_BLOCK_ELEMENTS`` on any other)."""
    if not block_elements:
        on_cpu = device is None or torch.device(device).type == "cpu"
        block_elements = BLOCK_ELEMENTS if on_cpu else DEVICE_BLOCK_ELEMENTS
    return _blocks.row_blocks(out_features, in_features, block_elements)


def blockwise_linear(x_2d: torch.Tensor, weight: torch.Tensor, update: RowUpdate, with_base: bool,
                     block_elements: Optional[int] = None) -> torch.Tensor:
    """``x (W + ΔW)ᵀ`` (or ``x ΔWᵀ``) for 2-D ``x``, no autograd, one block of rows at a time."""
    out_features, in_features = weight.shape
    with torch.no_grad(), pass_workspace(x_2d.device) as workspace:
        y = x_2d.new_empty(x_2d.shape[0], out_features)
        for start, stop in row_blocks(out_features, in_features, block_elements, x_2d.device):
            block = update.weight_rows(start, stop, weight[start:stop], x_2d.dtype, with_base, workspace=workspace)
            torch.mm(x_2d, block.t(), out=y[:, start:stop])  # a strided column block: the GEMM writes it directly
    return y


def blockwise_grad_input(grad_2d: torch.Tensor, weight: torch.Tensor, update: RowUpdate, with_base: bool,
                         block_elements: Optional[int] = None) -> torch.Tensor:
    """``dy (W + ΔW)`` (or ``dy ΔW``) for 2-D ``dy``, no autograd, one block of rows at a time."""
    out_features, in_features = weight.shape
    grad_x = grad_2d.new_empty(grad_2d.shape[0], in_features)  # the first block writes it
    with torch.no_grad(), pass_workspace(grad_2d.device) as workspace:
        for start, stop in row_blocks(out_features, in_features, block_elements, grad_2d.device):
            block = update.weight_rows(start, stop, weight[start:stop], grad_2d.dtype, with_base, workspace=workspace)
            add_product(grad_x, grad_2d[:, start:stop], block, first=start == 0)
    return grad_x


def add_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``total += a b``, or ``total = a b`` for the ``first`` block of rows (``total`` may be uninitialized
    then): no zero fill, and the first GEMM does not read ``total``."""
    if first:
        torch.mm(a, b, out=total)
    else:
        total.addmm_(a, b)


LOW_PRECISION = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _cpu_has_matrix_units(dtype: torch.dtype) -> bool:
    """Whether this CPU has AMX for ``dtype`` (bf16: AMX tiles; fp16: AMX-FP16): what makes oneDNN's
    low-precision GEMMs faster than its fp32 ones."""
    try:
        if dtype == torch.float16:
            return bool(torch.cpu._is_amx_fp16_supported())
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # an older or other build: no way to tell, take fp32
        return False


def weight_grad_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype ``G = dyᵀ x`` is computed in for activations in ``dtype`` on ``device``: theirs, except
    bf16 / fp16 on a CPU without AMX for that dtype, where it is fp32 from up-cast operands. There
    oneDNN's bf16 GEMM ran 1.5-2x slower than its fp32 one and fp16 no faster (AVX-512 with bf16 dot
    products, 512 tokens, 2048 x 8192), so the up-cast (two activation-sized copies per backward)
    pays for itself, and ``G`` is not rounded to bf16. The forward and ``dx`` keep the activations' dtype: the forward's
    ``W + ΔW`` is rounded as the merged model holds it. ``G`` only feeds fp32 parameter gradients."""
    if dtype in LOW_PRECISION and torch.device(device).type == "cpu" and not _cpu_has_matrix_units(dtype):
        return torch.float32
    return dtype


def grad_operands(grad_2d: torch.Tensor, x_2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dyᵀ, x)`` for ``grad_weight_rows``, from ``dy`` (tokens, out) and ``x`` (tokens, in), in
    ``weight_grad_dtype``. ``dyᵀ`` is a view, except in bf16 / fp16 on a CPU: a contiguous copy, since
    oneDNN's low-precision GEMM ran ``dy[:, rows]ᵀ x`` 1.2-1.6x slower from the transposed view
    (512 tokens, weights of 1-16 Mi elements). In fp32 the view measured as fast or faster, and GPU
    GEMMs read a transposed operand without a copy."""
    dtype = weight_grad_dtype(x_2d.dtype, x_2d.device)
    if dtype != x_2d.dtype:
        return grad_2d.to(dtype).t(), x_2d.to(dtype)
    if grad_2d.device.type == "cpu" and dtype in LOW_PRECISION:
        return grad_2d.t().contiguous(), x_2d
    return grad_2d.t(), x_2d


def grad_weight_rows(grad_t: torch.Tensor, x_2d: torch.Tensor, start: int, stop: int,
                     workspace: Workspace = FRESH) -> torch.Tensor:
    """``G[rows] = dy[:, rows]ᵀ x`` in ``x_2d``'s dtype, in ``workspace``'s ``grad``; ``(grad_t, x_2d)``
    are ``grad_operands(dy, x)``."""
    out = workspace.take("grad", (stop - start, x_2d.shape[1]), x_2d.dtype, x_2d.device)
    return torch.mm(grad_t[start:stop], x_2d, out=out)


class DeltaLinear(torch.autograd.Function):
    """See the module docstring. ``params`` are ``update.params`` (autograd needs them as inputs)."""

    @staticmethod
    def forward(ctx, x, weight, bias, update, with_base, block_elements, *params):
        # A weight function is called again in the backward: only x and the parameters are saved.
        ctx.weight_fn = weight if callable(weight) else None
        if ctx.weight_fn is not None:
            weight = _checked(weight(), x)
            ctx.save_for_backward(x, *params)
        else:
            ctx.save_for_backward(x, weight, *params)
        ctx.update, ctx.with_base, ctx.block_elements = update, with_base, block_elements
        ctx.has_bias = bias is not None
        out_features, in_features = weight.shape
        y = blockwise_linear(x.reshape(-1, in_features), weight, update, with_base, block_elements)
        if bias is not None and with_base:
            y.add_(bias.to(y.dtype))  # y is new: no second activation-sized tensor
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    @torch.no_grad()
    def backward(ctx, grad_y):
        if ctx.weight_fn is not None:
            x, *params = ctx.saved_tensors
            weight = _checked(ctx.weight_fn(), x)
        else:
            x, weight, *params = ctx.saved_tensors
        update = ctx.update
        out_features, in_features = weight.shape
        x_2d = x.reshape(-1, in_features)
        grad_2d = grad_y.reshape(-1, out_features).to(x.dtype)
        need_x = ctx.needs_input_grad[0]
        need_params = any(ctx.needs_input_grad[6:])
        grad_x = torch.empty_like(x_2d) if need_x else None  # the first block writes it
        grad_params: list[Optional[torch.Tensor]] = [None] * len(params)
        grad_t, x_for_grad = grad_operands(grad_2d, x_2d) if need_params else (None, None)
        with pass_workspace(x.device) as workspace:
            for start, stop in row_blocks(out_features, in_features, ctx.block_elements, x.device):
                weight_rows = weight[start:stop]
                mask = update.mask_rows(weight_rows, x.dtype, workspace) if need_x and need_params else None
                if need_x:
                    block = update.weight_rows(start, stop, weight_rows, x.dtype, ctx.with_base, mask, workspace)
                    add_product(grad_x, grad_2d[:, start:stop], block, first=start == 0)
                if need_params:
                    grad_rows = grad_weight_rows(grad_t, x_for_grad, start, stop, workspace)
                    for index, rows, piece in update.param_grads(start, stop, weight_rows, grad_rows, mask, workspace):
                        _accumulate(grad_params, index, rows, piece, params[index])
        grad_bias = grad_2d.sum(dim=0) if ctx.has_bias and ctx.with_base and ctx.needs_input_grad[2] else None
        grad_params = [g.to(p.dtype) if g is not None else None for g, p in zip(grad_params, params)]
        grad_x = grad_x.view(x.shape) if grad_x is not None else None
        return (grad_x, None, grad_bias, None, None, None, *grad_params)


def _accumulate(grads: list, index: int, rows: Optional[slice], piece: torch.Tensor, param: torch.Tensor) -> None:
    if grads[index] is None:
        grads[index] = torch.zeros(param.shape, dtype=piece.dtype, device=piece.device)
    if rows is None:
        grads[index] += piece
    else:
        grads[index][rows] += piece


def _checked(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The weight (or what a weight function returned) checked against the input."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"delta_linear: input with {x.shape[-1]} features for a weight of shape {tuple(weight.shape)}")
    return weight.detach()


def delta_linear(x: torch.Tensor, weight: WeightSource, bias: Optional[torch.Tensor], update: RowUpdate, *,
                 with_base: bool = True, block_elements: Optional[int] = None) -> torch.Tensor:
    """``x (W + ΔW)ᵀ + bias`` (``with_base``) or ``x ΔWᵀ``, ``ΔW`` built by ``update`` a block of rows at a time.

    ``weight`` (out, in) is frozen (no gradient is computed for it), or a function returning it that
    the forward and the backward each call once (a quantized base dequantized per call);
    ``update.params`` are the trainable tensors, in any dtype (their gradients are accumulated in
    fp32 and cast to it).
    """
    if callable(weight):
        return DeltaLinear.apply(x, weight, bias, update, with_base, block_elements, *update.params)
    _checked(weight, x)
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("delta_linear keeps the base weight frozen, but weight.requires_grad is True")
    return DeltaLinear.apply(x, weight, bias, update, with_base, block_elements, *update.params)


def _wide(grad_rows: torch.Tensor, param: torch.Tensor) -> torch.dtype:
    """The dtype parameter gradients are formed in: fp32, or wider when the inputs are (fp64 gradcheck)."""
    return torch.promote_types(torch.promote_types(grad_rows.dtype, param.dtype), torch.float32)


def kept(weight_rows: torch.Tensor, dtype: Optional[torch.dtype] = None, workspace: Workspace = FRESH) -> torch.Tensor:
    """The mask ``W != 0`` as 0/1 in ``dtype`` (default ``W``'s), as ``workspace``'s ``mask``. The comparison
    is made in ``W``'s dtype (a tiny weight may round to 0 in another) and written straight as 0/1 in
    ``dtype``: one vectorized pass. Multiplying by it is another; a bool mask's ``masked_fill``/``where``
    on bf16 runs several times slower on a CPU."""
    dtype = weight_rows.dtype if dtype is None else dtype
    mask = workspace.take("mask", weight_rows.shape, dtype, weight_rows.device)
    return torch.ne(weight_rows, 0, out=mask)


def output_for(operand: torch.Tensor, name: str, workspace: Workspace = FRESH) -> torch.Tensor:
    """Where an elementwise op over a block writes, ``operand`` being one of its inputs: ``operand``
    itself, except in bf16 / fp16 on a CPU: there a separate buffer, ``workspace``'s ``name``. With its
    output one of its inputs, such an op ran 1.2-1.5x slower on blocks read from memory (one thread,
    bf16 blocks of 4 Mi elements of a weight larger than the caches: ``W + (B A) ⊙ M`` 6.1-6.6 ms
    against 4.5 ms, SPP's ``G ⊙ W`` 5.2-5.6 against 4.0-4.2; masked LoRA's ``G ⊙ M`` on a 2048 x 2048
    block of ``G`` just written by the GEMM, AMX, median of 9: 4.3 against 1.5 ms); in fp32 in place was
    as fast or faster."""
    if operand.device.type == "cpu" and operand.dtype in LOW_PRECISION:
        return workspace.take(name, operand.shape, operand.dtype, operand.device)
    return operand


def in_dtype(weight_rows: torch.Tensor, dtype: torch.dtype, workspace: Workspace = FRESH) -> torch.Tensor:
    """``W[rows]`` in ``dtype``: itself, or a copy in ``workspace``'s ``cast``."""
    if weight_rows.dtype == dtype:
        return weight_rows
    return workspace.take("cast", weight_rows.shape, dtype, weight_rows.device).copy_(weight_rows)


class MaskedLowRankUpdate:
    """``ΔW = s · (B A) ⊙ M`` with ``M = W != 0`` (masked LoRA): ``A`` (r, in), ``B`` (out, r)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scaling: float):
        self.params, self.scaling = (A, B), float(scaling)
        self._factors: dict = {}  # dtype -> (the parameters' versions, factors_in's tensors)

    def factors_in(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(s·B, A, s·A)``, detached, in ``dtype``: made once and sliced by every block (LoRA-sized,
        they were remade per block: on a GPU each is a kernel launch), remade when a parameter changes
        (its version; inference tensors keep none, so theirs are remade on every call)."""
        A, B = self.params
        versions = None if A.is_inference() or B.is_inference() else (A._version, B._version)
        cached = self._factors.get(dtype)
        if versions is None or cached is None or cached[0] != versions:
            A = A.detach()
            cached = (versions, ((B.detach() * self.scaling).to(dtype), A.to(dtype), (A * self.scaling).to(dtype)))
            self._factors[dtype] = cached
        return cached[1]

    def mask_rows(self, weight_rows, dtype, workspace=FRESH):
        if _cpu_fusion.applies(weight_rows):
            return None  # each use tests W != 0 inside its own fused loop: no mask is written
        return kept(weight_rows, dtype, workspace)

    def weight_rows(self, start, stop, weight_rows, dtype, with_base, mask=None, workspace=FRESH):
        scaled_B, A, _ = self.factors_in(dtype)
        low_rank = workspace.take("update", weight_rows.shape, dtype, weight_rows.device)
        torch.mm(scaled_B[start:stop], A, out=low_rank)
        result = output_for(low_rank, "result", workspace)
        if mask is None and _cpu_fusion.where_kept(weight_rows, low_rank, result, with_base):
            return result
        mask = kept(weight_rows, dtype, workspace) if mask is None else mask
        if with_base:  # W + s·(B A) ⊙ M, rounded once to dtype
            return torch.addcmul(in_dtype(weight_rows, dtype, workspace), low_rank, mask, out=result)
        return torch.mul(low_rank, mask, out=result)

    def param_grads(self, start, stop, weight_rows, grad_rows, mask=None, workspace=FRESH):
        # dB = s (G ⊙ M) Aᵀ, dA = s Bᵀ (G ⊙ M). The two thin GEMMs run in G's dtype (AMX / tensor
        # cores for bf16, fp32 accumulation inside) and their small results are summed in fp32.
        dtype, wide = grad_rows.dtype, _wide(grad_rows, self.params[0])
        scaled_B, _, scaled_A = self.factors_in(dtype)
        masked = output_for(grad_rows, "masked", workspace)
        if mask is not None or not _cpu_fusion.where_kept(weight_rows, grad_rows, masked):
            mask = kept(weight_rows, dtype, workspace) if mask is None else mask
            torch.mul(grad_rows, mask, out=masked)
        grad_B_rows = masked @ scaled_A.t()
        grad_A = scaled_B[start:stop].t() @ masked
        return [(0, None, grad_A.to(wide)), (1, slice(start, stop), grad_B_rows.to(wide))]


class RowScaleUpdate:
    """``ΔW = α · R(A) ⊙ b ⊙ W`` (SPP): ``A`` (r, in), ``b`` (out, 1), ``R(A)[i] = A[i · r // out]``.

    ``α · R(A) ⊙ b`` for a block of rows is ``P A`` with ``P[i, g] = α b_i`` where ``g`` is row ``i``'s
    group of ``A`` (a rows x r matrix): one small GEMM instead of repeating ``A``'s rows. ``ΔW`` is
    zero wherever ``W`` is, so no mask is needed.
    """

    def __init__(self, A: torch.Tensor, b: torch.Tensor, alpha: float):
        self.params, self.alpha = (A, b), float(alpha)

    def _groups(self, start, stop):
        """The row of ``A`` each row of the block uses."""
        A, b = self.params
        return torch.arange(start, stop, device=A.device) * A.shape[0] // b.shape[0]

    def _row_scale(self, start, stop):
        """``α b`` of the block's rows, in fp32 (or wider)."""
        b = self.params[1]
        return b[start:stop, 0].detach().to(torch.promote_types(b.dtype, torch.float32)) * self.alpha

    def _group_weights(self, start, stop, dtype):
        row_scale = self._row_scale(start, stop)
        weights = torch.zeros(stop - start, self.params[0].shape[0], dtype=row_scale.dtype, device=row_scale.device)
        weights[torch.arange(stop - start, device=weights.device), self._groups(start, stop)] = row_scale
        return weights.to(dtype)

    def mask_rows(self, weight_rows, dtype, workspace=FRESH) -> None:
        return None  # W ⊙ change is zero wherever W is

    def weight_rows(self, start, stop, weight_rows, dtype, with_base, mask=None, workspace=FRESH):
        # W + W ⊙ (α R(A) ⊙ b) in one pass, rounded once to dtype. Never 1 + change in a low precision:
        # near 1 a bf16 would round the small change away; W ⊙ change keeps its relative precision.
        change = workspace.take("update", weight_rows.shape, dtype, weight_rows.device)
        if dtype in LOW_PRECISION and _cpu_fusion.applies(weight_rows) and _cpu_fusion.row_scaled(
                weight_rows, self._row_scale(start, stop).to(dtype), self.params[0].detach().to(dtype),
                self._groups(start, stop), change, with_base):
            return change  # one loop: no change written and read back, no cast of W
        torch.mm(self._group_weights(start, stop, dtype), self.params[0].detach().to(dtype), out=change)
        weight_rows = in_dtype(weight_rows, dtype, workspace)
        if with_base:
            return torch.addcmul(weight_rows, weight_rows, change, out=output_for(change, "result", workspace))
        return change.mul_(weight_rows)

    def _group_rows(self, start, stop):
        """``(g, lo, hi)``: the rows ``[lo, hi)`` of ``[start, stop)`` (relative to ``start``) in group ``g``
        (consecutive rows share a group: row ``i``'s is ``i · r // out``)."""
        r, out = self.params[0].shape[0], self.params[1].shape[0]
        for g in range(start * r // out, (stop - 1) * r // out + 1):
            lo, hi = max(start, -(-g * out // r)), min(stop, -(-(g + 1) * out // r))
            if lo < hi:
                yield g, lo - start, hi - start

    def param_grads(self, start, stop, weight_rows, grad_rows, mask=None, workspace=FRESH):
        A, b = self.params
        dtype, wide = grad_rows.dtype, _wide(grad_rows, A)
        # S = G ⊙ W: G at the nonzeros only, in G's dtype (W read as it is: no block-sized cast). Per
        # group of rows sharing a row of A, two matrix-vector products read S (fp32 accumulation inside,
        # also in bf16): no fp32 copy of S and no GEMM against the one-hot group matrix, whose r - 1 zero
        # columns cost r times the work.
        sampled = torch.mul(grad_rows, weight_rows, out=output_for(grad_rows, "sampled", workspace))
        A_rows = A.detach().to(dtype)
        b_scaled = (b[start:stop, 0].detach() * self.alpha).to(dtype)
        grad_A = torch.zeros(A.shape, dtype=wide, device=A.device)
        grad_b_rows = torch.empty(stop - start, 1, dtype=wide, device=A.device)
        for g, lo, hi in self._group_rows(start, stop):
            grad_b_rows[lo:hi, 0] = sampled[lo:hi] @ A_rows[g]  # db_i = α Σ_j S_ij A_{g(i), j}
            grad_A[g] += b_scaled[lo:hi] @ sampled[lo:hi]  # dA_g = Σ_{i in g} α b_i S_i
        return [(0, None, grad_A), (1, slice(start, stop), grad_b_rows.mul_(self.alpha))]
