"""Block-wise reconstruction of a pruned model from its dense original, before any PEFT.

One-shot pruning (Wanda, SparseGPT) chooses each block's mask from statistics, and SparseGPT
updates the kept weights, but nothing trains the kept weights toward what the dense block computed.
This does, one decoder block at a time (the idea of EBFT, Guo et al. 2024, arXiv 2402.12419): for
block ``l`` it minimises over the block's kept linear weights

    E_l = Σ_tokens ||B_l(x_l) - D_l(d_l)||² / Σ_tokens ||D_l(d_l)||²

where ``B_l`` is the pruned block, ``x_l`` its inputs in the pruned model (the outputs of blocks
``0..l-1`` *after* their reconstruction), ``D_l`` the dense block and ``d_l`` its inputs in the
dense model. So a block also learns to undo what the blocks before it still get wrong. Padding
tokens (``attention_mask`` 0) are left out of both sums.

Both models run through ``sparsity.calibration.iterate_blocks`` (the driver behind the pruners),
side by side: only one block of each is active at a time, and besides the two models' weights the
memory is the two streams' hidden states for the calibration set, plus one block's fp32 weights and
Adam state.
"""

from __future__ import annotations

import warnings
from contextlib import closing
from dataclasses import dataclass, field

import torch
from torch import nn

from .._validation import check_int, is_real
from ..sparsity.calibration import (
    BlockStep,
    as_calibration_batches,
    block_linears,
    block_outputs,
    find_decoder_blocks,
    iterate_blocks,
)
from ..sparsity.masks import restore_mask, weight_mask
from ..sparsity.quantized import first_quantized_linear


@dataclass(frozen=True)
class BlockReconstruction:
    """What ``reconstruct`` did to one decoder block.

    ``error_before`` / ``error_after``: the block's relative error ``Σ ||block(x) - target||² /
    Σ ||target||²`` over the calibration tokens, on its inputs in the pruned model (the outputs of the
    blocks before it, already reconstructed), before and after training. ``reverted``: the training
    raised it (a too large ``lr``), so the block was given back its weights from before and its
    error stays ``error_before``. ``steps``: optimizer steps taken.
    """

    name: str
    error_before: float
    error_after: float
    steps: int
    reverted: bool = False

    @property
    def final_error(self) -> float:
        """The block's error as the model now stands: ``error_before`` if reverted, else ``error_after``."""
        return self.error_before if self.reverted else self.error_after


@dataclass
class ReconstructionReport:
    """Per decoder block, its reconstruction error before and after (see ``BlockReconstruction``),
    and the settings used; ``to_dict()`` is JSON-ready, ``to_markdown()`` a table."""

    blocks: list[BlockReconstruction] = field(default_factory=list)
    epochs: int = 0
    lr: float = 0.0
    batch_size: int = 0

    def to_dict(self) -> dict:
        return {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                "blocks": [{"name": b.name, "error_before": b.error_before, "error_after": b.error_after,
                            "steps": b.steps, "reverted": b.reverted} for b in self.blocks]}

    def to_markdown(self) -> str:
        lines = ["| block | error before | error after | steps | |", "| --- | ---: | ---: | ---: | --- |"]
        for b in self.blocks:
            note = "reverted (error went up)" if b.reverted else ""
            lines.append(f"| {b.name} | {b.error_before:.4g} | {b.error_after:.4g} | {b.steps} | {note} |")
        return "\n".join(lines)

    def __repr__(self) -> str:
        if not self.blocks:
            return "ReconstructionReport(blocks=0)"
        before = sum(b.error_before for b in self.blocks) / len(self.blocks)
        after = sum(b.final_error for b in self.blocks) / len(self.blocks)
        reverted = sum(b.reverted for b in self.blocks)
        return (f"ReconstructionReport(blocks={len(self.blocks)}, mean_error={before:.4g} -> {after:.4g}, "
                f"reverted={reverted})")


def reconstruct(model: nn.Module, dense_model: nn.Module, calibration, *, epochs: int = 1, lr: float = 3e-3,
                batch_size: int = 8, seed: int = 0, show_progress: bool = True) -> ReconstructionReport:
    """Train each decoder block's kept weights so that the pruned block reproduces the dense block's
    outputs on calibration data, one block at a time, in place; return a ``ReconstructionReport``.

    Use it between ``sp.prune`` and PEFT::

        dense = copy.deepcopy(model)
        sp.prune(model, method="wanda", sparsity=0.5, calibration=batches)
        report = sp.reconstruct(model, dense, batches)
        del dense

    Args:
        model: the pruned transformers causal LM (not peft-wrapped), changed in place.
        dense_model: the same model before pruning (the teacher; never changed). Same class, same
            decoder blocks and linear shapes; it may sit on another device or in another dtype.
        calibration: token batches, as ``sp.prune`` takes them (LongTensors ``[B, T]`` or dicts
            with ``input_ids`` and optional ``attention_mask``); the pruning batches are a fine
            choice. Padding tokens are left out of the error.
        epochs: passes over the calibration batches per block.
        lr: Adam's learning rate (no weight decay). The defaults (1 epoch at 3e-3) were the best
            measured on SmolLM2-135M at 70% on a validation split (docs/reconstruct.md).
        batch_size: calibration batches per optimizer step (their gradients are summed; with
            one sequence per batch, the sequences per step). Batches keep their own shapes and
            attention masks, so batches of different lengths mix freely.
        seed: the order the batches are visited in, each epoch (an integer >= 0; the global RNG is
            not touched).
        show_progress: a tqdm bar over the blocks (``TQDM_DISABLE=1`` also silences it).

    What is trained: the weights of the linear layers inside each decoder block, the ones
    ``sp.prune`` prunes (``sp.sparsity.named_linears``). Norm weights, biases, embeddings and the
    output head stay frozen. Each weight's mask is ``W != 0`` at the start: its gradient is
    multiplied by the mask, the optimizer works on an fp32 copy of the block's weights (so bf16
    blocks train too), and after every step the weight is written back re-masked, so every pruned
    position stays exactly ``+0.0`` and every kept one nonzero: each layer's sparsity, mask and
    N:M pattern are unchanged. The loss is computed in fp32; the block runs in the model's dtype,
    in eval mode (no dropout). A block whose error goes up is given back its weights from before
    (and a RuntimeWarning names it: lower ``lr``).

    Cost: per block, ``epochs`` forward and backward passes of the block over the calibration set,
    plus three forwards (the dense block, the pruned block before and after). Memory: both models'
    weights; up to three sets of hidden states of the calibration set (the pruned block's inputs
    and outputs, the dense block's outputs); one block's weights four more times in fp32 (the
    copy, its gradient, Adam's two moments) and once in the model's dtype (to go back to); one
    batch's activations through the block.

    Raises ValueError (before any weight changes) for: ``epochs`` / ``batch_size`` not an integer
    >= 1, ``seed`` not an integer >= 0, ``lr`` not a number > 0, missing or empty calibration (or
    a batch without tokens), a peft-wrapped model, a bitsandbytes-quantized layer in either model
    (naming it), models of different classes, block counts or linear shapes (naming the layer and
    the shapes), ``dense_model`` being ``model`` or a copy of the pruned model, and a ``model``
    without a single pruned weight in its decoder blocks (nothing to reconstruct: a dense model,
    or the two models swapped).
    """
    epochs = check_int(epochs, "epochs", minimum=1)
    if not is_real(lr) or lr <= 0:
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    seed = check_int(seed, "seed", minimum=0)
    _check_models(model, dense_model)
    batches = as_calibration_batches(calibration)

    report = ReconstructionReport(epochs=epochs, lr=float(lr), batch_size=batch_size)
    order = torch.Generator().manual_seed(seed)
    # The pruned stream comes first in zip: its generator ends the loop, so its bar completes.
    with closing(iterate_blocks(model, batches, desc="reconstruction", show_progress=show_progress)) as steps, \
            closing(iterate_blocks(dense_model, batches, desc="dense teacher", show_progress=False)) as dense_steps:
        for step, dense_step in zip(steps, dense_steps):
            with torch.no_grad():
                dense_step.outputs = block_outputs(dense_step.block, dense_step.inputs, dense_step.calls)
            dense_step.inputs = None
            device = step.inputs[0].device
            targets = [target.to(device) for target in dense_step.outputs]  # no copy on one device
            report.blocks.append(_reconstruct_block(step, targets, epochs, float(lr), batch_size, order))
            del targets
    reverted = [b.name for b in report.blocks if b.reverted]
    if reverted:
        warnings.warn(f"sp.reconstruct: training raised the error of {reverted} with lr={lr}; those blocks keep "
                      "their weights from before. A lower lr should lower their error", RuntimeWarning, stacklevel=2)
    return report


def _check_models(model: nn.Module, dense_model: nn.Module) -> None:
    """Refuse a pair of models that ``reconstruct`` cannot work on (see its docstring)."""
    for role, candidate in (("model", model), ("dense_model", dense_model)):
        if hasattr(candidate, "peft_config"):
            raise ValueError(f"sp.reconstruct: {role} is peft-wrapped; reconstruct the base model before wrapping "
                             "it with peft")
        quantized = first_quantized_linear(candidate)
        if quantized is not None:
            name, module = quantized
            raise ValueError(f"sp.reconstruct needs plain float weights, but layer {name!r} of {role} is a "
                             f"bitsandbytes {type(module).__name__}: reconstruct the float model, then quantize "
                             "it (see docs/quantized.md)")
    if model is dense_model:
        raise ValueError("sp.reconstruct: dense_model is model itself; pass a copy of the model taken before "
                         "pruning (copy.deepcopy(model) before sp.prune)")
    if type(model) is not type(dense_model):
        raise ValueError(f"sp.reconstruct: model is a {type(model).__name__}, dense_model a "
                         f"{type(dense_model).__name__}; the dense model must be the same architecture")
    blocks_name, blocks = find_decoder_blocks(model)
    dense_blocks_name, dense_blocks = find_decoder_blocks(dense_model)
    if blocks_name != dense_blocks_name or len(blocks) != len(dense_blocks):
        raise ValueError(f"sp.reconstruct: model has {len(blocks)} decoder blocks ({blocks_name!r}), dense_model "
                         f"{len(dense_blocks)} ({dense_blocks_name!r}); the dense model must be the same "
                         "architecture")
    pairs = []
    for index, (linears, dense_linears) in enumerate(zip(block_linears(blocks_name, blocks),
                                                         block_linears(dense_blocks_name, dense_blocks))):
        names, dense_names = [n for n, _ in linears], [n for n, _ in dense_linears]
        if names != dense_names:
            raise ValueError(f"sp.reconstruct: block {blocks_name}.{index} has the linears {names} in model but "
                             f"{dense_names} in dense_model")
        for (name, linear), (_, dense_linear) in zip(linears, dense_linears):
            if linear.weight.shape != dense_linear.weight.shape:
                raise ValueError(f"sp.reconstruct: layer {name!r} has weight shape {tuple(linear.weight.shape)} in "
                                 f"model but {tuple(dense_linear.weight.shape)} in dense_model")
            pairs.append((name, linear, dense_linear))
    pruned = next(((name, linear, dense) for name, linear, dense in pairs if not bool(linear.weight.all())), None)
    if pruned is None:
        raise ValueError(f"sp.reconstruct: model has no pruned weight: every weight of its {len(pairs)} decoder "
                         "linears is nonzero, so there is nothing to reconstruct. Prune it first (sp.prune); or "
                         "were model and dense_model swapped?")
    name, linear, dense_linear = pruned
    if torch.equal(linear.weight.detach(), dense_linear.weight.detach().to(linear.weight.device, linear.weight.dtype)):
        raise ValueError(f"sp.reconstruct: layer {name!r} is pruned in model and identical in dense_model: the dense "
                         "model must be a copy taken before pruning (copy.deepcopy(model) before sp.prune)")


def _squared_error_sum(output: torch.Tensor, target: torch.Tensor | None, token_mask: torch.Tensor | None):
    """``Σ ||output - target||²`` (or ``Σ ||output||²`` without a target) over the real tokens, fp32."""
    # .to: a block dispatched over devices (accelerate) may return its output on another device.
    difference = output.float() if target is None else output.float() - target.to(output.device, torch.float32)
    per_token = difference.square().sum(dim=-1)  # [B, T]
    if token_mask is not None and token_mask.shape == per_token.shape:
        per_token = per_token[token_mask.to(per_token.device)]
    return per_token.sum()


@torch.no_grad()
def _relative_error(outputs, targets, token_masks, energy: float) -> float:
    error = sum(float(_squared_error_sum(o, t, m)) for o, t, m in zip(outputs, targets, token_masks))
    return error / energy


def _reconstruct_block(step: BlockStep, targets: list[torch.Tensor], epochs: int, lr: float, batch_size: int,
                       order: torch.Generator) -> BlockReconstruction:
    """Train ``step.block``'s linear weights toward ``targets`` (masked), leave its outputs in ``step``."""
    block, inputs, calls = step.block, step.inputs, step.calls
    weights = [linear.weight for _, linear in step.linears]
    device = inputs[0].device
    token_masks = [None if m is None else m.to(device) for m in step.token_masks]
    with torch.no_grad():
        energies = [float(_squared_error_sum(t, None, m)) for t, m in zip(targets, token_masks)]
        # An all-zero target costs nothing to match; tiny keeps the ratios finite.
        total_energy = max(sum(energies), torch.finfo(torch.float32).tiny)
        error_before = _relative_error(block_outputs(block, inputs, calls), targets, token_masks, total_energy)
        masks = [weight_mask(w) for w in weights]
        originals = [w.detach().clone() for w in weights]
        # The optimizer updates fp32 copies: Adam's small steps would round away in a bf16 weight.
        masters = [w.detach().float().clone() for w in weights]
    optimizer = torch.optim.Adam(masters, lr=lr, weight_decay=0.0)
    requires_grad = {p: p.requires_grad for p in block.parameters()}
    n_steps = 0
    try:
        block.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        for _ in range(epochs):
            visit = torch.randperm(len(inputs), generator=order).tolist()
            for start in range(0, len(visit), batch_size):
                chosen = visit[start:start + batch_size]
                chosen_energy = max(sum(energies[i] for i in chosen), torch.finfo(torch.float32).tiny)
                grads = [torch.zeros_like(m) for m in masters]
                for i in chosen:
                    output = block_outputs(block, [inputs[i]], [calls[i]])[0]
                    loss = _squared_error_sum(output, targets[i], token_masks[i]) / chosen_energy
                    # allow_unused: a linear the block's forward skips gets no gradient, not an error.
                    for grad, weight_grad in zip(grads, torch.autograd.grad(loss, weights, allow_unused=True)):
                        if weight_grad is not None:
                            grad.add_(weight_grad.to(grad.device, torch.float32))
                for master, grad, mask in zip(masters, grads, masks):
                    master.grad = grad.mul_(mask)  # a pruned position gets no gradient, so Adam never moves it
                optimizer.step()
                with torch.no_grad():
                    for weight, master, mask in zip(weights, masters, masks):
                        # A kept value rounding to exactly 0 in the model's dtype would prune it: restore_mask
                        # nudges it to ±tiny, so every layer keeps exactly its zeros.
                        weight.copy_(restore_mask(master.to(weight.dtype), mask, sign_source=master))
                n_steps += 1
    finally:
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
    with torch.no_grad():
        outputs = block_outputs(block, inputs, calls)
        error_after = _relative_error(outputs, targets, token_masks, total_energy)
        reverted = not error_after <= error_before  # a NaN error counts as worse
        if reverted:
            for weight, original in zip(weights, originals):
                weight.copy_(original)
            outputs = block_outputs(block, inputs, calls)
    step.outputs = outputs
    return BlockReconstruction(step.name, error_before, error_after, n_steps, reverted)
