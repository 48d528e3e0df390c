"""Masked LoRA's masking fused into one compiled loop per use on a CPU (``sparse_peft._cpu_fusion``):
the eager ops' results bit for bit, no mask buffer, and the eager ops where it does not apply or
compiling fails."""

import warnings

import pytest
import torch

import sparse_peft._cpu_fusion as cpu_fusion
import sparse_peft.delta_linear as delta_linear_module
from sparse_peft.delta_linear import MaskedLowRankUpdate, delta_linear
from sparse_peft.sparsity.masks import restore_mask

ROWS, COLS, BLOCK_ROWS = 64, 48, 16


def fused_calls(monkeypatch) -> list:
    """Record what each ``where_kept`` call returned (True: the fused loop computed it)."""
    calls, where_kept = [], cpu_fusion.where_kept

    def spy(*args, **kwargs):
        calls.append(where_kept(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(cpu_fusion, "where_kept", spy)
    return calls


def train_once(dtype, weight_dtype, with_base):
    """One forward and backward of a masked LoRA layer over 4 row blocks: the results and the bytes of
    the CPU workspace the passes kept."""
    g = torch.Generator().manual_seed(0)
    weight = restore_mask(torch.randn(ROWS, COLS, generator=g), torch.rand(ROWS, COLS, generator=g) >= 0.5)
    A = torch.randn(4, COLS, generator=g).requires_grad_()
    B = torch.randn(ROWS, 4, generator=g).requires_grad_()
    x = torch.randn(5, COLS, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(5, ROWS, generator=g).to(dtype)
    delta_linear_module.release_workspace()
    y = delta_linear(x, weight.to(weight_dtype), None, MaskedLowRankUpdate(A, B, 0.5), with_base=with_base,
                     block_elements=BLOCK_ROWS * COLS)
    y.backward(dy)
    kept_bytes = delta_linear_module.workspace_bytes()
    delta_linear_module.release_workspace()
    return (y.detach(), x.grad, A.grad, B.grad), kept_bytes


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


def test_blocks_under_the_threshold_and_other_devices_keep_the_eager_ops(monkeypatch):
    monkeypatch.setattr(cpu_fusion, "MIN_ELEMENTS", 100)
    monkeypatch.setattr(cpu_fusion, "_failed", False)
    assert cpu_fusion.applies(torch.ones(10, 10)) and not cpu_fusion.applies(torch.ones(9, 11))
    assert not cpu_fusion.applies(torch.ones(10, 10, device="meta"))
    monkeypatch.setenv(cpu_fusion.ENV_SWITCH, "0")
    assert not cpu_fusion.applies(torch.ones(10, 10))


def test_a_failed_compile_warns_once_and_the_eager_ops_give_the_same_results(monkeypatch):
    """No C++ compiler, say: the first use warns, every block (that one included) is computed by the
    eager ops, and nothing is tried again."""
    monkeypatch.setattr(cpu_fusion, "MIN_ELEMENTS", BLOCK_ROWS * COLS)
    monkeypatch.setattr(cpu_fusion, "_failed", False)
    monkeypatch.setenv(cpu_fusion.ENV_SWITCH, "0")
    eager, _ = train_once(torch.float32, torch.float32, True)
    monkeypatch.delenv(cpu_fusion.ENV_SWITCH)
    attempts = []

    def failing_compile(with_base):
        def compiled(*args):
            attempts.append(with_base)
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
    assert attempts == [True] and cpu_fusion._failed
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
