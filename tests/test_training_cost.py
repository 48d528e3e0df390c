"""Training at LoRA's cost, checked without timing: what autograd saves, what a layer keeps, gradients
against plain dense autograd, the adapters' dtype, and the blocks' workspace (reused, not reallocated)."""

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


def test_row_blocks_are_four_mi_elements_on_a_cpu_and_sixteen_on_a_gpu(monkeypatch):
    """A 8192 x 2048 weight: four blocks of rows on a CPU (bounded transients in its caches), one on a
    GPU (where each block's launches cost more than its size); a block size given always wins."""
    from sparse_peft.delta_linear import row_blocks

    assert list(row_blocks(8192, 2048)) == [(0, 2048), (2048, 4096), (4096, 6144), (6144, 8192)]
    assert list(row_blocks(8192, 2048, device=torch.device("cpu"))) == list(row_blocks(8192, 2048))
    assert list(row_blocks(8192, 2048, device=torch.device("cuda"))) == [(0, 8192)]
    assert list(row_blocks(3, 2, block_elements=2, device=torch.device("cuda"))) == [(0, 1), (1, 2), (2, 3)]
    monkeypatch.setattr(delta_linear_module, "DEVICE_BLOCK_ELEMENTS", 2048 * 3000)  # read at call time
    assert list(row_blocks(8192, 2048, device=torch.device("cuda"))) == [(0, 3000), (3000, 6000), (6000, 8192)]


def test_the_mask_is_read_in_the_weights_dtype_and_written_in_the_activations():
    # 1e-8 is a kept fp32 weight that fp16 would round to 0: its position must stay in the mask
    weight = torch.tensor([[1e-8, 0.0, -2.0, 0.0], [0.0, 3.0, 0.0, -1e-30]])
    workspace = delta_linear_module.ReusedWorkspace()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        mask = delta_linear_module.kept(weight, dtype, workspace)
        assert mask.dtype == dtype
        assert mask.tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]
    # masked LoRA on that weight with fp16 activations updates the tiny weight's position
    A, B = torch.ones(2, 4, dtype=torch.float16), torch.ones(2, 2, dtype=torch.float16)
    block = MaskedLowRankUpdate(A, B, 0.5).weight_rows(0, 2, weight, torch.float16, with_base=False)
    assert block[0, 0] == 1.0 and block[0, 1] == 0.0 and block[1, 3] == 1.0


@pytest.mark.parametrize("dtype, amx", [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_grad_weight_rows_in_the_dtype_the_cpu_runs_fastest(dtype, amx, monkeypatch):
    """``grad_operands``: fp32 keeps the view of ``dyᵀ``; bf16 on a CPU with AMX copies ``dyᵀ`` to
    contiguous rows (a faster operand) and computes ``G`` in bf16; bf16 on a CPU without AMX up-casts
    both operands and computes ``G`` in fp32. Each block of ``G`` is the dense product's rows."""
    monkeypatch.setattr(delta_linear_module, "_cpu_has_matrix_units", lambda dtype: amx)
    g = torch.Generator().manual_seed(0)
    grad_2d, x_2d = torch.randn(6, 7, generator=g).to(dtype), torch.randn(6, 5, generator=g).to(dtype)
    grad_t, x_for_grad = delta_linear_module.grad_operands(grad_2d, x_2d)
    wanted = torch.bfloat16 if amx else torch.float32
    assert grad_t.shape == (7, 6) and grad_t.is_contiguous() == amx and x_for_grad.dtype == grad_t.dtype == wanted
    expected = grad_2d.double().t() @ x_2d.double()
    for start, stop in [(0, 3), (3, 7)]:
        rows = delta_linear_module.grad_weight_rows(grad_t, x_for_grad, start, stop)
        # fp32 from the same bf16 inputs carries no rounding of the product
        assert rows.dtype == wanted and rel_err(rows.double(), expected[start:stop]) < (1e-2 if amx else 1e-6)


@pytest.mark.parametrize("amx", [True, False])
def test_sampled_gradient_in_bf16_takes_the_path_the_cpu_runs_fastest(amx, monkeypatch):
    """SEFT's sampled ``dyᵀ x`` in bf16: with AMX, bf16 block GEMMs gathered (the bf16 product's values);
    without, the fp32 CSR product of the up-cast inputs (their exact fp32 values)."""
    monkeypatch.setattr(delta_linear_module, "_cpu_has_matrix_units", lambda dtype: amx)
    g = torch.Generator().manual_seed(0)
    grad_out, x = torch.randn(5, 12, generator=g).bfloat16(), torch.randn(5, 16, generator=g).bfloat16()
    indices = torch.randperm(12 * 16, generator=g)[:20]
    values = sp.ops.sddmm_reference(grad_out, x, indices)
    bf16_product = (grad_out.t() @ x).reshape(-1)[indices].float()
    fp32_product = (grad_out.float().t() @ x.float()).reshape(-1)[indices]
    assert values.dtype == torch.float32
    if amx:
        assert torch.equal(values, bf16_product)
    else:
        assert torch.allclose(values, fp32_product, rtol=1e-6, atol=1e-6) and not torch.equal(values, bf16_product)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seft_collecting_window_gives_the_same_delta_gradient_over_row_blocks(dtype, monkeypatch):
    """While collecting, SEFT's backward reads Δ's gradient out of the dense blocks it accumulates;
    over several row blocks it equals the sampled product's and the dense ``dyᵀ x`` at Δ's positions."""
    monkeypatch.setattr(delta_linear_module, "BLOCK_ELEMENTS", 3 * 128)  # 3 rows of down_proj a block
    peft_model = get_peft_model(pruned_tiny_model("llama", 0.5).to(dtype), sp.SEFTConfig(density=0.1))
    layer = peft_model.base_model.model.model.layers[0].mlp.down_proj  # 64 x 128
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    delta, index = layer.seft_delta["default"], layer.seft_index["default"]
    layer(x).sum().backward()
    sampled = delta.grad.clone()
    delta.grad = None
    layer.start_collecting()
    layer(x).sum().backward()
    dense = x.reshape(-1, layer.in_features).double().sum(0).expand(layer.out_features, -1)  # dy = 1
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(delta.grad.double(), dense.reshape(-1)[index]) < tolerance
    assert rel_err(delta.grad.double(), sampled.double()) < tolerance
    assert rel_err(layer.grad_accum.double(), dense) < tolerance
    layer.stop_collecting()


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


def _masked_lora_inputs(out_features, in_features, seed=0):
    """A pruned fp64 weight, a bias, A, B and an input for a masked low-rank delta_linear."""
    g = torch.Generator().manual_seed(seed)
    weight = sparse_weight((out_features, in_features), seed=seed)
    bias = torch.randn(out_features, generator=g, dtype=torch.float64)
    A = torch.randn(4, in_features, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(out_features, 4, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, in_features, generator=g, dtype=torch.float64, requires_grad=True)
    return weight, bias, A, B, x


def _masked_lora_step(out_features, in_features, block_elements, inputs=None):
    """One forward and backward through delta_linear; the gradients of x, A and B."""
    weight, bias, A, B, x = inputs or _masked_lora_inputs(out_features, in_features)
    delta_linear(x, weight, bias, MaskedLowRankUpdate(A, B, 0.5), block_elements=block_elements).sum().backward()
    return x.grad, A.grad, B.grad


def test_cpu_passes_reuse_one_workspace_of_three_blocks_until_released():
    """Every pass on a CPU takes its blocks from the one kept workspace: the same memory from call to
    call, as large as three of the largest block (W + ΔW, the mask, G) whatever the number of blocks
    or calls, and freed by release_workspace."""
    import weakref

    delta_linear_module.release_workspace()
    assert delta_linear_module.workspace_bytes() == 0
    first = _masked_lora_step(64, 48, block_elements=16 * 48)  # 4 blocks of 16 rows
    buffers = delta_linear_module._kept_workspace.buffers
    pointers = {name: buffer.data_ptr() for name, buffer in buffers.items()}
    assert delta_linear_module.workspace_bytes() == 3 * 16 * 48 * 8
    again = _masked_lora_step(64, 48, block_elements=16 * 48)
    assert {name: buffer.data_ptr() for name, buffer in buffers.items()} == pointers
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # reused memory, same results
    _masked_lora_step(40, 48, block_elements=16 * 48)  # a smaller layer fits in the same buffers
    assert delta_linear_module.workspace_bytes() == 3 * 16 * 48 * 8
    _masked_lora_step(64, 80, block_elements=16 * 80)  # a larger block grows them, no more
    assert delta_linear_module.workspace_bytes() == 3 * 16 * 80 * 8
    kept = [weakref.ref(buffer) for buffer in buffers.values()]
    del buffers
    delta_linear_module.release_workspace()
    assert delta_linear_module.workspace_bytes() == 0 and all(ref() is None for ref in kept)


class _CollectingSink:
    """Where SEFT's backward adds the dense weight gradient while collecting (as its layer does)."""

    collecting = True

    def __init__(self, weight):
        self.grad_accum = torch.zeros_like(weight)

    def accumulate_rows(self, start, stop, grad_rows):
        self.grad_accum[start:stop] += grad_rows


def _layer(method, out_features, in_features, seed=0):
    """One pruned fp64 layer of ``method`` through delta_linear's blockwise passes: ``(forward, params,
    dense)``, ``dense(*params)`` its effective weight (``W + ΔW``) with plain autograd."""
    from sparse_peft.tuners.seft.functional import effective_weight, sparse_delta_linear

    g = torch.Generator().manual_seed(seed)
    weight = sparse_weight((out_features, in_features), seed=seed)
    A = torch.randn(4, in_features, generator=g, dtype=torch.float64, requires_grad=True)
    if method == "masked_lora":
        B = torch.randn(out_features, 4, generator=g, dtype=torch.float64, requires_grad=True)
        return (lambda x: delta_linear(x, weight, None, MaskedLowRankUpdate(A, B, 0.5)), (A, B),
                lambda A_, B_: weight + 0.5 * (B_ @ A_) * (weight != 0))
    if method == "spp":
        b = torch.randn(out_features, 1, generator=g, dtype=torch.float64, requires_grad=True)
        return (lambda x: delta_linear(x, weight, None, RowScaleUpdate(A, b, 0.7)), (A, b),
                lambda A_, b_: weight + 0.7 * expand_rows(A_, out_features) * b_ * weight)
    positions = torch.randperm(weight.numel(), generator=g)
    delta_index, frozen_index, removed_index = (part.sort().values for part in positions[:30].split([20, 5, 5]))
    delta = torch.randn(20, generator=g, dtype=torch.float64, requires_grad=True)
    frozen_delta = torch.randn(5, generator=g, dtype=torch.float64)
    sink = _CollectingSink(weight) if method == "seft_collecting" else None
    return (lambda x: sparse_delta_linear(x, delta, weight, delta_index, frozen_index, frozen_delta, removed_index,
                                          grad_sink=sink), (delta,),
            # effective_weight builds no graph: Δ's gradient is the output's at Δ's positions
            lambda delta_: effective_weight(weight, delta_index, delta_.detach(), frozen_index, frozen_delta,
                                            removed_index).view(-1).index_add(0, delta_index, delta_ - delta_.detach())
            .view(out_features, in_features))


def _grads(forward, params, x):
    """The gradients of ``x`` and ``params`` for the sum of squares of ``forward(x)``."""
    x = x.detach().requires_grad_(True)
    for param in params:
        param.grad = None
    forward(x).pow(2).sum().backward()  # not autograd.grad: reentrant checkpointing refuses it
    return [tensor.grad for tensor in (x, *params)]


BLOCK_METHODS = ["masked_lora", "spp", "seft", "seft_collecting"]


@pytest.mark.parametrize("amx", [True, False])
def test_spp_in_bf16_keeps_its_block_buffers_and_its_gradients_match_a_wide_reference(amx, monkeypatch):
    """SPP's gradients in bf16 come from G ⊙ W in G's dtype (per group of rows, fp32 accumulation
    inside): the kept workspace is the block's change and W + ΔW in bf16 (apart: in place runs slower
    in bf16 on a CPU), G in fp32 without AMX, or with AMX G and G ⊙ W apart in bf16; no cast copy of
    W; and the gradients match fp64 dense autograd to bf16 precision, with row blocks of 12 that cut
    across SPP's groups of 16."""
    monkeypatch.setattr(delta_linear_module, "_cpu_has_matrix_units", lambda dtype: amx)
    weight = sparse_weight((64, 48))
    g = torch.Generator().manual_seed(1)
    A64 = torch.randn(4, 48, generator=g, dtype=torch.float64) * 0.1
    b64 = torch.randn(64, 1, generator=g, dtype=torch.float64)
    x64 = torch.randn(3, 48, generator=g, dtype=torch.float64)
    dy64 = torch.randn(3, 64, generator=g, dtype=torch.float64)
    A, b = A64.float().requires_grad_(), b64.float().requires_grad_()
    delta_linear_module.release_workspace()
    y = delta_linear(x64.bfloat16(), weight.bfloat16(), None, RowScaleUpdate(A, b, 0.7), block_elements=12 * 48)
    y.backward(dy64.bfloat16())
    assert delta_linear_module.workspace_bytes() == 12 * 48 * 2 * 2 + 12 * 48 * (2 * 2 if amx else 4)
    A_ref, b_ref = A64.clone().requires_grad_(), b64.clone().requires_grad_()
    F.linear(x64, weight + 0.7 * expand_rows(A_ref, 64) * b_ref * weight).backward(dy64)
    assert A.grad.dtype == b.grad.dtype == torch.float32
    assert rel_err(A.grad.double(), A_ref.grad) < 3e-2 and rel_err(b.grad.double(), b_ref.grad) < 3e-2
    delta_linear_module.release_workspace()


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("amx", [True, False])
def test_masked_lora_in_bf16_masks_into_buffers_of_their_own_and_matches_a_wide_reference(amx, with_base,
                                                                                       monkeypatch):
    """In bf16 on a CPU masked LoRA writes ``(B A) ⊙ M`` (``W +`` it, with the base) and, with AMX,
    ``G ⊙ M`` into buffers apart from their inputs (in place runs slower there): the kept workspace
    is ``s·B A``, the mask and the result in bf16, ``G`` and ``G ⊙ M`` in bf16 with AMX or ``G`` alone
    in fp32 (masked in place) without; the gradients match fp64 dense autograd to bf16 precision."""
    monkeypatch.setattr(delta_linear_module, "_cpu_has_matrix_units", lambda dtype: amx)
    weight = sparse_weight((64, 48))
    g = torch.Generator().manual_seed(1)
    A64, B64 = torch.randn(4, 48, generator=g, dtype=torch.float64), torch.randn(64, 4, generator=g, dtype=torch.float64)
    x64, dy64 = torch.randn(3, 48, generator=g, dtype=torch.float64), torch.randn(3, 64, generator=g, dtype=torch.float64)
    A, B = A64.float().requires_grad_(), B64.float().requires_grad_()
    delta_linear_module.release_workspace()
    x = x64.bfloat16().requires_grad_()  # dx too: the backward's blocks share one mask in x's dtype
    y = delta_linear(x, weight.bfloat16(), None, MaskedLowRankUpdate(A, B, 0.5), with_base=with_base,
                     block_elements=12 * 48)
    y.backward(dy64.bfloat16())
    block = 12 * 48
    assert delta_linear_module.workspace_bytes() == 3 * block * 2 + (2 * block * 2 if amx else block * 4)
    A_ref, B_ref = A64.clone().requires_grad_(), B64.clone().requires_grad_()
    F.linear(x64, (weight if with_base else 0) + 0.5 * (B_ref @ A_ref) * (weight != 0)).backward(dy64)
    assert rel_err(A.grad.double(), A_ref.grad) < 3e-2 and rel_err(B.grad.double(), B_ref.grad) < 3e-2
    delta_linear_module.release_workspace()


@pytest.mark.parametrize("method", BLOCK_METHODS)
def test_a_pass_allocates_nothing_block_sized_once_the_workspace_is_kept(method, monkeypatch):
    """After a first step, a step's allocations are activation- or parameter-sized (all smaller than one
    block here): the blocks are rebuilt in the kept workspace, not allocated and freed block by block."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setattr(delta_linear_module, "BLOCK_ELEMENTS", 16 * 48)  # 4 blocks of 16 rows
    block_bytes = 16 * 48 * 8
    forward, params, _ = _layer(method, 64, 48)
    x = torch.randn(2, 3, 48, dtype=torch.float64)
    _grads(forward, params, x)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _grads(forward, params, x)
    sizes = [event.self_cpu_memory_usage for event in prof.events() if event.self_cpu_memory_usage > 0]
    assert sizes and max(sizes) < block_bytes, sorted(sizes)[-5:]


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_layers_share_the_kept_workspace_in_turn_under_gradient_checkpointing(use_reentrant, monkeypatch):
    """Layers of different shapes and methods take their blocks from the one kept workspace in turn,
    and checkpointing re-runs their forwards inside the backward: the gradients equal those without
    checkpointing, bit for bit, and plain dense autograd's."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setattr(delta_linear_module, "BLOCK_ELEMENTS", 16 * 48)
    layers = [_layer("masked_lora", 64, 48, seed=1), _layer("spp", 40, 64, seed=2),
              _layer("seft_collecting", 48, 40, seed=3)]
    params = [p for _, layer_params, _ in layers for p in layer_params]

    def blockwise(x):
        for forward, _, _ in layers:
            x = torch.tanh(forward(x))
        return x

    def dense(x):
        for _, layer_params, effective in layers:
            x = torch.tanh(F.linear(x, effective(*layer_params)))
        return x

    x = torch.randn(2, 3, 48, dtype=torch.float64)
    delta_linear_module.release_workspace()
    plain = _grads(blockwise, params, x)
    checkpointed = _grads(lambda x_: checkpoint(blockwise, x_, use_reentrant=use_reentrant), params, x)
    assert all(torch.equal(a, b) for a, b in zip(checkpointed, plain))
    assert all(torch.allclose(a, b) for a, b in zip(plain, _grads(dense, params, x)))
    assert delta_linear_module.workspace_bytes() > 0  # the kept one served them


def test_passes_in_two_threads_give_the_results_of_one_thread(monkeypatch):
    """Passes running at once in two threads each get a workspace of their own: every step's gradients
    equal those of the same step run alone."""
    import threading

    monkeypatch.setattr(delta_linear_module, "BLOCK_ELEMENTS", 16 * 48)
    runs = [(_layer("masked_lora", 64, 48, seed=1), torch.randn(2, 3, 48, dtype=torch.float64)),
            (_layer("spp", 96, 48, seed=2), torch.randn(4, 5, 48, dtype=torch.float64))]
    alone = [_grads(forward, params, x) for (forward, params, _), x in runs]
    results = [[], []]

    def train(index):
        # A new thread's OpenMP team starts at the machine's core count, not at the main thread's
        # setting: its reductions would sum in another order (a difference of float rounding alone).
        torch.set_num_threads(torch.get_num_threads())
        (forward, params, _), x = runs[index]
        for _ in range(20):
            results[index].append(_grads(forward, params, x))

    threads = [threading.Thread(target=train, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for expected, steps in zip(alone, results):
        assert len(steps) == 20
        assert all(torch.equal(a, b) for step in steps for a, b in zip(step, expected))


def test_concurrent_passes_get_their_own_workspace_and_one_is_kept():
    cpu = torch.device("cpu")
    delta_linear_module.release_workspace()
    with delta_linear_module.pass_workspace(cpu) as outer:
        outer.take("grad", (4, 4), torch.float32, cpu)
        with delta_linear_module.pass_workspace(cpu) as inner:  # as another thread's pass would
            assert inner is not outer
            inner.take("grad", (8, 8), torch.float32, cpu)
    assert delta_linear_module.workspace_bytes() == 8 * 8 * 4  # the first one back is kept, the other freed
    delta_linear_module.release_workspace()


def test_a_workspace_made_under_inference_mode_serves_training():
    delta_linear_module.release_workspace()
    weight, bias, A, B, x = _masked_lora_inputs(64, 48)
    with torch.inference_mode():
        delta_linear(x, weight, bias, MaskedLowRankUpdate(A, B, 0.5), block_elements=16 * 48)
    assert delta_linear_module.workspace_bytes() > 0
    grads = _masked_lora_step(64, 48, block_elements=16 * 48)  # writes into buffers made in inference mode
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_masked_lora_factors_follow_their_parameters_and_serve_inference_tensors():
    """An update casts s·B, A and s·A once for all its blocks, and again after a parameter changed in
    place (an optimizer step between two calls); parameters made under inference mode, which keep no
    version counter, work too."""
    weight, bias, A, B, x = _masked_lora_inputs(64, 48)
    update = MaskedLowRankUpdate(A, B, 0.5)

    def expected(A_, B_):
        return F.linear(x, weight + 0.5 * (B_ @ A_) * (weight != 0), bias)

    with torch.no_grad():
        assert torch.allclose(delta_linear(x, weight, bias, update, block_elements=16 * 48), expected(A, B))
        B.add_(1.0)
        assert torch.allclose(delta_linear(x, weight, bias, update, block_elements=16 * 48), expected(A, B))
    with torch.inference_mode():
        A_inference, B_inference = A.detach().clone(), B.detach().clone()
        inference_update = MaskedLowRankUpdate(A_inference, B_inference, 0.5)
        y = delta_linear(x.detach(), weight, bias, inference_update, block_elements=16 * 48)
        assert torch.allclose(y, expected(A_inference, B_inference))
        B_inference.add_(1.0)  # no version to tell: remade on every call
        y = delta_linear(x.detach(), weight, bias, inference_update, block_elements=16 * 48)
        assert torch.allclose(y, expected(A_inference, B_inference))


def test_mask_fingerprint_hashed_in_chunks_equals_the_whole_mask_checksum(monkeypatch):
    """The fingerprint is hashed a chunk of positions at a time (no int64 index per weight at once):
    [numel, nnz, Σ (i · mult) mod p over the kept flat positions i], as over the whole mask."""
    import sparse_peft.sparsity.masks as masks

    monkeypatch.setattr(masks, "_FINGERPRINT_CHUNK", 7)  # 143 positions: 21 chunks, the last one short
    mask = sparse_weight((13, 11), seed=3) != 0
    kept = mask.reshape(-1).nonzero().squeeze(-1)
    checksum = ((kept * masks._HASH_MULT) % masks._HASH_MOD).sum()
    assert masks.mask_fingerprint(mask).tolist() == [143, kept.numel(), int(checksum)]
    assert masks.mask_fingerprint(mask.t()).tolist() != masks.mask_fingerprint(mask).tolist()  # positions count
