"""Masked LoRA through the ordinary peft calls, keeping every pruned zero.

What every method promises (training then merge, save/load, refusal of another mask, unmerge,
disable, bf16, a dense base) is checked on every architecture in tests/test_contract.py; this
file tests what is special to masked LoRA.
"""

import pytest
import torch
from conftest import (
    IDS,
    assert_masks_equal,
    logits,
    rel_err,
    linear_masks,
    pruned_tiny_model,
    train_steps,
)
from peft import AutoPeftModelForCausalLM, get_peft_model

import sparse_peft as sp


def test_update_is_exactly_zero_at_pruned_positions():
    peft_model = get_peft_model(pruned_tiny_model("llama", 0.7), sp.MaskedLoraConfig(r=4, init_lora_weights=False))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    delta = layer.get_delta_weight("default")
    assert (delta[~layer.sparsity_mask] == 0).all()
    assert (delta[layer.sparsity_mask] != 0).float().mean() > 0.99
    # and the gradient of the (dense) factors only sees kept positions: pruned ones carry no signal
    B = layer.masked_lora_B["default"]
    peft_model(input_ids=IDS).logits.sum().backward()
    assert B.grad is not None and B.grad.abs().sum() > 0


def test_automodel_and_transformers_load_adapter(tmp_path):
    base = pruned_tiny_model("llama", 0.5)
    base.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(pruned_tiny_model("llama", 0.5), sp.MaskedLoraConfig(r=4))
    peft_model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    train_steps(peft_model, steps=2)
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")

    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert torch.allclose(logits(auto), expected, atol=1e-5)

    plain = pruned_tiny_model("llama", 0.5)
    plain.load_adapter(str(tmp_path / "adapter"))
    assert torch.allclose(logits(plain), expected, atol=1e-5)


def test_target_modules_that_match_nothing_name_the_value():
    with pytest.raises(ValueError, match="no_such_proj"):
        get_peft_model(pruned_tiny_model("llama", 0.5), sp.MaskedLoraConfig(target_modules=["no_such_proj"]))


def test_merge_unmerge_disable_and_several_adapters():
    model = pruned_tiny_model("mistral", 0.5)
    masks = linear_masks(model)
    weights = {n: m.weight.detach().clone() for n, m in sp.sparsity.named_linears(model)}
    base_logits = logits(model)
    peft_model = get_peft_model(model, sp.MaskedLoraConfig(r=4, init_lora_weights=False))
    peft_model.add_adapter("second", sp.MaskedLoraConfig(r=2, init_lora_weights=False))
    first = logits(peft_model)
    peft_model.set_adapter("second")
    second = logits(peft_model)
    assert rel_err(first, second) > 1e-3
    with peft_model.disable_adapter():
        assert torch.allclose(logits(peft_model), base_logits, atol=1e-6)
    peft_model.set_adapter("default")
    peft_model.merge_adapter()
    assert rel_err(logits(peft_model), first) < 1e-4
    peft_model.unmerge_adapter()
    for name, mod in sp.sparsity.named_linears(peft_model.base_model.model):
        key = name.replace(".base_layer", "")
        if key in weights:
            assert torch.allclose(mod.weight, weights[key], atol=1e-6), name
            assert torch.equal(mod.weight != 0, masks[key]), name
    merged = peft_model.merge_and_unload(adapter_names=["default", "second"])
    assert_masks_equal(merged, masks)


@pytest.mark.parametrize("dtype", [torch.float16])  # bf16: tests/test_contract.py
def test_low_precision_base_keeps_mask(dtype):
    model = pruned_tiny_model("llama", 0.5).to(dtype)
    masks = linear_masks(model)
    peft_model = get_peft_model(model, sp.MaskedLoraConfig(r=4, init_lora_weights=False))
    out = peft_model(input_ids=IDS).logits
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    merged = peft_model.merge_and_unload()
    assert_masks_equal(merged, masks)
    assert all(m.weight.dtype == dtype for _, m in sp.sparsity.named_linears(merged))


def test_fused_forward_matches_the_two_branch_forward(monkeypatch):
    """One GEMM with W + ΔW per block of rows (the fast path) gives the two-branch forward's outputs
    and gradients."""
    import sparse_peft.tuners.masked_lora.layer as layer_module

    def run(fused: bool):
        torch.manual_seed(0)
        peft_model = get_peft_model(pruned_tiny_model("llama", 0.7),
                                    sp.MaskedLoraConfig(r=4, init_lora_weights=False))
        calls = []
        real = layer_module.fuses_base
        monkeypatch.setattr(layer_module, "fuses_base", lambda *a: calls.append(real(*a) and fused) or calls[-1])
        out = peft_model(input_ids=IDS).logits
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        monkeypatch.undo()
        assert calls and all(call == fused for call in calls)
        return out.detach(), grads

    out_fused, grads_fused = run(True)
    out_plain, grads_plain = run(False)
    assert rel_err(out_fused, out_plain) < 1e-5
    assert grads_fused.keys() == grads_plain.keys() and len(grads_fused) > 0
    for name in grads_fused:
        assert rel_err(grads_fused[name], grads_plain[name]) < 1e-4, name


def test_fused_forward_is_skipped_where_it_would_change_the_result():
    from sparse_peft.tuners._shared import fuses_base

    peft_model = get_peft_model(pruned_tiny_model("llama", 0.5), sp.MaskedLoraConfig(r=4, lora_dropout=0.1))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.zeros(1, layer.in_features)
    assert not fuses_base(layer, ["default"], layer.masked_lora_dropout, x)  # dropout acts on the adapter's input only
    plain = get_peft_model(pruned_tiny_model("llama", 0.5), sp.MaskedLoraConfig(r=4))
    layer = plain.base_model.model.model.layers[0].self_attn.q_proj
    assert fuses_base(layer, ["default"], layer.masked_lora_dropout, x)
    assert not fuses_base(layer, ["default"], layer.masked_lora_dropout, x.half())  # base in another dtype
    handle = layer.base_layer.register_forward_hook(lambda *a: None)
    assert not fuses_base(layer, ["default"], layer.masked_lora_dropout, x)  # a hook on the base must still see its call
    handle.remove()
