"""The layers on a CUDA GPU: SPP and SEFT train through the Triton kernels, agree with their PyTorch
path, and keep the invariant through training and merge; 2:4 weights take PyTorch's sparse GEMM.

CI has no GPU, so these skip there. ``benchmarks/gpu_run.sh`` runs them on a GPU with
``TRITON_INTERPRET=0`` (the kernels compile; in the interpreter the layers never call them anyway,
since they take the kernels for CUDA inputs only). The kernels themselves are compared with their
references on the CPU in ``test_kernels.py``.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import linear_masks, pruned_tiny_model, rel_err
from peft import get_peft_model

import sparse_peft as sp
from sparse_peft import ops
from sparse_peft.kernels import _common
from sparse_peft.sparsity.selection import nm_keep_mask

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or _common.INTERPRET,
    reason="needs a CUDA GPU and compiled kernels (TRITON_INTERPRET=0); benchmarks/gpu_run.sh runs these")

DEVICE = "cuda"
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def spy(monkeypatch, op: str) -> list:
    """Record each call into the Triton kernel module ``sparse_peft.kernels.<op>``."""
    module = importlib.import_module(f"sparse_peft.kernels.{op}")
    calls, real = [], getattr(module, op)

    def counted(*args, **kwargs):
        calls.append(args[0].device.type)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, op, counted)
    return calls


def token_ids(seed=0):
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def logits_and_grads(peft_model, ids):
    peft_model.zero_grad(set_to_none=True)
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {name: p.grad.float().clone() for name, p in peft_model.named_parameters() if p.requires_grad}
    return out.logits.detach().float(), grads


def assert_kernel_path_matches_torch_path(peft_model, monkeypatch, dtype):
    """The same forward and backward, once as the layers run on CUDA (the kernels), once with
    SPARSE_PEFT_BACKEND=torch (every op its PyTorch reference)."""
    ids = token_ids()
    kernel_logits, kernel_grads = logits_and_grads(peft_model, ids)
    monkeypatch.setenv("SPARSE_PEFT_BACKEND", "torch")
    torch_logits, torch_grads = logits_and_grads(peft_model, ids)
    monkeypatch.delenv("SPARSE_PEFT_BACKEND")
    assert rel_err(kernel_logits, torch_logits) < TOL[dtype]
    assert kernel_grads.keys() == torch_grads.keys() and kernel_grads
    for name, grad in torch_grads.items():
        assert rel_err(kernel_grads[name], grad) < TOL[dtype], name


def train(peft_model, steps, after_step=None):
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for step in range(1, steps + 1):
        ids = token_ids(seed=step)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if after_step is not None:
            after_step(optimizer, step)
    peft_model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spp_trains_through_the_fused_kernel_and_merges_sparse(dtype, monkeypatch):
    model = pruned_tiny_model("llama", 0.5).to(DEVICE, dtype)
    start = linear_masks(model)
    peft_model = get_peft_model(model, sp.SPPConfig(r=4, init_b_zero=False))
    calls = spy(monkeypatch, "spp_linear")
    if dtype == torch.float32:  # bf16 rounds the merged weight in the kernel: compare in fp32 only
        assert_kernel_path_matches_torch_path(peft_model, monkeypatch, dtype)
        assert calls and set(calls) == {DEVICE}
    train(peft_model, steps=3)
    assert calls, "the SPP layers did not call the fused kernel on CUDA"
    merged = peft_model.merge_and_unload()
    assert linear_masks(merged).keys() == start.keys()
    for name, support in linear_masks(merged).items():
        assert torch.equal(support, start[name]), name


def test_seft_gradients_come_from_the_sddmm_kernel_and_counts_hold(monkeypatch):
    model = pruned_tiny_model("llama", 0.5).to(DEVICE)
    start = linear_masks(model)
    peft_model = get_peft_model(model, sp.SEFTConfig(density=0.05, update_interval=2, drop_fraction=0.5))
    calls = spy(monkeypatch, "sddmm")
    assert_kernel_path_matches_torch_path(peft_model, monkeypatch, torch.float32)
    assert calls and set(calls) == {DEVICE}
    sp.seft_step(peft_model, None, 0, total_steps=6)
    updates = []
    train(peft_model, steps=6,
          after_step=lambda optimizer, step: updates.append(sp.seft_step(peft_model, optimizer, step, total_steps=6)))
    assert any(updates), "no drop-and-grow update happened"
    merged = peft_model.merge_and_unload()
    moved = 0
    for name, support in linear_masks(merged).items():
        assert int(support.sum()) == int(start[name].sum()), name  # each layer keeps its count of nonzeros
        moved += int((support & ~start[name]).sum())
    assert moved > 0, "no pruned position came back"


def test_two_four_weights_take_the_sparse_gemm():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 256, generator=generator)
    weight = (weight * nm_keep_mask(weight.abs(), 2, 4)).to(DEVICE, torch.float16)
    assert ops.semi_structured_unsupported_reason(weight) is None, "an H100/H200 takes 2:4 fp16"
    sparse = ops.to_semi_structured(weight, measure=False)
    assert isinstance(sparse, torch.sparse.SparseSemiStructuredTensor)
    x = torch.randn(64, 256, generator=generator).to(DEVICE, torch.float16)
    assert rel_err(ops.semi_structured_linear(x, sparse).float(), F.linear(x.float(), weight.float())) < 5e-3
