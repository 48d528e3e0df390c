"""Training at LoRA's cost, checked without timing: what autograd saves, what a layer keeps, gradients
against plain dense autograd, and the adapters' dtype."""

import pytest
import torch
import torch.nn.functional as F
from conftest import IDS, pruned_tiny_model, rel_err
from peft import get_peft_model

import sparse_peft as sp
import sparse_peft.delta_linear as delta_linear_module
from sparse_peft.delta_linear import MaskedLowRankUpdate, RowScaleUpdate, delta_linear
from sparse_peft.tuners.spp.functional import expand_rows
from sparse_peft.sparsity.masks import restore_mask

CONFIGS = {
    "masked_lora": lambda: sp.MaskedLoraConfig(r=4, init_lora_weights=False),
    "masked_lora_dropout": lambda: sp.MaskedLoraConfig(r=4, lora_dropout=0.1, init_lora_weights=False),
    "spp": lambda: sp.SPPConfig(r=4, init_b_zero=False),
    "seft": lambda: sp.SEFTConfig(density=0.05),
    "spt": lambda: sp.SPTConfig(base_prompt_length=4, target_sparsity=0.5, initial_sparsity=0.5, pruner="magnitude",
                                prune_end_step=10, num_prune_steps=2),
}


def sparse_weight(shape, sparsity=0.5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(*shape, generator=g, dtype=dtype)
    return restore_mask(weight, torch.rand(*shape, generator=g) >= sparsity)


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("update", ["masked_low_rank", "row_scale"])
def test_delta_linear_gradcheck_over_several_row_blocks(update, with_base):
    """fp64 gradients through 2-row blocks equal the numerical ones, and the output equals the dense
    formula (7 output rows, 3 rows of A for SPP: groups that do not divide evenly)."""
    weight = sparse_weight((7, 5))
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    if update == "masked_low_rank":
        second = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)  # B
        make = lambda A_, B_: MaskedLowRankUpdate(A_, B_, 0.7)  # noqa: E731
        dense = lambda A_, B_: (B_ @ A_) * 0.7 * (weight != 0)  # noqa: E731
    else:
        second = torch.randn(7, 1, dtype=torch.float64, requires_grad=True)  # b
        make = lambda A_, b_: RowScaleUpdate(A_, b_, 0.7)  # noqa: E731
        dense = lambda A_, b_: 0.7 * expand_rows(A_, 7) * b_ * weight  # noqa: E731

    def fn(x, bias, A, second):
        return delta_linear(x, weight, bias, make(A, second), with_base=with_base, block_elements=10)

    assert torch.autograd.gradcheck(fn, (x, bias, A, second))
    expected = F.linear(x, (weight if with_base else 0) + dense(A, second), bias if with_base else None)
    assert torch.allclose(fn(x, bias, A, second), expected)


def test_delta_linear_refuses_a_trainable_base_weight():
    weight = sparse_weight((4, 3)).requires_grad_(True)
    update = MaskedLowRankUpdate(torch.randn(2, 3, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="frozen"):
        delta_linear(torch.randn(2, 3, dtype=torch.float64), weight, None, update)


def layer_weights(peft_model):
    """Every base linear weight under a tuner layer (the tensors a layer may hold a reference to)."""
    return [m.weight for _, m in sp.sparsity.named_linears(peft_model.get_base_model())]


@pytest.mark.parametrize("method", list(CONFIGS))
def test_no_out_by_in_tensor_is_saved_for_the_backward(method, monkeypatch):
    """Whatever the forward saves for the backward is activation-sized or a reference to an existing
    weight, never a new tensor as large as a weight matrix (a mask, W + ΔW, ΔW, an fp32 copy)."""
    monkeypatch.setattr(delta_linear_module, "BLOCK_ELEMENTS", 256)  # several row blocks per layer
    peft_model = get_peft_model(pruned_tiny_model("llama", 0.5), CONFIGS[method]())
    peft_model.train()
    if method == "seft":  # the window before a topology update: the dense gradient is accumulated too
        for module in peft_model.modules():
            if hasattr(module, "start_collecting"):
                module.start_collecting()
    weights = layer_weights(peft_model)
    smallest = min(w.numel() for w in weights)
    storages = {w.untyped_storage().data_ptr() for w in peft_model.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        # 4 tokens: every activation (4 x 128 at most) is smaller than the smallest weight (32 x 64)
        loss = peft_model(input_ids=IDS[:1, :4], labels=IDS[:1, :4]).loss
    loss.backward()
    new_big = [tuple(t.shape) for t in saved
               if t.numel() >= smallest and t.untyped_storage().data_ptr() not in storages]
    assert not new_big, f"{method} saved weight-sized tensors for the backward: {new_big}"
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)


@pytest.mark.parametrize("method", ["masked_lora", "spp", "seft"])
def test_layers_keep_no_byte_per_weight(method):
    """No buffer or parameter of a tuner layer (besides the wrapped base) has a weight's size."""
    peft_model = get_peft_model(pruned_tiny_model("llama", 0.5), CONFIGS[method]())
    layers = [m for m in peft_model.modules() if hasattr(m, "sparsity_mask")]
    assert layers
    for layer in layers:
        base = layer.get_base_layer()
        own = [(n, t) for n, t in list(layer.named_buffers()) + list(layer.named_parameters())
               if not n.startswith("base_layer.")]
        assert all(t.numel() < base.weight.numel() for _, t in own), [(n, tuple(t.shape)) for n, t in own]
        assert torch.equal(layer.sparsity_mask, base.weight != 0)  # derived from the weight


def test_masked_lora_gradients_equal_dense_autograd_over_row_blocks(monkeypatch):
    monkeypatch.setattr(delta_linear_module, "BLOCK_ELEMENTS", 100)
    model = pruned_tiny_model("llama", 0.6).double()
    peft_model = get_peft_model(model, sp.MaskedLoraConfig(r=3, init_lora_weights=False))
    layer = peft_model.base_model.model.model.layers[0].mlp.down_proj  # 64 x 128: 1 row a block
    x = torch.randn(2, 5, layer.in_features, dtype=torch.float64, requires_grad=True)
    A, B = layer.masked_lora_A["default"], layer.masked_lora_B["default"]
    assert torch.autograd.gradcheck(lambda x_, A_, B_: _masked_lora_forward(layer, x_, A_, B_), (x, A, B))
    weight = layer.get_base_layer().weight
    expected = F.linear(x, weight + layer.scaling["default"] * (B @ A) * (weight != 0))
    assert rel_err(layer(x), expected) < 1e-12


def _masked_lora_forward(layer, x, A, B):
    layer.masked_lora_A["default"], layer.masked_lora_B["default"] = A, B
    return layer(x)


def test_bf16_training_runs_and_keeps_every_zero():
    model = pruned_tiny_model("llama", 0.5).to(torch.bfloat16)
    masks = {n: m.weight != 0 for n, m in sp.sparsity.named_linears(model)}
    peft_model = get_peft_model(model, sp.MaskedLoraConfig(r=4))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = peft_model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    merged = peft_model.merge_and_unload()
    for name, module in sp.sparsity.named_linears(merged):
        assert module.weight.dtype == torch.bfloat16 and torch.equal(module.weight != 0, masks[name]), name


@pytest.mark.parametrize("method", ["masked_lora", "spp", "seft", "spt"])
@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_follows_autocast_adapter_dtype(method, autocast):
    """peft's convention: adapters on a bf16 base are upcast to fp32 unless autocast_adapter_dtype=False,
    which keeps them in the base dtype."""
    model = pruned_tiny_model("llama", 0.5).to(torch.bfloat16)
    peft_model = get_peft_model(model, CONFIGS[method](), autocast_adapter_dtype=autocast)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32 if autocast else torch.bfloat16}
    loss = peft_model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in trainable)
