"""Sparsity Induction: function-preserving scale folding, what pruners can and cannot see of it,
and the spectral-norm feature loss."""

import copy
import warnings

import pytest
import torch
from conftest import TokenDataset, calibration_batches, logits, make_tiny_model, rel_err
from test_recovery_script import tiny_run  # noqa: F401 (fixture)

import sparse_peft as sp
from sparse_peft.sparsity import named_linears, prune
from sparse_peft.sparsity.induction import INDUCTION_MODEL_TYPES, induce_sparsity
from sparse_peft.sparsity.sparsegpt import HessianStat, sparsegpt_prune
from sparse_peft.training.spectral import (
    SpectralNormLoss,
    SpectralNormTrainer,
    capture_linear_inputs,
    spectral_features,
    spectral_norm,
)

LLAMA_STYLE = ["llama", "qwen2", "mistral"]


def _calibration():
    return calibration_batches(n=4, seq_len=32)


def _anisotropic(model, seed=0):
    """Random norm weights (log-normal) and biases: the channels differ, so the scales are far from 1
    and every fold (biases included) is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.randn(param.shape, generator=g).mul(0.7).exp())
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    return model


def _model(arch="llama", **config_overrides):
    if not config_overrides:
        return _anisotropic(make_tiny_model(arch))
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                         **config_overrides)
    torch.manual_seed(0)
    return _anisotropic(AutoModelForCausalLM.from_config(config).eval())


def _masks(model):
    return {name: lin.weight != 0 for name, lin in named_linears(model)}


def _differing(masks_a, masks_b):
    return {name: int((masks_a[name] != masks_b[name]).sum()) for name in masks_a
            if not torch.equal(masks_a[name], masks_b[name])}


# ----------------------------------------------------------------------------- function preservation

@pytest.mark.parametrize("arch", LLAMA_STYLE)
def test_folding_preserves_logits_and_parameters(arch):
    model = _model(arch)
    reference = logits(model)
    params_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = induce_sparsity(model, _calibration(), show_progress=False)

    assert rel_err(logits(model), reference) < 1e-4
    params_after = dict(model.named_parameters())
    assert {n: p.shape for n, p in params_after.items()} == {n: p.shape for n, p in params_before.items()}
    # Something was really folded: every pair of both blocks, with scales far from uniform.
    assert len(report.scales) == 2 * 4
    assert min(report.spread().values()) > 1.5
    changed = [n for n, p in params_after.items() if not torch.equal(p, params_before[n])]
    assert any("input_layernorm" in n for n in changed) and any("down_proj" in n for n in changed)
    if arch == "qwen2":  # v_proj's bias is scaled with its rows; q/k biases are untouched
        assert "model.layers.0.self_attn.v_proj.bias" in changed
        assert "model.layers.0.self_attn.q_proj.bias" not in changed


def test_llama_with_attention_and_mlp_biases():
    model = _model("llama", attention_bias=True, mlp_bias=True)
    reference = logits(model)
    induce_sparsity(model, _calibration(), show_progress=False)
    assert rel_err(logits(model), reference) < 1e-4


def test_gqa_heads_of_one_kv_head_share_a_scale():
    model = _model("llama")  # 4 query heads, 2 kv heads, head_dim 16
    o_before = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    report = induce_sparsity(model, _calibration(), pairs=("vo",), show_progress=False)
    column_scale = model.model.layers[0].self_attn.o_proj.weight[0] / o_before[0]
    per_head = column_scale.reshape(4, 16)
    s_kv = report.scales["model.layers.0.vo"].reshape(2, 16)
    torch.testing.assert_close(per_head[0], per_head[1])  # heads 0 and 1 read kv head 0
    torch.testing.assert_close(per_head[2], per_head[3])
    torch.testing.assert_close(per_head[0], s_kv[0])
    torch.testing.assert_close(per_head[2], s_kv[1])


def test_power_of_two_scales_are_bit_exact():
    model = _model("llama")
    reference = logits(model)
    report = induce_sparsity(model, _calibration(), power_of_two=True, show_progress=False)
    for s in report.scales.values():
        assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    assert torch.equal(logits(model), reference)


def test_alpha_zero_is_the_identity():
    model = _model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    induce_sparsity(model, _calibration(), alpha=0.0, show_progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_pruned_model_keeps_its_mask():
    model = _model("llama")
    prune(model, "magnitude", sparsity=0.5, show_progress=False)
    masks = _masks(model)
    induce_sparsity(model, _calibration(), show_progress=False)
    assert not _differing(_masks(model), masks)


def test_public_api_and_report():
    assert sp.induce_sparsity is induce_sparsity and sp.SpectralNormTrainer is SpectralNormTrainer
    report = sp.induce_sparsity(_model("qwen2"), _calibration(), pairs=("qkv", "down"), show_progress=False)
    assert list(report.scales) == [f"model.layers.{i}.{pair}" for i in range(2) for pair in ("qkv", "down")]
    assert report.scales["model.layers.0.down"].shape == (128,)
    assert "model.layers.1.qkv" in report.to_markdown()


@pytest.mark.parametrize("arch", ["gpt_neox", "opt"])
def test_uncovered_architectures_are_refused(arch):
    model = make_tiny_model(arch)
    with pytest.raises(ValueError, match=rf"{INDUCTION_MODEL_TYPES[0]}.*model_type='{arch}'"):
        induce_sparsity(model, _calibration(), show_progress=False)


def test_bad_options_are_refused():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="alpha"):
        induce_sparsity(model, _calibration(), alpha=1.5)
    with pytest.raises(ValueError, match="objective"):
        induce_sparsity(model, _calibration(), objective="l1")
    with pytest.raises(ValueError, match="pairs"):
        induce_sparsity(model, _calibration(), pairs=("qk",))
    with pytest.raises(ValueError, match="induce needs calibration"):
        prune(model, "magnitude", sparsity=0.5, induce=True)


# ----------------------------------------------------------------------------- what pruners see

@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"pattern": "2:4"}], ids=["50%", "2:4"])
def test_wanda_masks_are_invariant_to_induction(target):
    """|W_ij s_j| · ||X_j / s_j|| = |W_ij| · ||X_j||, and a row of v_proj / up_proj times 1/s_r keeps
    its order: the same masks, whatever the scales."""
    calibration = _calibration()
    plain = _model("llama")
    induced = copy.deepcopy(plain)
    report = induce_sparsity(induced, calibration, show_progress=False)
    assert min(report.spread().values()) > 1.5  # the weights did change a lot
    prune(plain, "wanda", calibration=calibration, show_progress=False, **target)
    prune(induced, "wanda", calibration=calibration, show_progress=False, **target)
    assert not _differing(_masks(plain), _masks(induced))


def test_wanda_leftover_zeros_follow_row_scales():
    """At 70% of 64 x 128 the zero count is not a multiple of the rows: prune() gives the leftover
    zeros to the rows whose next candidate scores lowest, a comparison ACROSS rows, which the row
    scales of v_proj / up_proj do move. Within every row the order is unchanged, so in block 0
    (same inputs for both) each row differs in at most one position, and only in those layers."""
    calibration = _calibration()
    plain = _model("llama")
    induced = copy.deepcopy(plain)
    induce_sparsity(induced, calibration, show_progress=False)
    prune(plain, "wanda", sparsity=0.7, calibration=calibration, show_progress=False)
    prune(induced, "wanda", sparsity=0.7, calibration=calibration, show_progress=False)
    plain_masks, induced_masks = _masks(plain), _masks(induced)
    differing = {name: n for name, n in _differing(plain_masks, induced_masks).items()
                 if name.startswith("model.layers.0.")}
    assert differing and set(differing) <= {"model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj"}
    for name in differing:
        per_row = (plain_masks[name] != induced_masks[name]).sum(dim=1)
        assert int(per_row.max()) <= 1, name


@pytest.mark.parametrize("pairs, invariant", [(("qkv", "gate_up"), True), (("vo",), False), (("down",), False)])
def test_owl_allocation_sees_only_the_row_scales(pairs, invariant):
    """OWL pools a block's Wanda scores: column folds leave every score as it is, but the vo and
    down folds multiply whole rows of v_proj / up_proj by 1/s, which moves the pooled mean and the
    outlier count, hence the per-block sparsities."""
    calibration = _calibration()
    plain = _model("llama")
    induced = copy.deepcopy(plain)
    induce_sparsity(induced, calibration, pairs=pairs, show_progress=False)
    prune(plain, "wanda", sparsity=0.7, allocation="owl", calibration=calibration, show_progress=False)
    prune(induced, "wanda", sparsity=0.7, allocation="owl", calibration=calibration, show_progress=False)
    differing = _differing(_masks(plain), _masks(induced))
    assert (not differing) == invariant, differing


@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["50%", "2:4"])
def test_sparsegpt_sees_induction_only_through_damping(nm):
    """H -> D⁻¹HD⁻¹ and W -> WD leave OBS's saliencies and updates unchanged; only λ = percdamp ·
    mean(diag H) does not scale per channel. Power-of-two scales make the rest bit-exact."""
    g = torch.Generator().manual_seed(0)
    rows, cols = 32, 64
    weight = torch.randn(rows, cols, generator=g)
    channel_rms = torch.randn(cols, generator=g).mul(1.5).exp()
    inputs = torch.randn(1024, cols, generator=g) * channel_rms
    scale = torch.exp2(torch.log2(channel_rms).round())
    n_zeros = None if nm else rows * cols // 2
    differing = {}
    for percdamp in (1e-2, 1e-6):
        plain, induced = HessianStat(cols), HessianStat(cols)
        plain.add(inputs)
        induced.add(inputs / scale)
        keep_plain, w_plain = sparsegpt_prune(weight, plain, n_zeros, nm, percdamp=percdamp)
        keep_induced, w_induced = sparsegpt_prune(weight * scale, induced, n_zeros, nm, percdamp=percdamp)
        differing[percdamp] = int((keep_plain != keep_induced).sum())
    assert differing[1e-2] > 20  # the default damping sees the scales
    assert differing[1e-6] == 0  # nothing else does
    torch.testing.assert_close(w_induced / scale, w_plain, rtol=0, atol=1e-2 * float(w_plain.abs().max()))


def test_magnitude_after_induction_ranks_like_wanda():
    """alpha=1 gives |W_ij| s_j ∝ |W_ij| rms(X_j): magnitude pruning's masks change, and in the first
    block (whose statistics are the same for both) equal Wanda's wherever the input channel has its
    own scale (every linear but o_proj, whose columns share a scale within a GQA group)."""
    calibration = _calibration()
    base = _model("llama")
    magnitude_plain, magnitude_induced, wanda = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    prune(magnitude_plain, "magnitude", sparsity=0.5, show_progress=False)
    prune(magnitude_induced, "magnitude", sparsity=0.5, calibration=calibration, induce=True, show_progress=False)
    prune(wanda, "wanda", sparsity=0.5, calibration=calibration, show_progress=False)
    induced_masks, wanda_masks = _masks(magnitude_induced), _masks(wanda)
    assert len(_differing(_masks(magnitude_plain), induced_masks)) == len(induced_masks)  # every layer changed
    for name in induced_masks:
        if name.startswith("model.layers.0.") and "o_proj" not in name:
            assert torch.equal(induced_masks[name], wanda_masks[name]), name


def test_prune_induce_is_the_two_step_recipe():
    calibration = _calibration()
    one_step, two_step = _model("llama"), _model("llama")
    prune(one_step, "magnitude", pattern="2:4", calibration=calibration, induce={"alpha": 0.5}, show_progress=False)
    induce_sparsity(two_step, calibration, alpha=0.5, show_progress=False)
    prune(two_step, "magnitude", pattern="2:4", show_progress=False)
    for (name, a), (_, b) in zip(named_linears(one_step), named_linears(two_step)):
        assert torch.equal(a.weight, b.weight), name


# ----------------------------------------------------------------------------- feature level

def test_power_iteration_matches_svd():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(3, 20, 12, generator=g) + 2.0 * torch.randn(3, 20, 1, generator=g)  # a spectral gap
    exact = torch.linalg.matrix_norm(features, ord=2)
    torch.testing.assert_close(spectral_norm(features, iterations=30), exact, rtol=1e-4, atol=0)
    # Gradient: d sigma / dH = u vᵀ, as for the SVD.
    leaf = features.clone().requires_grad_(True)
    spectral_norm(leaf, iterations=30).sum().backward()
    reference = features.clone().requires_grad_(True)
    torch.linalg.matrix_norm(reference, ord=2).sum().backward()
    torch.testing.assert_close(leaf.grad, reference.grad, rtol=1e-3, atol=1e-4)


def test_spectral_loss_zero_for_rank_one_scale_free_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    loss = SpectralNormLoss()
    rank_one = torch.randn(2, 10, 1, generator=g) * torch.randn(1, 1, 16, generator=g)
    full = torch.randn(2, 10, 16, generator=g)
    embeddings = torch.zeros(2, 10, 16)  # index 0 is skipped
    assert loss([embeddings, rank_one]).item() == pytest.approx(0.0, abs=1e-4)
    assert loss([embeddings, full]).item() > 1.0
    assert loss([embeddings, full * 100]).item() == pytest.approx(loss([embeddings, full]).item(), rel=1e-4)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    garbage = full.clone()
    garbage[0, :3] = 1000.0
    assert loss([embeddings, garbage], mask).item() == pytest.approx(loss([embeddings, full], mask).item(), rel=1e-5)
    with pytest.raises(ValueError, match="attention_mask"):
        loss([embeddings, full], mask[:, :5])


def test_linear_inputs_are_what_each_linear_multiplies_once_per_shared_input():
    model = make_tiny_model("llama", layers=2)
    block = model.model.layers[0]
    seen = {}
    hooks = [getattr(block.self_attn, name).register_forward_pre_hook(
        lambda module, args, name=name: seen.setdefault(name, args[0])) for name in ("q_proj", "k_proj", "o_proj")]
    hooks += [getattr(block.mlp, name).register_forward_pre_hook(
        lambda module, args, name=name: seen.setdefault(name, args[0]))
        for name in ("gate_proj", "down_proj")]
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, features = spectral_features(model, {"input_ids": ids}, "linear_inputs")
    for hook in hooks:
        hook.remove()
    # q/k/v share the normed stream and gate/up theirs: 4 matrices per block, in call order
    assert len(features) == 4 * 2
    assert seen["q_proj"] is seen["k_proj"]
    for index, name in enumerate(("q_proj", "o_proj", "gate_proj", "down_proj")):
        assert features[index] is seen[name]
    assert features[3].shape == (2, 12, 128)  # down_proj's input is the intermediate size
    with capture_linear_inputs(model):
        pass
    assert all(not lin._forward_pre_hooks for _, lin in named_linears(model))  # hooks removed on exit
    # with linear inputs no index is skipped: a rank-one first matrix counts
    rank_one = torch.randn(2, 10, 1) * torch.randn(1, 1, 16)
    full = torch.randn(2, 10, 16)
    assert SpectralNormLoss(features="linear_inputs").per_layer([rank_one, full]).shape == (2,)
    assert SpectralNormLoss(features="hidden_states").per_layer([rank_one, full]).shape == (1,)
    with pytest.raises(ValueError, match="features"):
        SpectralNormLoss(features="attention")


@pytest.mark.parametrize("features", ["hidden_states", "linear_inputs"])
def test_trainer_with_the_term_lowers_feature_rank(tmp_path, features):
    from transformers import TrainingArguments

    data = TokenDataset(seq_len=16)
    probe = torch.stack([data[i]["input_ids"] for i in range(8)])
    measure = SpectralNormLoss(iterations=30, features=features)

    def stable_rank(model):
        with torch.no_grad():
            return measure(spectral_features(model, {"input_ids": probe}, features)[1]).item()

    measured = {}
    for lam in (0.0, 1.0, -1.0):  # the same run (same seed, data, order): CE only, lowering, raising
        model = make_tiny_model("llama")
        before = stable_rank(model)
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
                                 learning_rate=3e-3, report_to=[], save_strategy="no", use_cpu=True,
                                 disable_tqdm=True, seed=0)
        trainer = SpectralNormTrainer(model=model, args=args, train_dataset=data, spectral_lambda=lam,
                                      spectral_loss=SpectralNormLoss(features=features))
        trainer.train()
        assert set(trainer.last_loss_parts) == {"ce", "spectral"}
        measured[lam] = stable_rank(model)
    assert measured[1.0] < before
    assert measured[1.0] < measured[0.0] - 0.1
    assert measured[-1.0] > measured[0.0] + 0.3  # a negative weight raises the rank
    with pytest.raises(ValueError, match="finite"):
        SpectralNormTrainer(model=model, args=args, train_dataset=data, spectral_lambda=float("nan"))


# ----------------------------------------------------------------------------- benchmarks/recovery.py --induce

def test_recovery_script_induce_caches_norms_and_leaves_wanda_unchanged(tiny_run, tmp_path):
    cache = str(tmp_path / "cache")
    plain = tiny_run("--method", "none", "--pruner", "wanda", "--sparsity", "0.5", "--cache-dir", cache)
    induced = tiny_run("--method", "none", "--pruner", "wanda", "--sparsity", "0.5", "--cache-dir", cache, "--induce")
    for measured in (tmp_path / "cache").glob("before-*.json"):
        measured.unlink()  # so the third run measures its ppl on the weights the cache restores
    cached = tiny_run("--method", "none", "--pruner", "wanda", "--sparsity", "0.5", "--cache-dir", cache, "--induce")
    assert cached["before_from_cache"] is False
    assert sorted(p.name for p in (tmp_path / "cache").glob("pruned-*")) == [
        "pruned-smollm2-wanda-0.5-2-16-0-induce1.safetensors", "pruned-smollm2-wanda-0.5-2-16-0.safetensors"]
    assert induced["induce"] == 1.0 and plain["induce"] is None
    assert cached["ppl_pruned"] == induced["ppl_pruned"]  # the cache restored the folded norms too
    assert induced["ppl_pruned"] == pytest.approx(plain["ppl_pruned"], rel=1e-4)  # Wanda: same masks
    with pytest.raises(SystemExit):
        tiny_run("--method", "spt", "--induce")  # SPT restores dense linears after pruning: refused


@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["70%", "2:4"])
def test_sparsegpt_prunes_down_scaled_rows_hardest(nm):
    """The vo/down folds divide a producer's rows by the scales of the channels they feed. Unstructured
    SparseGPT compares saliencies across rows, so rows divided by large scales (feeding active channels)
    lose most; N:M keeps N of every M in every row whatever the row scale."""
    g = torch.Generator().manual_seed(0)
    rows, cols = 64, 128
    weight = torch.randn(rows, cols, generator=g)
    stat = HessianStat(cols)
    stat.add(torch.randn(2048, cols, generator=g))
    row_scale = torch.linspace(-2, 2, rows).exp()  # s_i of the channel row i feeds
    n_zeros = None if nm else round(0.7 * rows * cols)
    keep_plain, _ = sparsegpt_prune(weight, stat, n_zeros, nm)
    keep_folded, _ = sparsegpt_prune(weight / row_scale[:, None], stat, n_zeros, nm)
    active = row_scale >= row_scale.quantile(0.9)
    sparsity_plain = float((~keep_plain[active]).float().mean())
    sparsity_folded = float((~keep_folded[active]).float().mean())
    if nm:
        assert sparsity_plain == sparsity_folded == 0.5
        assert torch.equal(keep_plain, keep_folded)  # the row scale multiplies every saliency of the row
    else:
        assert sparsity_plain < 0.8 and sparsity_folded > 0.99


def test_unstructured_sparsegpt_induces_with_column_folds_and_warns_for_row_folds(monkeypatch):
    import sparse_peft.sparsity.induction as induction

    calibration, folds = _calibration(), []
    real = induction.induce_sparsity
    monkeypatch.setattr(induction, "induce_sparsity",
                        lambda model, calib, **options: folds.append(options.get("pairs")) or real(model, calib, **options))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        prune(_model("llama"), "sparsegpt", sparsity=0.5, calibration=calibration, induce=True, show_progress=False)
        prune(_model("llama"), "sparsegpt", pattern="2:4", calibration=calibration, induce=True, show_progress=False)
        prune(_model("llama"), "wanda", sparsity=0.5, calibration=calibration, induce=True, show_progress=False)
    assert folds == [("qkv", "gate_up"), None, None]  # None: induce_sparsity's default, all four
    with pytest.warns(RuntimeWarning, match="rows feeding the most active channels"):
        prune(_model("llama"), "sparsegpt", sparsity=0.5, calibration=calibration,
              induce={"pairs": ("qkv", "down")}, show_progress=False)
    assert folds[-1] == ("qkv", "down")  # what the user named is what runs
