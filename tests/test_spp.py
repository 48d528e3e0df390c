"""SPP (Sparsity-Preserved PEFT) through the ordinary peft calls, keeping every pruned zero.

What every method promises (training then merge, save/load, refusal of another mask, unmerge,
disable, bf16, a dense base) is checked on every architecture in tests/test_contract.py; this
file tests what is special to SPP.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    IDS,
    assert_masks_equal,
    linear_masks,
    logits,
    make_tiny_model,
    pruned_tiny_model,
    rel_err,
    train_steps,
)
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import sparse_peft as sp
from sparse_peft.ops import spp_delta_reference
from sparse_peft.tuners.spp import SPPLayer, spp_delta_weight
from sparse_peft.tuners.spp.functional import expand_rows, row_groups


def spp_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, SPPLayer)}


def base_weights(model):
    return {n: m.weight.detach().clone() for n, m in sp.sparsity.named_linears(model)}


def pruned_sparse_tensor(shape, sparsity=0.5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g, dtype=dtype)
    return weight * (torch.rand(shape, generator=g) >= sparsity).to(dtype)


# --- the model through peft -------------------------------------------------------------------------


def test_n_m_pattern_survives_training_and_merge():
    model = make_tiny_model("qwen2")
    sp.prune(model, method="magnitude", pattern="2:4", show_progress=False)
    masks = linear_masks(model)
    peft_model = get_peft_model(model, sp.SPPConfig(r=8))
    train_steps(peft_model, steps=2, lr=5e-2)
    merged = peft_model.merge_and_unload()
    assert_masks_equal(merged, masks)
    assert all(sp.is_nm_sparse(m.weight, 2, 4) for _, m in sp.sparsity.named_linears(merged))


def test_unmerge_is_exact_where_the_merge_factor_is_zero():
    model = pruned_tiny_model("llama", 0.5)
    weights = base_weights(model)
    peft_model = get_peft_model(model, sp.SPPConfig(r=4, alpha=2.0, init_A="ones"))
    layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.spp_b["default"][3] = -0.5  # factor 1 + 2 * 1 * (-0.5) = 0: row 3 is wiped by the merge
        layer.spp_b["default"][5] = 0.25
    peft_model.merge_adapter()
    merged_weight = layer.get_base_layer().weight
    mask = layer.sparsity_mask
    assert torch.equal(merged_weight != 0, mask)  # a wiped kept weight still counts as kept (tiny, not 0)
    assert merged_weight[3][mask[3]].abs().max() < 1e-30
    assert torch.allclose(merged_weight[5], weights["model.layers.0.mlp.down_proj"][5] * 1.5)
    peft_model.unmerge_adapter()
    restored = layer.get_base_layer().weight
    assert torch.equal(restored[3], weights["model.layers.0.mlp.down_proj"][3])  # from the backup, bit for bit
    assert torch.allclose(restored, weights["model.layers.0.mlp.down_proj"], rtol=1e-6, atol=0)


def test_two_adapters_set_adapter_and_merging_both():
    model = pruned_tiny_model("mistral", 0.5)
    masks, base_logits = linear_masks(model), logits(model)
    peft_model = get_peft_model(model, sp.SPPConfig(r=4, init_b_zero=False))
    peft_model.add_adapter("second", sp.SPPConfig(r=2, init_A="normal", init_b_zero=False))
    first = logits(peft_model)
    peft_model.set_adapter("second")
    second = logits(peft_model)
    assert rel_err(first, second) > 1e-3 and rel_err(second, base_logits) > 1e-3
    for name, p in peft_model.named_parameters():
        assert p.requires_grad == (".second" in name), name
    peft_model.base_model.set_adapter(["default", "second"])
    both = logits(peft_model)
    # merging one adapter, then the other, gives W ⊙ (1 + Δ1 + Δ2): what the unmerged forward computes
    peft_model.merge_adapter(["default"])
    with pytest.warns(UserWarning, match="additionally merging second"):  # peft's notice
        peft_model.merge_adapter(["second"])
    assert rel_err(logits(peft_model), both) < 1e-4
    with pytest.warns(UserWarning, match="already merged"):
        merged = peft_model.merge_and_unload()
    assert_masks_equal(merged, masks)
    assert rel_err(logits(merged), both) < 1e-4


def test_delete_adapter_and_generic_sparse_merge():
    model = pruned_tiny_model("opt", 0.5)
    masks = linear_masks(model)
    peft_model = get_peft_model(model, sp.SPPConfig(r=4, init_b_zero=False))
    first = logits(peft_model)
    peft_model.add_adapter("second", sp.SPPConfig(r=2, init_b_zero=False))
    peft_model.delete_adapter("second")
    assert all("second" not in n for n, _ in peft_model.named_parameters())
    assert torch.equal(logits(peft_model), first)
    merged, report = sp.merge_and_unload_sparse(peft_model)
    assert_masks_equal(merged, masks)
    assert max(report.removed_fraction.values()) == 0.0  # nothing outside the mask to cut
    assert rel_err(logits(merged), first) < 1e-4


def test_save_load_identical_logits_and_refuse_other_mask_or_shape(tmp_path):
    peft_model = get_peft_model(pruned_tiny_model("qwen2", 0.5), sp.SPPConfig(r=4))
    train_steps(peft_model, steps=2, lr=5e-2)
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin"))
    saved = load_file(tmp_path / "adapter_model.safetensors")
    q_key = "base_model.model.model.layers.0.self_attn.q_proj"
    assert saved[f"{q_key}.spp_A"].shape == (4, 64) and saved[f"{q_key}.spp_b"].shape == (64, 1)
    assert saved[f"{q_key}.spp_fingerprint"].dtype == torch.int64
    assert all(k.split(".")[-1] in ("spp_A", "spp_b", "spp_fingerprint") for k in saved)

    loaded = PeftModel.from_pretrained(pruned_tiny_model("qwen2", 0.5), tmp_path)
    assert torch.equal(logits(loaded), expected)
    plain = pruned_tiny_model("qwen2", 0.5)  # transformers' own adapter loading goes through peft too
    plain.load_adapter(str(tmp_path))
    assert torch.allclose(logits(plain), expected, atol=1e-6)

    layer = r"model\.layers\.0\.self_attn\.q_proj"
    with pytest.raises(ValueError, match=rf"does not fit this base model at layer '{layer}'"):
        PeftModel.from_pretrained(pruned_tiny_model("qwen2", 0.7), tmp_path)  # same shapes, other mask
    with pytest.raises(ValueError, match=rf"at layer '{layer}'"):
        PeftModel.from_pretrained(pruned_tiny_model("qwen2", 0.5, hidden=32), tmp_path)  # other shapes


def test_out_features_not_divisible_by_r_and_r_above_out_features():
    assert row_groups(7, 3).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert row_groups(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # divisible: out/r consecutive rows each
    A = torch.arange(6.0).reshape(3, 2)
    assert expand_rows(A, 7)[:, 0].tolist() == [0, 0, 0, 2, 2, 4, 4]

    model = pruned_tiny_model("llama", 0.5)  # out_features 32 (k/v), 64, 128: none divisible by 24
    masks = linear_masks(model)
    with pytest.warns(UserWarning, match=r"r=40 .*model\.layers\.0\.self_attn\.k_proj \(out_features=32\)"):
        peft_model = get_peft_model(model, sp.SPPConfig(r=40))
    k_proj = peft_model.base_model.model.model.layers[0].self_attn.k_proj
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert k_proj.spp_A["default"].shape == (32, 64) and k_proj.r["default"] == 32  # one row of A per row
    assert q_proj.spp_A["default"].shape == (40, 64)  # 64 rows in 40 groups of 1 or 2
    A_before = q_proj.spp_A["default"].detach().clone()
    train_steps(peft_model, steps=2, lr=5e-2)
    trained = logits(peft_model)
    assert (q_proj.spp_A["default"] != A_before).any(dim=1).all()  # every row of A is read, so trained
    merged = peft_model.merge_and_unload()
    assert_masks_equal(merged, masks)
    assert rel_err(logits(merged), trained) < 1e-4


@pytest.mark.parametrize("kwargs, field", [
    (dict(r=0), "r"), (dict(r=2.5), "r"), (dict(dropout=1.0), "dropout"), (dict(init_A="zeros"), "init_A"),
    (dict(alpha=float("nan")), "alpha"), (dict(unmerge_backup_below=-1), "unmerge_backup_below"),
    (dict(target_modules=[]), "target_modules"),
])
def test_config_errors_name_the_field_and_value(kwargs, field):
    with pytest.raises(ValueError, match=rf"SPPConfig\.{field}"):
        sp.SPPConfig(**kwargs)


def test_config_roundtrips_through_peft(tmp_path):
    from peft import PeftConfig

    config = sp.SPPConfig(r=8, alpha=0.5, init_A="normal", target_modules=["q_proj", "v_proj"])
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, sp.SPPConfig)
    assert (loaded.r, loaded.alpha, loaded.init_A, loaded.target_modules) == (8, 0.5, "normal", {"q_proj", "v_proj"})


# --- the delta Function --------------------------------------------------------------------------------


def test_delta_function_gradcheck_float64():
    # out = 7 rows in r = 3 groups (not divisible), leading batch dims, a pruned weight
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = pruned_sparse_tensor((7, 5))  # frozen: SPP never trains the base weight
    A = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, A_, b_: spp_delta_reference(x_, weight, A_, b_, 0.7), (x, A, b))
    # and with only the adapter trainable (the usual case: the Function skips dX)
    assert torch.autograd.gradcheck(lambda A_, b_: spp_delta_reference(x.detach(), weight.detach(), A_, b_, 1.3),
                                    (A, b))


def test_delta_function_grads_equal_autograd_through_explicit_delta_weight():
    torch.manual_seed(0)
    weight = pruned_sparse_tensor((48, 40), 0.6, dtype=torch.float32)
    x = torch.randn(4, 6, 40)
    grad_out = torch.randn(4, 6, 48)
    A = torch.randn(5, 40, requires_grad=True)  # 48 rows in 5 groups
    b = torch.randn(48, 1, requires_grad=True)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)

    out = spp_delta_reference(x1, weight, A, b, 0.5)
    out.backward(grad_out)
    grads = (x1.grad, A.grad.clone(), b.grad.clone())
    A.grad, b.grad = None, None
    explicit = 0.5 * F.linear(x2, expand_rows(A, 48) * b * weight)
    explicit.backward(grad_out)
    assert torch.allclose(out, explicit, atol=1e-5)
    for got, want in zip(grads, (x2.grad, A.grad, b.grad)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    delta = spp_delta_weight(weight, A, b, 0.5)
    assert (delta[weight == 0] == 0).all()  # zero wherever W is


def test_delta_function_saves_no_out_by_in_tensor():
    peft_model = get_peft_model(pruned_tiny_model("llama", 0.5), sp.SPPConfig(r=4, init_b_zero=False))
    layer = peft_model.base_model.model.model.layers[0].mlp.up_proj
    weight = layer.get_base_layer().weight
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(3, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # what the forward saves
        y = layer(x)
    y.sum().backward()
    big = [t for t in saved if t.numel() >= weight.numel()]
    # the only out x in tensor kept for the backward is the frozen base weight itself, not a copy
    assert big and all(t.data_ptr() == weight.data_ptr() for t in big)
    assert layer.spp_A["default"].grad.abs().sum() > 0 and layer.spp_b["default"].grad.abs().sum() > 0


# --- dtypes, checkpointing, Trainer ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_forward_backward_merge_keep_mask(dtype):
    model = pruned_tiny_model("llama", 0.5).to(dtype)
    masks, weights = linear_masks(model), base_weights(model)
    peft_model = get_peft_model(model, sp.SPPConfig(r=4, init_b_zero=False))
    layers = spp_layers(peft_model.base_model.model)
    assert all(l.spp_A["default"].dtype == torch.float32 for l in layers.values())  # adapter stays fp32
    peft_model.train()
    out = peft_model(input_ids=IDS, labels=IDS)
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    out.loss.backward()
    for layer in layers.values():
        for p in (layer.spp_A["default"], layer.spp_b["default"]):
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    peft_model.eval()
    unmerged = logits(peft_model)
    peft_model.merge_adapter()
    assert rel_err(logits(peft_model), unmerged) < 0.05  # one rounding of W in the low-precision dtype
    peft_model.unmerge_adapter()
    tol = torch.finfo(dtype).eps * 2
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        assert weight.dtype == dtype and torch.equal(weight != 0, masks[name]), name
        assert torch.allclose(weight.float(), weights[name].float(), rtol=tol, atol=0), name
    merged = peft_model.merge_and_unload()
    assert_masks_equal(merged, masks)
    assert all(m.weight.dtype == dtype for _, m in sp.sparsity.named_linears(merged))


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_grads(use_reentrant):
    def grads(checkpointing):
        model = pruned_tiny_model("llama", 0.5)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        peft_model = get_peft_model(model, sp.SPPConfig(r=4, init_b_zero=False, dropout=0.0))
        peft_model.train()
        peft_model(input_ids=IDS, labels=IDS).loss.backward()
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 28
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=1e-5, atol=1e-7), name


def test_trainer_runs_and_the_mask_survives(tmp_path):
    from transformers import Trainer, TrainingArguments

    class RandomTokens(torch.utils.data.Dataset):
        def __init__(self, n=16, seq_len=12):
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(0, 128, (n, seq_len), generator=g)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    model = pruned_tiny_model("gpt_neox", 0.5)
    masks = linear_masks(model)
    peft_model = get_peft_model(model, sp.SPPConfig(r=4, dropout=0.1))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=4e-3, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=peft_model, args=args, train_dataset=RandomTokens()).train()
    moved = [n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(".spp_b." in n for n in moved) and any(".spp_A." in n for n in moved)
    merged = peft_model.merge_and_unload()
    assert_masks_equal(merged, masks)

