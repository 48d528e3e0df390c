"""Masked LoRA's masking and SPP's low-precision block fused into one compiled loop on a CPU
(``sparse_peft._cpu_fusion``): the eager ops' results bit for bit, fewer kept buffers, every zero kept
through training, merge and save / load, and the eager ops where it does not apply or compiling
fails."""

import warnings

import pytest
import torch
from conftest import assert_masks_equal, linear_masks, pruned_tiny_model, train_steps
from peft import PeftModel, get_peft_model

import sparse_peft as sp
import sparse_peft._cpu_fusion as cpu_fusion
import sparse_peft.delta_linear as delta_linear_module
from sparse_peft.delta_linear import MaskedLowRankUpdate, RowScaleUpdate, delta_linear
from sparse_peft.sparsity.masks import restore_mask

ROWS, COLS, BLOCK_ROWS = 64, 48, 16


def fused_calls(monkeypatch, name: str = "where_kept") -> list:
    """Record what each call of ``cpu_fusion.<name>`` returned (True: the fused loop computed it)."""
    calls, function = [], getattr(cpu_fusion, name)

    def spy(*args, **kwargs):
        calls.append(function(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(cpu_fusion, name, spy)
    return calls


def masked_low_rank(g):
    return MaskedLowRankUpdate(torch.randn(4, COLS, generator=g).requires_grad_(),
                               torch.randn(ROWS, 4, generator=g).requires_grad_(), 0.5)


def row_scale(g):  # 3 groups of rows: their bounds cut across the 16-row blocks
    return RowScaleUpdate(torch.randn(3, COLS, generator=g).requires_grad_(),
                          torch.randn(ROWS, 1, generator=g).requires_grad_(), 0.7)


def train_once(dtype, weight_dtype, with_base, make_update=masked_low_rank):
    """One forward and backward of a layer over 4 row blocks: the results and the bytes of the CPU
    workspace the passes kept."""
    g = torch.Generator().manual_seed(0)
    weight = restore_mask(torch.randn(ROWS, COLS, generator=g), torch.rand(ROWS, COLS, generator=g) >= 0.5)
    update = make_update(g)
    x = torch.randn(5, COLS, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(5, ROWS, generator=g).to(dtype)
    delta_linear_module.release_workspace()
    y = delta_linear(x, weight.to(weight_dtype), None, update, with_base=with_base, block_elements=BLOCK_ROWS * COLS)
    y.backward(dy)
    kept_bytes = delta_linear_module.workspace_bytes()
    delta_linear_module.release_workspace()
    return (y.detach(), x.grad, *(p.grad for p in update.params)), kept_bytes


CASES = {  # (activations, weight, with_base)
    "fp32": (torch.float32, torch.float32, True),
    "bf16_fp32_weight": (torch.bfloat16, torch.float32, True),  # W rounded to bf16 before the sum
    "bf16_without_base": (torch.bfloat16, torch.bfloat16, False),
}


@pytest.mark.parametrize("case", CASES)
def test_the_fused_loops_give_the_eager_results_bit_for_bit_and_write_no_mask(case, monkeypatch):
    """With blocks over ``MIN_ELEMENTS`` each use of the mask is one compiled loop (the forward's block,
    the backward's block and ``G ⊙ M``): y, dx, dA and dB equal the eager ops' exactly, and the kept
    workspace lacks exactly the eager path's mask buffer (one block in the activations' dtype) and, for a
    weight in another dtype, its cast (the loop reads ``W`` as it is)."""
    dtype, weight_dtype, with_base = CASES[case]
    monkeypatch.setattr(cpu_fusion, "MIN_ELEMENTS", BLOCK_ROWS * COLS)
    monkeypatch.setattr(cpu_fusion, "_failed", False)
    calls = fused_calls(monkeypatch)
    monkeypatch.setenv(cpu_fusion.ENV_SWITCH, "0")
    eager, eager_bytes = train_once(dtype, weight_dtype, with_base)
    assert calls and not any(calls)  # switched off: the eager ops everywhere
    calls.clear()
    monkeypatch.delenv(cpu_fusion.ENV_SWITCH)
    fused, fused_bytes = train_once(dtype, weight_dtype, with_base)
    assert calls == [True] * 12, "4 blocks x (forward, backward's block, G ⊙ M)"
    for name, a, b in zip(("y", "dx", "dA", "dB"), fused, eager):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    eager_only = 1 if weight_dtype == dtype else 2  # the mask, and the cast of W when its dtype differs
    assert eager_bytes - fused_bytes == eager_only * BLOCK_ROWS * COLS * dtype.itemsize


SPP_CASES = {  # (activations, weight, with_base, blocks the eager ops keep and the loop does not)
    "bf16": (torch.bfloat16, torch.bfloat16, True, 1),  # W + W ⊙ change apart from the change
    "bf16_fp32_weight": (torch.bfloat16, torch.float32, True, 2),  # and the cast of W
    "bf16_without_base": (torch.bfloat16, torch.bfloat16, False, 0),  # W ⊙ change in place either way
    "fp16": (torch.float16, torch.float16, True, 1),
}


@pytest.mark.parametrize("case", SPP_CASES)
def test_spps_fused_block_gives_the_eager_results_bit_for_bit(case, monkeypatch):
    """In bf16 / fp16 each block of SPP's ``W + W ⊙ (α b ⊙ R(A))`` (forward and backward) is one loop
    that makes the change from ``α b`` and ``A`` as it goes, across blocks that cut through a group:
    y, dx, dA and db equal the eager ops' exactly."""
    dtype, weight_dtype, with_base, eager_only = SPP_CASES[case]
    monkeypatch.setattr(cpu_fusion, "MIN_ELEMENTS", BLOCK_ROWS * COLS)
    monkeypatch.setattr(cpu_fusion, "_failed", False)
    calls = fused_calls(monkeypatch, "row_scaled")
    monkeypatch.setenv(cpu_fusion.ENV_SWITCH, "0")
    eager, eager_bytes = train_once(dtype, weight_dtype, with_base, row_scale)
    assert not any(calls)
    calls.clear()
    monkeypatch.delenv(cpu_fusion.ENV_SWITCH)
    fused, fused_bytes = train_once(dtype, weight_dtype, with_base, row_scale)
    assert calls == [True] * 8, "4 blocks x (forward, backward)"
    for name, a, b in zip(("y", "dx", "dA", "db"), fused, eager):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert eager_bytes - fused_bytes == eager_only * BLOCK_ROWS * COLS * dtype.itemsize


def test_spp_in_fp32_keeps_the_eager_fused_multiply_add(monkeypatch):
    """In fp32 the eager ``addcmul`` rounds ``W + W ⊙ change`` once (a fused multiply-add), the compiled
    loop would round the product first: fp32 keeps the eager ops."""
    monkeypatch.setattr(cpu_fusion, "MIN_ELEMENTS", BLOCK_ROWS * COLS)
    monkeypatch.setattr(cpu_fusion, "_failed", False)
    calls = fused_calls(monkeypatch, "row_scaled")
    train_once(torch.float32, torch.float32, True, row_scale)
    assert not any(calls)
    weight, out = torch.ones(BLOCK_ROWS, COLS), torch.empty(BLOCK_ROWS, COLS)
    assert not cpu_fusion.row_scaled(weight, torch.ones(BLOCK_ROWS), torch.ones(1, COLS),
                                     torch.zeros(BLOCK_ROWS, dtype=torch.long), out, True)


def test_blocks_under_the_threshold_and_other_devices_keep_the_eager_ops(monkeypatch):
    monkeypatch.setattr(cpu_fusion, "MIN_ELEMENTS", 100)
    monkeypatch.setattr(cpu_fusion, "_failed", False)
    assert cpu_fusion.applies(torch.ones(10, 10)) and not cpu_fusion.applies(torch.ones(9, 11))
    assert not cpu_fusion.applies(torch.ones(10, 10, device="meta"))
    assert not cpu_fusion.applies(torch.ones(10, 10).t())  # not contiguous
    with torch.inference_mode():
        inference_tensor = torch.ones(10, 10)
        assert not cpu_fusion.applies(torch.ones(10, 10).clone())
    assert not cpu_fusion.applies(inference_tensor)
    monkeypatch.setenv(cpu_fusion.ENV_SWITCH, "0")
    assert not cpu_fusion.applies(torch.ones(10, 10))
    monkeypatch.setenv(cpu_fusion.ENV_SWITCH, "off")
    with pytest.raises(ValueError, match="SPARSE_PEFT_CPU_FUSION must be 0 .* or 1 .*, not 'off'"):
        cpu_fusion.applies(torch.ones(10, 10))


def test_a_failed_compile_warns_once_and_the_eager_ops_give_the_same_results(monkeypatch):
    """No C++ compiler, say: the first use warns, every block (that one included) is computed by the
    eager ops, and nothing is tried again."""
    monkeypatch.setattr(cpu_fusion, "MIN_ELEMENTS", BLOCK_ROWS * COLS)
    monkeypatch.setattr(cpu_fusion, "_failed", False)
    monkeypatch.setenv(cpu_fusion.ENV_SWITCH, "0")
    eager, _ = train_once(torch.float32, torch.float32, True)
    monkeypatch.delenv(cpu_fusion.ENV_SWITCH)
    attempts = []

    def failing_compile(name):
        def compiled(*args):
            attempts.append(name)
            raise RuntimeError("no working C++ compiler\ndetails")
        return compiled

    monkeypatch.setattr(cpu_fusion, "_compiled", failing_compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results, _ = train_once(torch.float32, torch.float32, True)
        train_once(torch.float32, torch.float32, True)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "torch.compile could not build" in messages[0]
    assert "no working C++ compiler" in messages[0] and "details" not in messages[0]
    assert attempts == ["kept_sum"] and cpu_fusion._failed
    for a, b in zip(results, eager):
        assert torch.equal(a, b)


@pytest.mark.parametrize("with_base", [True, False])
def test_where_kept_writes_zero_wherever_the_weight_is_zero(with_base, monkeypatch):
    """Also where ``W + values`` or ``values`` is not finite there: the eager ``W + L ⊙ M`` would give
    NaN where ``L`` is infinite, the fused loop 0 (the invariant wants 0)."""
    monkeypatch.setattr(cpu_fusion, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(cpu_fusion, "_failed", False)
    weight = torch.tensor([[0.0, 1.5, -2.0, 0.0]])
    values = torch.tensor([[float("inf"), 0.25, 1.0, 3.0]])
    out = torch.full_like(values, 7.0)
    assert cpu_fusion.where_kept(weight, values, out, with_base)
    expected = [0.0, 1.75, -1.0, 0.0] if with_base else [0.0, 0.25, 1.0, 0.0]
    assert out.tolist() == [expected]


def test_evaluation_under_inference_mode_keeps_the_eager_ops_without_a_warning(monkeypatch):
    """torch 2.13's compiler failed on the workspace's views under ``inference_mode``: evaluation there
    runs the eager ops, warns nothing, and training afterwards still gets the fused loops."""
    monkeypatch.setattr(cpu_fusion, "MIN_ELEMENTS", BLOCK_ROWS * COLS)
    monkeypatch.setattr(cpu_fusion, "_failed", False)
    calls = fused_calls(monkeypatch)
    g = torch.Generator().manual_seed(0)
    weight = restore_mask(torch.randn(ROWS, COLS, generator=g), torch.rand(ROWS, COLS, generator=g) >= 0.5)
    update, x = masked_low_rank(g), torch.randn(5, COLS, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            y = delta_linear(x, weight, None, update, block_elements=BLOCK_ROWS * COLS)
    A, B = update.params
    assert torch.allclose(y, x @ (weight + 0.5 * (B @ A) * (weight != 0)).t(), atol=1e-5)
    assert calls and not any(calls) and not cpu_fusion._failed
    train_once(torch.float32, torch.float32, True)
    assert any(calls)


@pytest.mark.parametrize("method, dtype", [("masked_lora", torch.float32), ("spp", torch.bfloat16)])
def test_training_saving_loading_and_merging_through_the_fused_loops_keep_every_zero(method, dtype, monkeypatch,
                                                                                      tmp_path):
    """The invariant with every block of a tiny model over the threshold: after training steps, a
    merge, and a save / load / merge, each linear's zeros are the pruned model's, and the fused loops
    did the work (masked LoRA's merge forms its update through them too)."""
    monkeypatch.setattr(cpu_fusion, "MIN_ELEMENTS", 1024)
    monkeypatch.setattr(cpu_fusion, "_failed", False)
    calls = fused_calls(monkeypatch, "where_kept" if method == "masked_lora" else "row_scaled")
    config = {"masked_lora": lambda: sp.MaskedLoraConfig(r=4, init_lora_weights=False),
              "spp": lambda: sp.SPPConfig(r=4, init_b_zero=False)}[method]
    model = pruned_tiny_model("llama", 0.5).to(dtype)
    masks = linear_masks(model)
    peft_model = train_steps(get_peft_model(model, config()), steps=2)
    assert any(calls)
    peft_model.save_pretrained(tmp_path)
    calls.clear()
    assert_masks_equal(peft_model.merge_and_unload(), masks)
    if method == "masked_lora":
        assert any(calls)
    loaded = PeftModel.from_pretrained(pruned_tiny_model("llama", 0.5).to(dtype), tmp_path)
    assert_masks_equal(loaded.merge_and_unload(), masks)
