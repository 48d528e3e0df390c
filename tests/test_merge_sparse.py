"""sp.merge_and_unload_sparse: any peft adapter merges without densifying."""

import pytest
import torch
from conftest import assert_masks_equal, linear_masks, pruned_tiny_model, train_steps
from peft import AdaLoraConfig, IA3Config, LoraConfig, get_peft_model

import sparse_peft as sp
from sparse_peft.sparsity.masks import restore_mask


def test_plain_lora_densifies_and_sparse_merge_does_not():
    model = pruned_tiny_model("llama", 0.5)
    masks = linear_masks(model)
    cfg = dict(r=4, target_modules="all-linear", init_lora_weights=False)
    dense_merged = get_peft_model(pruned_tiny_model("llama", 0.5), LoraConfig(**cfg)).merge_and_unload()
    assert sp.sparsity_report(dense_merged).global_sparsity < 0.01  # the problem this project solves

    merged, report = sp.merge_and_unload_sparse(get_peft_model(model, LoraConfig(**cfg)))
    assert_masks_equal(merged, masks)
    assert set(report.removed_fraction) == set(masks)
    # a random dense update on a 50%-sparse layer: about half its squared norm sits on pruned positions
    for name, frac in report.removed_fraction.items():
        assert 0.5 < frac < 0.9, (name, frac)
    assert "removed by mask" in report.to_markdown()


@pytest.mark.parametrize("make_config", [
    lambda: IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"],
                      init_ia3_weights=False),
    lambda: AdaLoraConfig(target_modules=["q_proj", "v_proj"], total_step=10, init_r=4, init_lora_weights=False),
    lambda: sp.MaskedLoraConfig(r=4, init_lora_weights=False),
])
def test_other_adapters(make_config):
    model = pruned_tiny_model("llama", 0.7)
    masks = linear_masks(model)
    peft_model = get_peft_model(model, make_config())
    train_steps(peft_model, steps=1)
    merged, report = sp.merge_and_unload_sparse(peft_model)
    assert_masks_equal(merged, masks)
    if isinstance(make_config(), (IA3Config, sp.MaskedLoraConfig)):
        # these updates already respect the mask: nothing is cut
        assert max(report.removed_fraction.values()) < 1e-6


def test_merge_sparse_needs_a_peft_model():
    with pytest.raises(TypeError, match="needs a peft model"):
        sp.merge_and_unload_sparse(torch.nn.Linear(2, 2))


def test_restore_mask_keeps_support_exactly():
    mask = torch.tensor([[True, False, True, True]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = torch.tensor([[0.0, 3.0, -1.0, 2.0]], dtype=dtype)  # a kept weight landed on 0, a pruned one is 3
        out = restore_mask(w, mask)
        assert torch.equal(out != 0, mask)
        assert out[0, 1] == 0 and out[0, 2] == -1 and out[0, 3] == 2
        assert out[0, 0].item() == torch.finfo(dtype).tiny  # the smallest normal number
        assert restore_mask(-w, mask)[0, 0].item() == -torch.finfo(dtype).tiny  # sign of the zero
