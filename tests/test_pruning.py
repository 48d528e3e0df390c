import math
import re

import pytest
import torch
from torch import nn

from conftest import calibration_batches
from sparse_peft.sparsity import is_nm_sparse, named_linears, prune, selection, sparsity_report
from sparse_peft.sparsity.calibration import find_decoder_blocks, run_blockwise
from sparse_peft.sparsity.owl import allocate_zero_counts, owl_block_sparsities
from sparse_peft.sparsity.selection import layerwise_keep_mask, rowwise_keep_mask, write_masked_weight_
from sparse_peft.sparsity.sparsegpt import HessianStat, sparsegpt_prune
from sparse_peft.sparsity.wanda import InputNormStat

METHODS = ["magnitude", "wanda", "sparsegpt"]


def _block_linears(model):
    name, _ = find_decoder_blocks(model)
    return [(n, m) for n, m in named_linears(model) if n.startswith(name + ".")]


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _assert_pruned_exactly_zero(weight):
    # pruned positions hold +0.0, so weight == weight * mask bit for bit
    mask = weight != 0
    assert torch.equal(_bits(weight), _bits(weight * mask))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_unstructured_exact_zero_count(tiny_model, arch, method, sparsity):
    model = tiny_model(arch)
    prune(model, method, sparsity=sparsity, calibration=calibration_batches(), show_progress=False)
    for name, linear in _block_linears(model):
        w = linear.weight
        zeros = int((w == 0).sum())
        assert zeros == round(sparsity * w.numel()), name
        _assert_pruned_exactly_zero(w)
        if method != "sparsegpt":  # row-wise comparison: zeros spread evenly over rows
            per_row = (w == 0).sum(dim=1)
            assert per_row.max() - per_row.min() <= 1, name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_groups(tiny_model, arch, method, pattern):
    n, m = map(int, pattern.split(":"))
    model = tiny_model(arch)
    prune(model, method, pattern=pattern, calibration=calibration_batches(), show_progress=False)
    for name, linear in _block_linears(model):
        w = linear.weight
        assert is_nm_sparse(w, n, m), name
        zeros_per_group = (w == 0).reshape(w.shape[0], -1, m).sum(-1)
        assert bool((zeros_per_group == m - n).all()), name
        _assert_pruned_exactly_zero(w)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bf16_model_exact(tiny_model, method):
    model = tiny_model("llama").to(torch.bfloat16)
    prune(model, method, sparsity=0.7, calibration=calibration_batches(), show_progress=False)
    for name, linear in _block_linears(model):
        assert linear.weight.dtype == torch.bfloat16
        assert int((linear.weight == 0).sum()) == round(0.7 * linear.weight.numel()), name
        _assert_pruned_exactly_zero(linear.weight)


def test_magnitude_layer_scope_and_rows(tiny_model):
    model = tiny_model("llama")
    dense = {n: m.weight.detach().clone() for n, m in _block_linears(model)}
    prune(model, "magnitude", sparsity=0.5, magnitude_scope="layer")
    for name, linear in _block_linears(model):
        w0 = dense[name].abs()
        kept = linear.weight != 0
        assert int((~kept).sum()) == w0.numel() // 2
        assert w0[kept].min() >= w0[~kept].max()  # the smallest |W| of the whole layer went


def test_owl_keeps_global_count_and_is_non_uniform(tiny_model):
    model = tiny_model("llama", layers=4)
    sparsity, lam = 0.6, 0.08
    report = prune(model, "wanda", sparsity=sparsity, calibration=calibration_batches(), allocation="owl",
                   owl_lambda=lam, show_progress=False)
    linears = _block_linears(model)
    total = sum(m.weight.numel() for _, m in linears)
    zeros = sum(int((m.weight == 0).sum()) for _, m in linears)
    assert zeros == round(sparsity * total)
    ratios = [report.layers[n].sparsity for n, _ in linears]
    assert max(ratios) - min(ratios) > lam  # non-uniform: the extremes sit at s - λ and s + λ
    assert all(sparsity - lam - 1e-3 <= r <= sparsity + lam + 1e-3 for r in ratios)
    # one ratio per block: every linear of a block shares it (up to integer rounding)
    for block in range(4):
        block_ratios = [report.layers[n].sparsity for n, _ in linears if f".layers.{block}." in n]
        assert max(block_ratios) - min(block_ratios) < 1e-3


def test_owl_formula_units():
    # larger outlier ratio -> lower sparsity; the parameter-weighted mean is the target
    sparsities = owl_block_sparsities([0.01, 0.03, 0.02], [100, 300, 200], 0.5, 0.08)
    assert sparsities[1] < sparsities[2] < sparsities[0]
    assert sum(s * n for s, n in zip(sparsities, [100, 300, 200])) == pytest.approx(0.5 * 600)
    assert min(sparsities) == pytest.approx(0.5 - 0.08) or max(sparsities) == pytest.approx(0.5 + 0.08)
    assert owl_block_sparsities([0.02, 0.02], [5, 5], 0.5, 0.08) == [0.5, 0.5]
    counts = allocate_zero_counts([0.33, 0.51, 0.77], [97, 89, 101], 155)  # shares: 32.01, 45.39, 77.77
    assert sum(counts) == 155 and all(abs(c - s * n) < 1 for c, s, n in zip(counts, [0.33, 0.51, 0.77], [97, 89, 101]))


def test_calibration_is_block_sequential(tiny_model, arch):
    """Block k's statistics come from the outputs of the *pruned* blocks before it, and the captured
    inputs of an unpruned model are exactly its hidden states (masks, positions handled)."""
    batches = calibration_batches(n=3)

    def collect(model, prune_first_block):
        inputs, calls = {}, {}

        def make_stat(linear):
            return _Recorder()

        def process(index, stats):
            for name, (linear, stat) in stats.items():
                inputs[name], calls[name] = torch.cat(stat.xs), len(stat.xs)
            if index == 0 and prune_first_block:
                for name, (linear, stat) in stats.items():
                    with torch.no_grad():
                        linear.weight.mul_(0.5)

        run_blockwise(model, batches, make_stat, process, show_progress=False)
        return inputs, calls

    dense_inputs, calls = collect(tiny_model(arch), False)
    pruned_inputs, _ = collect(tiny_model(arch), True)
    assert set(calls.values()) == {len(batches)}  # each linear saw each batch once per block
    _, blocks = find_decoder_blocks(tiny_model(arch))
    first = [n for n in dense_inputs if ".0." in n]
    second = [n for n in dense_inputs if ".1." in n]
    for name in first:
        assert torch.equal(dense_inputs[name], pruned_inputs[name])
    assert all(not torch.allclose(dense_inputs[name], pruned_inputs[name]) for name in second)

    # block 1's first linear input, recomputed from the model's own hidden states
    model = tiny_model(arch)
    block1 = find_decoder_blocks(model)[1][1]
    seen = []
    first_linear_name, first_linear = next(iter(named_linears(block1)))
    handle = first_linear.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch)
    handle.remove()
    name = next(n for n in second if n.endswith(first_linear_name))
    torch.testing.assert_close(dense_inputs[name], torch.cat(seen), rtol=1e-5, atol=1e-5)


class _Recorder:
    def __init__(self):
        self.xs = []

    def add(self, x):
        self.xs.append(x.clone())


def test_padding_tokens_excluded(tiny_model):
    unpadded = calibration_batches(n=2, seq_len=12)
    padded = [{"input_ids": torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], 1),
               "attention_mask": torch.cat([torch.ones(1, 12), torch.zeros(1, 4)], 1).long()} for b in unpadded]

    def norms(calibration):
        model, out = tiny_model("llama"), {}
        run_blockwise(model, calibration, lambda linear: InputNormStat(linear.in_features),
                      lambda i, stats: out.update({n: (s.n_tokens, s.sum_sq) for n, (l, s) in stats.items()}),
                      show_progress=False)
        return out

    a, b = norms(unpadded), norms(padded)
    for name in a:
        assert a[name][0] == b[name][0] == 24
        torch.testing.assert_close(a[name][1], b[name][1], rtol=1e-4, atol=1e-6)


def _padded(batches, pad: int = 4):
    """The same batches with ``pad`` padding positions appended (right padding, as tokenizers pad)."""
    return [{"input_ids": torch.cat([b, torch.zeros(b.shape[0], pad, dtype=torch.long)], 1),
             "attention_mask": torch.cat([torch.ones_like(b), torch.zeros(b.shape[0], pad, dtype=torch.long)], 1)}
            for b in batches]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_padding_positions_do_not_change_the_mask(tiny_model, method):
    unpadded = calibration_batches(n=2, seq_len=12)
    masks = []
    for calibration in (unpadded, _padded(unpadded)):
        model = tiny_model("llama")
        prune(model, method, sparsity=0.5, calibration=calibration, show_progress=False)
        masks.append({name: linear.weight != 0 for name, linear in _block_linears(model)})
    for name, mask in masks[0].items():
        assert torch.equal(masks[1][name], mask), name


def _weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_unchanged(model, before):
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibration_with_no_real_token_is_refused_before_pruning(tiny_model, method):
    model = tiny_model("llama")
    before = _weights(model)
    batches = _padded(calibration_batches(n=2, seq_len=12))
    batches[1]["attention_mask"] = torch.zeros_like(batches[1]["attention_mask"])
    with pytest.raises(ValueError, match=r"calibration batch 1 has no real tokens: its attention_mask \(shape "
                                         r"\(1, 16\)\) is all zeros"):
        prune(model, method, sparsity=0.5, calibration=batches, show_progress=False)
    _assert_unchanged(model, before)
    all_padding = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.zeros(2, 8)}
    with pytest.raises(ValueError, match=r"calibration batch 0 has no real tokens"):
        prune(model, method, sparsity=0.5, calibration=all_padding, show_progress=False)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("shape", [(1, 0), (0, 8)])
def test_empty_calibration_batch_is_refused_before_pruning(tiny_model, method, shape):
    model = tiny_model("llama")
    before = _weights(model)
    batches = calibration_batches(n=3) + [torch.zeros(*shape, dtype=torch.long)]
    with pytest.raises(ValueError, match=rf"calibration batch 3 is empty: input_ids has shape {re.escape(str(shape))}"):
        prune(model, method, sparsity=0.5, calibration=batches, show_progress=False)
    _assert_unchanged(model, before)


def test_attention_mask_of_another_shape_is_refused(tiny_model):
    batch = {"input_ids": torch.ones(1, 8, dtype=torch.long), "attention_mask": torch.ones(1, 6)}
    with pytest.raises(ValueError, match=r"calibration batch 0: attention_mask has shape \(1, 6\), input_ids \(1, 8\)"):
        prune(tiny_model("llama"), "wanda", sparsity=0.5, calibration=[batch], show_progress=False)


def _layer_inputs(model, batches):
    """Inputs of every block-0 linear on the dense model."""
    inputs, handles = {}, []
    for name, linear in _block_linears(model):
        if ".0." in name:
            handles.append(linear.register_forward_hook(
                lambda m, i, o, name=name: inputs.setdefault(name, []).append(i[0].reshape(-1, i[0].shape[-1]))))
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch)
    for h in handles:
        h.remove()
    return {name: torch.cat(xs) for name, xs in inputs.items()}


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(tiny_model):
    batches = calibration_batches(n=8, seq_len=32)
    dense = tiny_model("llama")
    inputs = _layer_inputs(dense, batches)
    dense_weights = {n: m.weight.detach().clone() for n, m in _block_linears(dense)}
    errors = {}
    for method in METHODS:
        model = tiny_model("llama")
        prune(model, method, sparsity=0.6, calibration=batches, show_progress=False)
        weights = dict(_block_linears(model))
        errors[method] = {n: float(((dense_weights[n] - weights[n].weight.detach()) @ x.T).square().sum())
                          for n, x in inputs.items()}
    for name in inputs:  # same budget of zeros per layer, less output error
        assert errors["sparsegpt"][name] < errors["magnitude"][name], name
    assert sum(errors["sparsegpt"].values()) < sum(errors["wanda"].values())


def test_sparsegpt_dead_inputs_and_exact_count():
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    x = torch.randn(256, 64) @ torch.randn(64, 64)
    x[:, :5] = 0  # dead input features
    stat = HessianStat(64)
    stat.add(x)
    for kwargs in (dict(n_zeros=333), dict(nm=(2, 4))):
        keep, new_weight = sparsegpt_prune(weight, stat, blocksize=32, **kwargs)
        assert torch.isfinite(new_weight).all()
        # pruning a dead input costs nothing, so it goes first (N:M: within its group of 4)
        if "n_zeros" in kwargs:
            assert int((~keep).sum()) == 333
            assert not keep[:, :5].any()
        else:
            assert not keep[:, 4].any() and bool((keep[:, :4].sum(1) == 2).all())
        assert bool((new_weight[~keep] == 0).all())


def test_kept_zero_weights_are_nudged_so_the_count_is_exact():
    linear = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[:, :2] = 1.0  # 75% zeros already
    keep = rowwise_keep_mask(linear.weight.abs(), n_zeros=16)  # ask for 50%
    assert write_masked_weight_(linear, keep) == 8
    assert int((linear.weight == 0).sum()) == 16
    assert torch.equal(linear.weight != 0, keep)
    assert linear.weight.abs().max() == 1.0 and linear.weight[keep].abs().min() == torch.finfo(torch.float32).tiny


def test_sparsity_zero_leaves_model_unchanged(tiny_model):
    model = tiny_model("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = prune(model, "sparsegpt", sparsity=0.0, calibration=calibration_batches())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert report.global_sparsity == 0.0


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_sparsity_names_value(tiny_model, value):
    with pytest.raises(ValueError, match="sparsity") as info:
        prune(tiny_model("llama"), "magnitude", sparsity=value)
    assert repr(value) in str(info.value)


def test_nm_not_dividing_names_layer_and_leaves_model_untouched(tiny_model):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*M=5.*in_features=64"):
        prune(model, "wanda", pattern="2:5", calibration=calibration_batches())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="'4:2'"):
        prune(model, "magnitude", pattern="4:2")


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(method="obs", sparsity=0.5), "magnitude"),
    (dict(method="wanda", sparsity=0.5, allocation="greedy"), "owl"),
    (dict(method="magnitude", sparsity=0.5, magnitude_scope="column"), "row"),
    (dict(method="wanda", sparsity=0.5, pattern="2:4"), "exactly one"),
    (dict(method="wanda"), "exactly one"),
    (dict(method="wanda", sparsity=0.5), "calibration"),
    (dict(method="sparsegpt", pattern="2:4"), "calibration"),
    (dict(method="magnitude", sparsity=0.5, allocation="owl"), "calibration"),
    (dict(method="wanda", pattern="2:4", allocation="owl", calibration=[torch.zeros(1, 4, dtype=torch.long)]), "owl"),
    (dict(method="wanda", sparsity=0.5, calibration=[]), "empty"),
    (dict(method="wanda", sparsity=0.5, calibration=[torch.randn(1, 4)]), "integer token ids"),
])
def test_bad_arguments(tiny_model, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        prune(tiny_model("llama"), **kwargs)


def test_models_without_decoder_blocks():
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    report = prune(mlp, "magnitude", sparsity=0.25)
    assert [layer.zeros for layer in report.layers.values()] == [128, 64]
    with pytest.raises(ValueError, match="no decoder blocks"):
        prune(mlp, "wanda", sparsity=0.5, calibration=[torch.zeros(1, 4, dtype=torch.long)])


def test_peft_wrapped_model_is_refused(tiny_model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="before wrapping"):
        prune(peft_model, "magnitude", sparsity=0.5)


def test_report_matches_weights_after_pruning(tiny_model):
    model = tiny_model("gpt_neox")
    report = prune(model, "wanda", sparsity=0.7, calibration=calibration_batches(), show_progress=False)
    assert report.to_dict() == sparsity_report(model).to_dict()
    expected = sum(round(0.7 * m.weight.numel()) for _, m in _block_linears(model))
    assert report.zeros == expected
    assert math.isclose(report.global_sparsity, expected / report.numel)


def test_rowwise_selection_ranks_a_block_of_rows_at_a_time(monkeypatch):
    """The per-row rule selects within at most a block of rows at once (what bounds ``kthvalue``'s copy
    and int64 indices on a large layer), every row once, and the extra zeros still go across blocks."""
    scores = torch.rand(10, 8, generator=torch.Generator().manual_seed(6))
    whole = rowwise_keep_mask(scores, 45)  # 4 a row, 5 rows with one more
    ranked_rows = []
    lowest_per_row = selection.lowest_per_row

    def recording_lowest_per_row(ranked, k):
        ranked_rows.append(ranked.shape[0])
        return lowest_per_row(ranked, k)

    monkeypatch.setattr(selection, "RANK_BLOCK_ELEMENTS", 3 * 8)
    monkeypatch.setattr(selection, "lowest_per_row", recording_lowest_per_row)
    assert torch.equal(rowwise_keep_mask(scores, 45), whole)
    assert ranked_rows == [3, 3, 3, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_layer_selection_counts_digits_a_block_at_a_time_and_equals_a_stable_sort(monkeypatch, dtype):
    """The layer-wide rule finds its threshold from the scores' bits (``kth_lowest``), a block at a
    time: the zeros are the first ``k`` of a stable sort of the whole layer with signed values,
    ``-0.0`` tying with ``0.0``, subnormals, infinities and NaN (last, tying with ``+inf``), and no
    call ranks more than a block."""
    g = torch.Generator().manual_seed(7)
    tiny = torch.finfo(dtype).tiny
    pool = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, tiny / 4, -tiny / 4, tiny, float("inf"), -float("inf"),
                         float("nan")], dtype=torch.float64)
    ranked_sizes = []
    nan_ranks_last = selection.nan_ranks_last

    def recording_nan_ranks_last(scores):
        ranked_sizes.append(scores.numel())
        return nan_ranks_last(scores)

    monkeypatch.setattr(selection, "nan_ranks_last", recording_nan_ranks_last)
    for trial in range(20):
        picks = torch.randint(0, pool.numel(), (6, 7), generator=g)
        scores = torch.where(torch.rand(6, 7, generator=g) < 0.5, pool[picks], torch.randn(6, 7, generator=g,
                                                                                           dtype=torch.float64))
        scores = scores.to(dtype)
        ranked = scores.double().reshape(-1).nan_to_num(nan=float("inf"), posinf=float("inf"))
        ranked[ranked == 0] = 0.0  # -0.0 and 0.0 are one score
        order = torch.argsort(ranked, stable=True)
        for block_elements in (1 << 22, 5):
            monkeypatch.setattr(selection, "RANK_BLOCK_ELEMENTS", block_elements)
            for n in (0, 1, 13, 21, 30, 41, 42):
                expected = torch.ones(42, dtype=torch.bool)
                expected[order[:n]] = False
                ranked_sizes.clear()
                assert torch.equal(layerwise_keep_mask(scores, n), expected.reshape(6, 7)), (trial, block_elements, n)
                assert max(ranked_sizes, default=0) <= block_elements
    with pytest.raises(ValueError, match="cannot prune 43 of 42"):
        layerwise_keep_mask(scores, 43)


@pytest.mark.parametrize("block_elements", [1 << 22, 10])
def test_row_and_layer_selection_equal_a_stable_sort_with_ties_and_nan_last(monkeypatch, block_elements):
    """Masks are chosen by selecting each row's k-th score, not by sorting: the same zeros as the first
    ``k`` of a stable sort (ties to the lower index), and a NaN score is pruned only after every finite
    one; the row-wise rule works a block of rows at a time (here one block, or one row a block)."""
    monkeypatch.setattr(selection, "RANK_BLOCK_ELEMENTS", block_elements)
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        scores = torch.randint(0, 3, (4, 10), generator=g).float() if trial % 2 else torch.rand(4, 10, generator=g)
        scores[trial % 4, trial % 10] = float("inf")
        for n in range(41):
            per_row, extra = divmod(n, 4)
            order = torch.argsort(scores, dim=1, stable=True)
            expected = torch.ones(4, 10, dtype=torch.bool)
            expected.scatter_(1, order[:, :per_row], False)
            if extra:
                next_idx = order[:, min(per_row, 9)]
                rows = torch.argsort(scores.gather(1, next_idx[:, None]).squeeze(1), stable=True)[:extra]
                expected[rows, next_idx[rows]] = False
            assert torch.equal(rowwise_keep_mask(scores, n), expected), (trial, n)
            flat_expected = torch.ones(40, dtype=torch.bool)
            flat_expected[torch.argsort(scores.reshape(-1), stable=True)[:n]] = False
            assert torch.equal(layerwise_keep_mask(scores, n), flat_expected.reshape(4, 10)), (trial, n)
    with_nan = torch.tensor([[float("nan"), 3.0, 2.0, 1.0]])
    assert rowwise_keep_mask(with_nan, 3).tolist() == [[True, False, False, False]]
    assert layerwise_keep_mask(with_nan, 2).tolist() == [[True, True, False, False]]
