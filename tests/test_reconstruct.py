"""sp.reconstruct: block-wise reconstruction of a pruned model from its dense original."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import sparse_peft as sp
from sparse_peft.sparsity import is_nm_sparse, named_linears

from conftest import assert_masks_equal, calibration_batches, linear_masks, make_tiny_model

CALIBRATION = calibration_batches(n=8, seq_len=32)
HELD_OUT = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(99))
SETTINGS = dict(epochs=5, lr=1e-3, batch_size=2, show_progress=False)


def pruned_pair(arch: str = "llama", pattern: str | None = None, dtype: torch.dtype = torch.float32):
    """``(dense, pruned)``: a tiny model and a copy pruned by Wanda (50% or ``pattern``)."""
    dense = make_tiny_model(arch).to(dtype)
    model = copy.deepcopy(dense)
    target = dict(pattern=pattern) if pattern else dict(sparsity=0.5)
    sp.prune(model, method="wanda", calibration=CALIBRATION, show_progress=False, **target)
    return dense, model


def held_out_kl(dense, model) -> float:
    """KL(dense ‖ model) of the next-token distributions on tokens reconstruction never saw."""
    with torch.no_grad():
        teacher = torch.log_softmax(dense(input_ids=HELD_OUT).logits.float(), dim=-1)
        student = torch.log_softmax(model(input_ids=HELD_OUT).logits.float(), dim=-1)
    return float((teacher.exp() * (teacher - student)).sum(dim=-1).mean())


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module", params=[None, "2:4"], ids=["unstructured-50", "2:4"])
def reconstructed(request):
    """One reconstruction per sparsity pattern, with what the tests compare it to."""
    dense, model = pruned_pair(pattern=request.param)
    dense_before, pruned_before = weights(dense), weights(model)
    masks = linear_masks(model)
    sparsity_before = sp.sparsity_report(model).to_dict()
    kl_before = held_out_kl(dense, model)
    model.train()  # reconstruction runs in eval mode and gives the model back in its own mode
    report = sp.reconstruct(model, dense, CALIBRATION, **SETTINGS)
    return dict(pattern=request.param, dense=dense, model=model, dense_before=dense_before,
                pruned_before=pruned_before, masks=masks, sparsity_before=sparsity_before, kl_before=kl_before,
                report=report)


def test_masks_and_every_layers_sparsity_are_kept_exactly(reconstructed):
    model = reconstructed["model"]
    assert_masks_equal(model, reconstructed["masks"])
    assert sp.sparsity_report(model).to_dict() == reconstructed["sparsity_before"]
    for name, linear in named_linears(model):
        pruned = ~reconstructed["masks"][name]
        assert not torch.signbit(linear.weight[pruned]).any(), f"{name}: a pruned weight is -0.0"
        if reconstructed["pattern"] == "2:4":
            assert is_nm_sparse(linear.weight, 2, 4), f"{name} lost its 2:4 pattern"


def test_kept_weights_train_and_nothing_else_moves(reconstructed):
    model, before = reconstructed["model"], reconstructed["pruned_before"]
    trained = {f"{name}.weight" for name, _ in named_linears(model) if ".layers." in name}
    for name, param in model.named_parameters():
        if name in trained:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"{name} is frozen but changed"
    dense = reconstructed["dense"]
    assert all(torch.equal(p, reconstructed["dense_before"][n]) for n, p in dense.named_parameters())
    assert model.training, "the model's training mode was not given back"
    assert all(p.requires_grad for p in model.parameters()), "requires_grad flags were not given back"


def test_the_error_of_every_block_goes_down(reconstructed):
    report = reconstructed["report"]
    assert [b.name for b in report.blocks] == ["model.layers.0", "model.layers.1"]
    for block in report.blocks:
        assert block.error_after < 0.5 * block.error_before, block
        assert not block.reverted and block.final_error == block.error_after
        assert block.steps == SETTINGS["epochs"] * math.ceil(len(CALIBRATION) / SETTINGS["batch_size"])
    assert json.loads(json.dumps(report.to_dict()))["blocks"][1]["name"] == "model.layers.1"
    assert len(report.to_markdown().splitlines()) == 2 + len(report.blocks)


def test_the_model_moves_closer_to_the_dense_model_on_held_out_tokens(reconstructed):
    assert held_out_kl(reconstructed["dense"], reconstructed["model"]) < 0.8 * reconstructed["kl_before"]


def test_bf16_blocks_reconstruct_and_keep_their_masks():
    dense, model = pruned_pair(dtype=torch.bfloat16)
    masks = linear_masks(model)
    kl_before = held_out_kl(dense, model)
    report = sp.reconstruct(model, dense, CALIBRATION, **SETTINGS)
    assert_masks_equal(model, masks)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(b.error_after < b.error_before and not b.reverted for b in report.blocks), report.blocks
    assert held_out_kl(dense, model) < kl_before


def test_gpt2_conv1d_layers_reconstruct_and_keep_their_masks():
    dense, model = pruned_pair("gpt2")
    masks = linear_masks(model)
    report = sp.reconstruct(model, dense, CALIBRATION, **SETTINGS)
    assert_masks_equal(model, masks)
    assert all(b.error_after < b.error_before for b in report.blocks), report.blocks


def test_padding_is_left_out_of_the_error():
    dense, model = pruned_pair()
    padded_model = copy.deepcopy(model)
    real = [batch[:, :24] for batch in CALIBRATION]
    padded = [{"input_ids": batch, "attention_mask": torch.cat([torch.ones(1, 24), torch.zeros(1, 8)], dim=1)}
              for batch in CALIBRATION]
    report = sp.reconstruct(model, dense, real, **SETTINGS)
    padded_report = sp.reconstruct(padded_model, dense, padded, **SETTINGS)
    for block, padded_block in zip(report.blocks, padded_report.blocks):
        assert padded_block.error_before == pytest.approx(block.error_before, rel=1e-4)
        assert padded_block.error_after == pytest.approx(block.error_after, rel=1e-2)


def test_a_block_left_dense_matches_already_and_is_not_reverted(recwarn):
    dense = make_tiny_model("llama")
    model = copy.deepcopy(dense)
    with torch.no_grad():  # only the second block is pruned: the first computes exactly the dense block
        model.model.layers[1].mlp.up_proj.weight[:, ::2] = 0.0
    before = weights(model)
    # One pruned up_proj leaves a small error: smaller steps than the other tests' reach below it.
    report = sp.reconstruct(model, dense, CALIBRATION, **dict(SETTINGS, lr=1e-4))
    first, second = report.blocks
    assert first.error_before == first.error_after == 0.0 and not first.reverted
    assert second.error_after < second.error_before and not second.reverted
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith("model.layers.0."))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_a_block_whose_error_goes_up_keeps_its_weights():
    dense, model = pruned_pair()
    before = weights(model)
    with pytest.warns(RuntimeWarning, match=r"raised the error of \['model\.layers\.0'.*lr=1\.0"):
        report = sp.reconstruct(model, dense, CALIBRATION, **dict(SETTINGS, lr=1.0))
    reverted = [b for b in report.blocks if b.reverted]
    assert reverted and all(b.error_after > b.error_before for b in reverted)
    for block in reverted:
        assert block.final_error == block.error_before
        for name, param in model.named_parameters():
            if name.startswith(block.name + "."):
                assert torch.equal(param, before[name]), f"{name} was not given back"


@pytest.mark.parametrize("option, value, message", [
    ("epochs", 0, r"epochs must be an integer >= 1, got 0"),
    ("epochs", 1.5, r"epochs must be an integer >= 1, got 1\.5"),
    ("epochs", True, r"epochs must be an integer >= 1, got True"),
    ("lr", 0.0, r"lr must be a number > 0, got 0\.0"),
    ("lr", -1e-3, r"lr must be a number > 0, got -0\.001"),
    ("lr", float("nan"), r"lr must be a number > 0, got nan"),
    ("batch_size", 0, r"batch_size must be an integer >= 1, got 0"),
    ("seed", -1, r"seed must be an integer >= 0, got -1"),
])
def test_bad_options_are_refused(option, value, message):
    dense, model = pruned_pair()
    with pytest.raises(ValueError, match=message):
        sp.reconstruct(model, dense, CALIBRATION, **dict(SETTINGS, **{option: value}))


@pytest.mark.parametrize("calibration, message", [([], "calibration data is empty"),
                                                  (None, "calibration data is required")])
def test_missing_calibration_is_refused(calibration, message):
    dense, model = pruned_pair()
    with pytest.raises(ValueError, match=message):
        sp.reconstruct(model, dense, calibration, **SETTINGS)


def test_a_model_without_pruned_weights_is_refused():
    dense, model = pruned_pair()
    with pytest.raises(ValueError, match=r"model has no pruned weight.*nothing to reconstruct.*swapped"):
        sp.reconstruct(copy.deepcopy(dense), dense, CALIBRATION, **SETTINGS)
    with pytest.raises(ValueError, match=r"model has no pruned weight"):
        sp.reconstruct(dense, model, CALIBRATION, **SETTINGS)  # the two models swapped


def test_a_teacher_that_is_the_pruned_model_is_refused():
    _, model = pruned_pair()
    before = weights(model)
    with pytest.raises(ValueError, match=r"dense_model is model itself"):
        sp.reconstruct(model, model, CALIBRATION, **SETTINGS)
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj' is pruned in model and "
                                         r"identical in dense_model"):
        sp.reconstruct(model, copy.deepcopy(model), CALIBRATION, **SETTINGS)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_models_of_another_architecture_are_refused():
    _, model = pruned_pair()
    with pytest.raises(ValueError, match=r"model is a LlamaForCausalLM, dense_model a Qwen2ForCausalLM"):
        sp.reconstruct(model, make_tiny_model("qwen2"), CALIBRATION, **SETTINGS)
    with pytest.raises(ValueError, match=r"model has 2 decoder blocks \('model\.layers'\), dense_model 3"):
        sp.reconstruct(model, make_tiny_model("llama", layers=3), CALIBRATION, **SETTINGS)
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj' has weight shape \(64, 64\) "
                                         r"in model but \(32, 32\) in dense_model"):
        sp.reconstruct(model, make_tiny_model("llama", hidden=32), CALIBRATION, **SETTINGS)


def test_a_peft_wrapped_model_is_refused():
    from peft import get_peft_model

    dense, model = pruned_pair()
    peft_model = get_peft_model(model, sp.MaskedLoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"model is peft-wrapped; reconstruct the base model before"):
        sp.reconstruct(peft_model, dense, CALIBRATION, **SETTINGS)


def test_a_quantized_model_is_refused():
    bnb = pytest.importorskip("bitsandbytes")
    dense, model = pruned_pair()
    linear = model.model.layers[1].mlp.down_proj
    quantized = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False)
    model.model.layers[1].mlp.down_proj = quantized
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.1\.mlp\.down_proj' of model is a bitsandbytes "
                                         r"Linear8bitLt"):
        sp.reconstruct(model, dense, CALIBRATION, **SETTINGS)
