"""``prune()``: the public entry point for one-shot pruning (magnitude, Wanda, SparseGPT; OWL)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .._validation import check_sparsity, is_int, is_real
from .calibration import as_calibration_batches, block_linears, find_decoder_blocks, run_blockwise
from .magnitude import MAGNITUDE_SCOPES, magnitude_keep_mask
from .masks import check_nm_divides, linear_view, named_linears, parse_pattern
from .owl import allocate_zero_counts, outlier_ratio, owl_block_sparsities
from .quantized import refuse_quantized
from .report import SparsityReport, sparsity_report
from .selection import unstructured_zero_count, write_masked_weight_
from .sparsegpt import HessianStat, sparsegpt_prune
from .wanda import InputNormStat, wanda_keep_mask, wanda_scores

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl")


def _prunable_linears(model: nn.Module, need_blocks: bool) -> list[list[tuple[str, nn.Module]]]:
    """The linears (``nn.Linear`` / ``Conv1D``) of each decoder block. Magnitude pruning of a model
    without decoder blocks falls back to every linear but the output head (as one group)."""
    try:
        groups = block_linears(*find_decoder_blocks(model))
    except ValueError:
        if need_blocks:
            raise
        groups = [list(named_linears(model))]
    if not any(groups):
        # Reporting "0 layers pruned" would look like success; a model whose layers are of another
        # type (or that has no linear besides its head) must say so.
        raise ValueError(f"nothing to prune in {type(model).__name__}: it has no torch.nn.Linear or transformers "
                         "Conv1D layer besides the output head")
    return groups


def _make_stat(method: str):
    stat_class = HessianStat if method == "sparsegpt" else InputNormStat
    return lambda linear: stat_class(linear_view(linear).in_features, device=linear.weight.device)


def _owl_zero_counts(model, calibration, groups, sparsity, owl_threshold, owl_lambda, show_progress) -> dict[str, int]:
    """Per-layer zero counts from OWL's outlier-weighted block sparsities (see owl.py)."""
    ratios: list[float] = []

    def measure_block(index, stats):
        scores = [wanda_scores(linear_view(linear).weight, stat) for linear, stat in stats.values()]
        ratios.append(outlier_ratio(scores, owl_threshold))

    # Outlier ratios come from the dense model (nothing is pruned in this pass).
    run_blockwise(model, calibration, _make_stat("wanda"), measure_block, desc="OWL outlier ratios",
                  show_progress=show_progress)
    block_numels = [sum(linear.weight.numel() for _, linear in group) for group in groups]
    block_sparsities = owl_block_sparsities(ratios, block_numels, sparsity, owl_lambda)
    names, layer_sparsities, layer_numels = [], [], []
    for group, block_sparsity in zip(groups, block_sparsities):
        for name, linear in group:
            names.append(name)
            layer_sparsities.append(block_sparsity)
            layer_numels.append(linear.weight.numel())
    total_zeros = unstructured_zero_count(sparsity, sum(layer_numels))
    return dict(zip(names, allocate_zero_counts(layer_sparsities, layer_numels, total_zeros)))


def prune(
    model: nn.Module,
    method: str = "magnitude",
    sparsity: float | None = None,
    pattern: str | None = None,
    calibration=None,
    allocation: str = "uniform",
    *,
    magnitude_scope: str = "row",
    owl_threshold: float = 5.0,
    owl_lambda: float = 0.08,
    blocksize: int = 128,
    percdamp: float = 0.01,
    show_progress: bool = True,
    induce=False,
) -> SparsityReport:
    """Prune the linear layers of the decoder blocks in place; return the model's sparsity report.

    Args:
        model: a transformers causal LM (not yet peft-wrapped). The output head is never pruned.
            Its linears may be ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2 family, weight
            stored in x out): rows, per-row comparison and N:M groups always mean out x in.
        method: ``"magnitude"`` (smallest |W|), ``"wanda"`` (|W_ij| * ||X_j||_2 per output row) or
            ``"sparsegpt"`` (OBS with compensating updates).
        sparsity: unstructured target in [0, 1). Layer ``i`` gets exactly ``round(sparsity *
            numel_i)`` zeros (OWL: its allocated count), spread as evenly as possible over output
            rows for magnitude ("row" scope) and Wanda, over column blocks for SparseGPT.
            ``0`` leaves the model untouched.
        pattern: ``"N:M"`` (e.g. ``"2:4"``, ``"4:8"``): exactly M - N zeros in every group of M
            consecutive inputs of every row. Give exactly one of ``sparsity`` / ``pattern``.
        calibration: iterable of LongTensor token batches ``[B, T]`` (or dicts with
            ``input_ids`` and optional ``attention_mask``; padding tokens are left out of the
            statistics). Required for wanda, sparsegpt and allocation="owl".
        allocation: ``"uniform"`` (every layer at ``sparsity``) or ``"owl"`` (outlier-weighted block
            sparsities in ``[s - owl_lambda, s + owl_lambda]`` whose global zero count is exactly
            ``round(sparsity * total prunable weights)``; unstructured only).
        magnitude_scope: ``"row"`` (default, compare within each output row) or ``"layer"``.
        owl_threshold: OWL's M: a Wanda score is an outlier above M times its block's mean score.
        owl_lambda: OWL's λ: the largest deviation of a block's sparsity from ``sparsity``.
        blocksize: SparseGPT column block (mask choice and lazy updates); a multiple of M for N:M.
        percdamp: SparseGPT damping, a fraction of the mean diagonal of H added to its diagonal
            (raised x10 automatically if H is still singular).
        show_progress: tqdm bars over blocks (``TQDM_DISABLE=1`` also silences them).
        induce: ``True`` (or a dict of ``induce_sparsity`` options, e.g. ``{"alpha": 0.5}``) first
            folds Sparsity Induction's function-preserving scales into the model with the same
            calibration (Llama-style models only; needs calibration, for magnitude too). Wanda's
            masks do not change with it (see docs/induction.md); magnitude's do. For unstructured
            SparseGPT the default folds are the column ones only (``("qkv", "gate_up")``): the row
            folds make it prune the rows feeding the most active channels hardest; naming them warns.

    Calibration is block-sequential: block k's statistics come from the outputs of the already
    pruned blocks 0..k-1, and only one block's activations are held at a time.
    Pruned weights are stored as exactly ``+0.0``; a kept weight that would be exactly zero is
    nudged to ``±finfo(dtype).tiny`` so the zero count is exactly the promised one.

    Raises ValueError for: an unknown method/allocation/scope (listing the choices), both or
    neither of sparsity/pattern, sparsity outside [0, 1), a malformed pattern or one whose M does not
    divide a layer's in_features (naming the layer), OWL with a pattern, missing calibration, a
    model with nothing to prune (no ``nn.Linear`` / ``Conv1D`` besides the output head), a model
    holding bitsandbytes-quantized layers (naming the first: prune before quantizing).
    """
    nm, sparsity = _checked_options(model, method, sparsity, pattern, allocation, magnitude_scope, blocksize,
                                    percdamp)
    if sparsity == 0.0:
        return sparsity_report(model)

    if not isinstance(induce, (bool, dict)):
        raise ValueError(f"induce must be True/False or a dict of induce_sparsity options, got {induce!r}")
    needs_calibration = method != "magnitude" or allocation == "owl" or induce is not False
    groups = _prunable_linears(model, need_blocks=needs_calibration)
    if nm is not None:
        for group in groups:
            for name, linear in group:
                check_nm_divides(linear_view(linear).in_features, nm[1], name)
    if needs_calibration:
        if calibration is None:
            what = (f"method={method!r}" if method != "magnitude" else "allocation='owl'" if allocation == "owl"
                    else "induce")
            raise ValueError(f"{what} needs calibration data: calibration=[LongTensor [B, T], ...]")
        calibration = as_calibration_batches(calibration)  # a list: OWL goes over it twice
    if induce is not False:
        _induce(model, calibration, induce, method, nm, show_progress)

    if nm is not None:
        zero_counts = None  # N:M fixes the zeros of every group; there is no count to allocate
    elif allocation == "owl":
        zero_counts = _owl_zero_counts(model, calibration, groups, sparsity, owl_threshold, owl_lambda, show_progress)
    else:
        zero_counts = {name: unstructured_zero_count(sparsity, linear.weight.numel())
                       for group in groups for name, linear in group}

    with torch.no_grad():
        if method == "magnitude":
            _prune_by_magnitude(groups, zero_counts, nm, magnitude_scope)
        else:
            _prune_blockwise(model, calibration, method, zero_counts, nm, blocksize, percdamp, show_progress)
    return sparsity_report(model)


def _checked_options(model, method, sparsity, pattern, allocation, magnitude_scope, blocksize,
                     percdamp) -> tuple[tuple[int, int] | None, float | None]:
    """Refuse bad ``prune`` arguments; return the parsed pattern ``(N, M)`` (or None) and the sparsity."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {METHODS}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; choose one of {ALLOCATIONS}")
    if magnitude_scope not in MAGNITUDE_SCOPES:
        raise ValueError(f"unknown magnitude_scope {magnitude_scope!r}; choose one of {MAGNITUDE_SCOPES}")
    if (sparsity is None) == (pattern is None):
        raise ValueError(f"give exactly one of sparsity / pattern, got sparsity={sparsity!r}, pattern={pattern!r}")
    if hasattr(model, "peft_config"):
        raise ValueError("prune the base model before wrapping it with peft (got a peft-wrapped model)")
    refuse_quantized(model, "sp.prune")
    nm = parse_pattern(pattern) if pattern is not None else None
    if nm is not None and allocation == "owl":
        raise ValueError(f"allocation='owl' sets non-uniform unstructured sparsities; it cannot be used with "
                         f"pattern={pattern!r}")
    if nm is None:
        sparsity = check_sparsity(sparsity, "sparsity")
    if not is_int(blocksize) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    if not is_real(percdamp) or percdamp <= 0:
        raise ValueError(f"percdamp must be a number > 0, got {percdamp!r}")
    if nm is not None and method == "sparsegpt" and blocksize % nm[1]:
        raise ValueError(f"SparseGPT blocksize={blocksize} must be a multiple of M={nm[1]} for pattern={pattern!r}")
    return nm, sparsity


def _induce(model, calibration, induce, method, nm, show_progress) -> None:
    """Fold Sparsity Induction's scales into ``model`` before pruning (``prune(induce=...)``)."""
    from .induction import PAIRS, ROW_SCALED_PAIRS, induce_sparsity

    options = {"show_progress": show_progress, **(induce if isinstance(induce, dict) else {})}
    # Unstructured SparseGPT picks each column block's zeros across rows. The vo/down folds divide the
    # rows of v_proj/up_proj by the scales of the channels they feed, so the rows feeding the most
    # active channels look least salient and are pruned hardest (87-99% instead of 70% in SmolLM2's
    # up_proj, docs/results/induction.md; the model diverged at 70%). Its default is therefore
    # the column folds only (229.8 vs 258.4 without induction at 70%); N:M picks per row, immune.
    row_sensitive = method == "sparsegpt" and nm is None
    if row_sensitive and "pairs" not in options:
        options["pairs"] = tuple(pair for pair in PAIRS if pair not in ROW_SCALED_PAIRS)
    pairs = options.get("pairs", PAIRS)  # induce_sparsity validates it; a lone str is one pair there too
    row_folds = [pair for pair in ((pairs,) if isinstance(pairs, str) else pairs) if pair in ROW_SCALED_PAIRS]
    if row_sensitive and row_folds:
        # stacklevel 3: the warning points at the caller of prune().
        warnings.warn(f"prune(method='sparsegpt', induce=...) with the {row_folds} folds: they scale rows of "
                      "v_proj/up_proj, and unstructured SparseGPT compares saliencies across rows, so it prunes "
                      "the rows feeding the most active channels hardest (on the SmolLM2-135M at 70%: ppl "
                      "1.2e7 against 258 without induction). Leave 'pairs' unset (column folds only) "
                      "(docs/induction.md)", RuntimeWarning, stacklevel=3)

    induce_sparsity(model, calibration, **options)


def _prune_by_magnitude(groups, zero_counts: dict[str, int] | None, nm, magnitude_scope: str) -> None:
    """Magnitude pruning needs no calibration: every layer at once, in place."""
    for group in groups:
        for name, linear in group:
            n_zeros = None if zero_counts is None else zero_counts[name]
            # Scores, masks and N:M groups are out x in (rows = outputs) for Conv1D too.
            keep = magnitude_keep_mask(linear_view(linear).weight, n_zeros, nm, magnitude_scope)
            write_masked_weight_(linear, keep)


def _prune_blockwise(model, calibration, method: str, zero_counts: dict[str, int] | None, nm, blocksize: int,
                     percdamp: float, show_progress: bool) -> None:
    """Wanda / SparseGPT: each decoder block pruned from statistics of the already pruned blocks' outputs."""

    def prune_block(index, stats):
        for name, (linear, stat) in stats.items():
            n_zeros = None if zero_counts is None else zero_counts[name]
            weight = linear_view(linear).weight  # out x in, whatever the layer stores
            if method == "wanda":
                keep = wanda_keep_mask(weight, stat, n_zeros, nm)
                write_masked_weight_(linear, keep)
            else:
                keep, new_weight = sparsegpt_prune(weight, stat, n_zeros, nm, blocksize, percdamp)
                write_masked_weight_(linear, keep, new_weight)

    run_blockwise(model, calibration, _make_stat(method), prune_block, desc=f"{method} pruning",
                  show_progress=show_progress)
