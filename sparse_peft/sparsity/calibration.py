"""Block-by-block calibration: the memory-light driver behind Wanda, SparseGPT and OWL.

1. Capture what decoder block 0 receives (hidden states, and the keyword arguments transformers
   passes to decoder layers: attention mask, position ids / position embeddings, ...) for every
   calibration batch. Each block's ``forward`` is swapped for a stub that only records its inputs
   and passes the hidden states through, and the last stub stops the model's forward, so this
   costs no more than the embeddings (the keyword arguments are recorded per block: hybrid models
   give sliding-window and full-attention layers different masks).
2. For each block in turn: hook its linears with statistic accumulators, run the block on the
   captured inputs, hand the statistics to a callback (which prunes the block), then run the
   (now pruned) block again: its outputs are the next block's inputs.

Only one block's inputs are held at a time (plus the small per-batch keyword arguments).

``iterate_blocks`` is step 2 without the statistics: it hands each block and its inputs to the
caller's loop body and propagates the block's outputs afterwards (``sp.reconstruct`` trains each
block there, and runs the dense teacher's blocks in step beside it).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass

import torch
from torch import nn

from .._progress import progress
from .masks import is_linear, named_linears


class _StopForward(Exception):
    """Raised by the last block's stub: nothing after the decoder blocks is needed."""


@dataclass
class CalibrationBatch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None  # [B, T] (1 = real token) or None


def as_calibration_batches(calibration) -> list[CalibrationBatch]:
    """Normalise calibration data: an iterable of LongTensor batches ``[B, T]`` (or ``[T]``), or of
    dicts / BatchEncodings with ``input_ids`` and optional ``attention_mask``; a single ``[B, T]``
    tensor or dict is one batch.

    Refused here, before any weight is touched, naming the batch: a batch without tokens (the
    model cannot run it) and one whose attention mask is all zeros (padding is left out of the
    statistics, so it would add nothing; calibration made only of such batches scores every
    weight 0, and pruning would then cut the first input columns of every layer)."""
    if calibration is None:
        raise ValueError("calibration data is required: pass calibration=[LongTensor [B, T], ...]")
    if isinstance(calibration, (torch.Tensor, Mapping)):
        calibration = [calibration]
    batches = []
    for index, item in enumerate(calibration):
        if isinstance(item, CalibrationBatch):  # already normalised
            batches.append(item)
            continue
        if isinstance(item, Mapping):
            if "input_ids" not in item:
                raise ValueError(f"calibration dict without 'input_ids' (keys: {sorted(item)})")
            input_ids, attention_mask = item["input_ids"], item.get("attention_mask")
        else:
            input_ids, attention_mask = item, None
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"calibration batches must be integer token ids [B, T], got "
                             f"dtype={input_ids.dtype} shape={tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"calibration batch {index} is empty: input_ids has shape {tuple(input_ids.shape)}; "
                             "every batch needs at least one token")
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask)
            if attention_mask.numel() != input_ids.numel():
                raise ValueError(f"calibration batch {index}: attention_mask has shape {tuple(attention_mask.shape)}, "
                                 f"input_ids {tuple(input_ids.shape)}")
            attention_mask = attention_mask.reshape(input_ids.shape)
            if not attention_mask.any():
                raise ValueError(f"calibration batch {index} has no real tokens: its attention_mask (shape "
                                 f"{tuple(attention_mask.shape)}) is all zeros. Give batches with at least one "
                                 "token whose mask is 1 (padding is left out of the statistics)")
        batches.append(CalibrationBatch(input_ids.long(), attention_mask))
    if not batches:
        raise ValueError("calibration data is empty")
    return batches


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of repeated decoder blocks (``model.layers``, ``gpt_neox.layers``,
    ``model.decoder.layers``, GPT-2's ``transformer.h``, ...): among ModuleLists whose entries share
    one class and hold linear layers (``nn.Linear`` or ``Conv1D``), the one with the most parameters."""
    best_name, best_blocks, best_size = None, None, -1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best_name, best_blocks, best_size = name, module, size
    if best_blocks is None:
        raise ValueError(f"no decoder blocks found in {type(model).__name__}: expected an nn.ModuleList of "
                         "identical blocks holding nn.Linear or Conv1D layers (e.g. model.model.layers)")
    return best_name, best_blocks


def block_linears(blocks_name: str, blocks: nn.ModuleList) -> list[list[tuple[str, nn.Module]]]:
    """Per block, ``(full module name, linear)`` for every linear (``nn.Linear`` or ``Conv1D``) inside it."""
    prefix = f"{blocks_name}." if blocks_name else ""
    return [[(f"{prefix}{index}.{name}", linear) for name, linear in named_linears(block)]
            for index, block in enumerate(blocks)]


def _strip_cache(kwargs: dict) -> dict:
    """Calibration runs without a KV cache: drop cache objects, turn caching off."""
    clean = {}
    for key, value in kwargs.items():
        if key in ("past_key_values", "past_key_value", "layer_past") or type(value).__name__.endswith("Cache"):
            value = None
        clean[key] = value
    if "use_cache" in clean:
        clean["use_cache"] = False
    return clean


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[CalibrationBatch]):
    """Return ``(hidden_states per batch, [per block: (args, kwargs) per batch])``."""
    hidden_per_batch: list[torch.Tensor] = []
    call_per_block: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]
    last = len(blocks) - 1

    def make_stub(index: int):
        def stub(*args, **kwargs):
            if args:
                hidden, args = args[0], tuple(args[1:])
            else:
                hidden = kwargs.pop("hidden_states")
            if index == 0:
                hidden_per_batch.append(hidden.detach())
            call_per_block[index].append((args, _strip_cache(kwargs)))
            if index == last:
                raise _StopForward
            return hidden
        return stub

    # Keep whatever instance-level forward a block already had (e.g. accelerate's offload hooks).
    saved = [block.__dict__.get("forward") for block in blocks]
    device = next(model.parameters()).device
    try:
        for index, block in enumerate(blocks):
            block.forward = make_stub(index)
        for batch in batches:
            attention_mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
            try:
                model(input_ids=batch.input_ids.to(device), attention_mask=attention_mask, use_cache=False)
            except _StopForward:
                pass
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
    if len(hidden_per_batch) != len(batches) or any(len(calls) != len(batches) for calls in call_per_block):
        raise RuntimeError("could not capture the inputs of every decoder block; does the model call them in order?")
    return hidden_per_batch, call_per_block


def _block_output(output):
    # transformers 5 decoder layers return a tensor; older ones (and some remote code) a tuple.
    return output[0] if isinstance(output, (tuple, list)) else output


def block_outputs(block: nn.Module, hidden_per_batch: list[torch.Tensor],
                  calls: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    """``block``'s output hidden states for every batch, from its inputs and recorded calls."""
    return [_block_output(block(hidden, *args, **kwargs)) for hidden, (args, kwargs) in zip(hidden_per_batch, calls)]


@dataclass
class BlockStep:
    """One decoder block and what it receives, as ``iterate_blocks`` hands it to its caller.

    ``outputs`` starts as None; a caller that has computed the block's outputs (after its last
    change to the block's weights) may store them there and they are passed on as they are, instead
    of running the block once more. A caller that has stored ``outputs`` may set ``inputs`` to None
    to free them early.
    """

    index: int
    name: str  # the block's module name, e.g. "model.layers.3"
    block: nn.Module
    linears: list[tuple[str, nn.Module]]  # (full module name, linear) inside the block
    inputs: list[torch.Tensor] | None  # per batch, [B, T, hidden]
    calls: list[tuple[tuple, dict]]  # per batch, the other positional and keyword arguments
    token_masks: list[torch.Tensor | None]  # per batch, [B, T] bool (True = real token) or None
    outputs: list[torch.Tensor] | None = None


@torch.no_grad()
def iterate_blocks(model: nn.Module, batches: list[CalibrationBatch], *, desc: str = "blocks",
                   show_progress: bool = True) -> Iterator[BlockStep]:
    """Yield a ``BlockStep`` per decoder block, in order; when the caller's loop body is done with a
    block, its outputs (computed then, so any change the body made to the block counts, unless the
    body stored them in ``step.outputs``) become the next block's inputs.

    ``batches`` come from ``as_calibration_batches``. The generator runs without gradients, the
    caller's body in the caller's own grad mode; the model is in eval mode until the loop ends
    (close the generator, e.g. with ``contextlib.closing``, when leaving the loop early).
    """
    blocks_name, blocks = find_decoder_blocks(model)
    linears_per_block = block_linears(blocks_name, blocks)
    prefix = f"{blocks_name}." if blocks_name else ""
    was_training = model.training
    model.eval()
    try:
        hidden_per_batch, call_per_block = capture_block_inputs(model, blocks, batches)
        token_masks = [None if b.attention_mask is None else b.attention_mask.bool() for b in batches]
        for index, block in enumerate(progress(blocks, desc, show_progress)):
            step = BlockStep(index, f"{prefix}{index}", block, linears_per_block[index], hidden_per_batch,
                             call_per_block[index], token_masks)
            del hidden_per_batch  # the step holds the inputs alone, so the body can free them
            yield step
            hidden_per_batch = (step.outputs if step.outputs is not None
                                else block_outputs(block, step.inputs, step.calls))
            del step
    finally:
        model.train(was_training)


def _accumulate_stats(block, stats, hidden_per_batch, calls, token_masks) -> None:
    """Run ``block`` on every batch with each linear's inputs fed to its accumulator."""
    current_mask = [None]  # the running batch's token mask, read by the hooks

    def make_hook(stat):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            mask = current_mask[0]
            if mask is not None and x.shape[:-1] == mask.shape:
                x = x[mask.to(x.device)]  # padding tokens carry no information about the data
            stat.add(x.reshape(-1, x.shape[-1]))
        return hook

    handles = [linear.register_forward_hook(make_hook(stat)) for linear, stat in stats.values()]
    try:
        for hidden, (args, kwargs), mask in zip(hidden_per_batch, calls, token_masks):
            current_mask[0] = mask
            block(hidden, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def run_blockwise(model: nn.Module, calibration, make_stat, process_block, *, desc: str = "pruning",
                  show_progress: bool = True) -> None:
    """Drive block-sequential calibration.

    ``make_stat(linear)`` builds an accumulator with ``add(x)`` (``x``: that linear's inputs,
    ``[tokens, in_features]``, padding tokens removed); ``process_block(index, {name: (linear,
    stat)})`` is called once per block after its statistics are complete and may modify the
    block's weights: the block's outputs are computed afterwards.
    """
    find_decoder_blocks(model)  # no decoder blocks is refused before the calibration data is read
    batches = as_calibration_batches(calibration)
    # closing: an error in process_block still puts the model back in its training mode at once.
    with closing(iterate_blocks(model, batches, desc=desc, show_progress=show_progress)) as steps:
        for step in steps:
            stats = {name: (linear, make_stat(linear)) for name, linear in step.linears}
            _accumulate_stats(step.block, stats, step.inputs, step.calls, step.token_masks)
            process_block(step.index, stats)
            del stats
