"""The Triton kernels against their PyTorch reference twins, run on the CPU by Triton's interpreter.

Triton reads TRITON_INTERPRET when a ``@triton.jit`` function is decorated, both our kernels and
triton.language's own ``@jit`` helpers (``tl.sum``, ``tl.cumsum``), which are decorated as soon as
anything imports triton (torch._dynamo does, under peft/transformers). So ``conftest.py`` sets it
before any test module is imported; the line below only covers running this file without it.
Shapes stay small: the interpreter runs tiles in numpy.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from conftest import pruned_tiny_model, rel_err  # noqa: E402
from peft import get_peft_model  # noqa: E402

import sparse_peft as sp  # noqa: E402
from sparse_peft import ops  # noqa: E402
from sparse_peft.kernels import _common  # noqa: E402
from sparse_peft.tuners.spp import SPPLayer  # noqa: E402

if not _common.INTERPRET:  # pragma: no cover - only with an explicit TRITON_INTERPRET=0
    pytest.skip("the kernel tests run Triton's CPU interpreter, and TRITON_INTERPRET is off (set it to 1 before "
                "triton is first imported)", allow_module_level=True)

# fp16 tiles are rounded to fp16 before tl.dot (as on a GPU); the references round differently.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def sparse_weight(shape, sparsity=0.5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g)
    return (weight * (torch.rand(shape, generator=g) >= sparsity)).to(dtype)


def randn(*shape, dtype=torch.float32, seed=1, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_(requires_grad)


def assert_close(got, want, dtype, what):
    err = rel_err(got.float(), want.float())
    assert err < TOL[dtype], f"{what}: relative error {err:.2e} >= {TOL[dtype]:.0e} ({dtype})"


# --- spp_linear -------------------------------------------------------------------------------------

SPP_CASES = [  # (tokens shape, out, in, r): odd sizes, r not dividing out, r == out, one token
    ((2, 11), 37, 45, 5),
    ((3,), 64, 96, 64),
    ((1,), 130, 33, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,out_features,in_features,r", SPP_CASES)
def test_spp_linear_matches_reference(dtype, tokens, out_features, in_features, r):
    weight = sparse_weight((out_features, in_features), dtype=dtype)
    bias = randn(out_features, dtype=dtype, seed=2, requires_grad=True)
    x = randn(*tokens, in_features, dtype=dtype, seed=3, requires_grad=True)
    A = randn(r, in_features, seed=4, requires_grad=True)  # the adapter stays fp32
    b = randn(out_features, 1, seed=5, requires_grad=True)
    outputs, grads = {}, {}
    for backend in ("triton", "torch"):
        y = ops.spp_linear(x, weight, A, b, 0.7, bias, backend=backend)
        assert y.dtype == dtype and y.shape == (*tokens, out_features)
        outputs[backend] = y
        grads[backend] = torch.autograd.grad(y, (x, A, b, bias), randn(*y.shape, dtype=dtype, seed=6))
    assert_close(outputs["triton"], outputs["torch"], dtype, "y")
    for name, got, want in zip(("dx", "dA", "db", "dbias"), grads["triton"], grads["torch"]):
        assert got.dtype == want.dtype, name
        assert_close(got, want, dtype, name)


def test_spp_linear_bf16_is_computed_in_fp32_in_the_interpreter():
    weight = sparse_weight((40, 24), dtype=torch.bfloat16)
    x = randn(5, 24, dtype=torch.bfloat16, requires_grad=True)
    A, b = randn(4, 24, seed=2, requires_grad=True), randn(40, 1, seed=3, requires_grad=True)
    y = ops.spp_linear(x, weight, A, b, 2.0, backend="triton")
    y_ref = ops.spp_linear(x, weight, A, b, 2.0, backend="torch")
    assert y.dtype == torch.bfloat16
    assert_close(y, y_ref, torch.bfloat16, "y")
    grad_A, = torch.autograd.grad(y.float().sum(), A)
    grad_A_ref, = torch.autograd.grad(y_ref.float().sum(), A)
    assert_close(grad_A, grad_A_ref, torch.bfloat16, "dA")


def test_spp_linear_b_zero_is_the_base_layer_and_zeros_get_no_gradient():
    weight = sparse_weight((33, 40), sparsity=0.7)
    x = randn(6, 40, requires_grad=True)
    A = randn(3, 40, seed=2, requires_grad=True)
    b = torch.zeros(33, 1, requires_grad=True)
    y = ops.spp_linear(x, weight, A, b, 1.0, backend="triton")
    assert torch.allclose(y, F.linear(x, weight), atol=1e-5)
    grad_A, grad_b = torch.autograd.grad(y.square().sum(), (A, b))
    assert torch.count_nonzero(grad_A) == 0  # dA ∝ b = 0
    assert torch.count_nonzero(grad_b) > 0
    # A column of W that is entirely pruned gives dA exactly 0 there (S = (dYᵀX) ⊙ W).
    weight[:, 7] = 0
    b2 = randn(33, 1, seed=4, requires_grad=True)
    y = ops.spp_linear(x, weight, A, b2, 1.0, backend="triton")
    grad_A, = torch.autograd.grad(y.square().sum(), A)
    assert torch.all(grad_A[:, 7] == 0) and torch.count_nonzero(grad_A) > 0


def test_spp_linear_takes_strided_inputs():
    weight = sparse_weight((20, 30))
    column_major = weight.t().contiguous().t()
    A, b = randn(3, 30), randn(20, 2, seed=2)[:, :1]  # b: a non-contiguous column
    bias = randn(40, seed=3)[::2]
    x = randn(30, 7, seed=4).t()
    y = ops.spp_linear(x, column_major, A, b, 0.5, bias, backend="triton")
    assert torch.allclose(y, ops.spp_linear_reference(x, weight, A, b, 0.5, bias), atol=1e-5)


def test_spp_linear_grads_only_where_asked():
    weight = sparse_weight((20, 16))
    x = randn(4, 16)  # no grad for x
    A = randn(2, 16, seed=2, requires_grad=True)
    b = randn(20, 1, seed=3)  # b frozen
    y = ops.spp_linear(x, weight, A, b, 1.0, backend="triton")
    y.sum().backward()
    assert A.grad is not None and A.grad.shape == A.shape and b.grad is None and x.grad is None


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_spp_linear_rejects_bad_input(backend):
    weight, A, b = sparse_weight((8, 12)), randn(2, 12), randn(8, 1)
    with pytest.raises(ValueError, match="x has 11 features"):
        ops.spp_linear(randn(3, 11), weight, A, b, 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"A \(3, 12\)|b \(7, 1\)"):
        ops.spp_linear(randn(3, 12), weight, A, randn(7, 1), 1.0, backend=backend)
    with pytest.raises(ValueError, match="share a dtype"):
        ops.spp_linear(randn(3, 12, dtype=torch.float16), weight, A, b, 1.0, backend=backend)
    with pytest.raises(ValueError, match="frozen"):
        ops.spp_linear(randn(3, 12), weight.clone().requires_grad_(), A, b, 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"r <= out_features=8"):
        ops.spp_linear(randn(3, 12), weight, randn(9, 12), b, 1.0, backend=backend)


def test_spp_reference_gradcheck():
    weight = sparse_weight((7, 6), dtype=torch.float64)
    x = randn(3, 6, dtype=torch.float64, requires_grad=True)
    A = randn(3, 6, dtype=torch.float64, seed=2, requires_grad=True)
    b = randn(7, 1, dtype=torch.float64, seed=3, requires_grad=True)
    bias = randn(7, dtype=torch.float64, seed=4, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: ops.spp_linear_reference(t[0], weight, t[1], t[2], 0.5, t[3]),
                                    (x, A, b, bias))


def test_spp_layer_uses_the_op_arguments_the_kernel_needs(monkeypatch):
    """The layer runs ``ops.spp_linear`` with the base weight, adapter and bias; the Triton kernel
    (CUDA's backend) gives what the PyTorch twin (the CPU's) gives."""
    model = pruned_tiny_model("opt", 0.5)  # OPT's linears have biases
    peft_model = get_peft_model(model, sp.SPPConfig(r=4, init_b_zero=False))
    layer = next(m for m in peft_model.modules() if isinstance(m, SPPLayer) and m.get_base_layer().bias is not None)
    x = randn(2, 5, layer.in_features)
    with torch.no_grad():
        expected = layer(x)
        base = layer.get_base_layer()
        fused = ops.spp_linear(x, base.weight, layer.spp_A["default"], layer.spp_b["default"],
                               layer.alpha["default"], base.bias, backend="triton")
    assert rel_err(fused, expected) < 1e-5
    calls = []
    real = ops.spp_linear
    monkeypatch.setattr(ops, "spp_linear", lambda *a, **k: calls.append(k.get("backend")) or real(*a, **k))
    assert torch.equal(layer(x), expected) and calls == [None]  # the layer leaves the backend to sp.ops


def test_spp_layer_with_dropout_adds_the_update_from_ops(monkeypatch):
    """With dropout the base runs itself and the update alone comes from ``ops.spp_delta``."""
    peft_model = get_peft_model(pruned_tiny_model("llama", 0.5), sp.SPPConfig(r=4, dropout=0.1, init_b_zero=False))
    layer = next(m for m in peft_model.modules() if isinstance(m, SPPLayer))
    layer.eval()  # dropout off, but the layer still takes the path for it
    x = randn(2, 5, layer.in_features)
    calls = []
    real = ops.spp_delta
    monkeypatch.setattr(ops, "spp_delta", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(ops, "spp_linear", lambda *a, **k: pytest.fail("no fused op with dropout"))
    with torch.no_grad():
        y = layer(x)
        base = layer.get_base_layer()
        expected = ops.spp_linear_reference(x, base.weight, layer.spp_A["default"], layer.spp_b["default"],
                                            layer.alpha["default"], base.bias)
    assert calls == [1] and rel_err(y, expected) < 1e-5


# --- sddmm ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,out_features,in_features", [(13, 70, 45), (1, 33, 130), (40, 96, 64)])
def test_sddmm_matches_reference_with_a_mask(dtype, tokens, out_features, in_features):
    grad_out, x = randn(tokens, out_features, dtype=dtype), randn(tokens, in_features, dtype=dtype, seed=2)
    mask = sparse_weight((out_features, in_features), sparsity=0.6, seed=3) != 0
    mask[:32, :32] = False  # a tile with nothing sampled (the kernel skips its GEMM)
    values = ops.sddmm(grad_out, x, mask, backend="triton")
    expected = ops.sddmm_reference(grad_out, x, mask)
    assert values.shape == (int(mask.sum()),) and values.dtype == expected.dtype == torch.float32
    assert_close(values, expected, dtype, "sddmm values")
    dense = grad_out.double().t() @ x.double()
    assert torch.allclose(values.double(), dense[mask], rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sddmm_flat_indices_in_any_order_with_duplicates(dtype):
    grad_out, x = randn(9, 37, dtype=dtype), randn(9, 50, dtype=dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 37 * 50, (400,), generator=g)  # shuffled, with repeats
    values = sp.ops.sddmm(grad_out, x, indices, backend="triton")  # the call SEFT makes
    dense = (grad_out.float().t() @ x.float()).reshape(-1)
    assert values.shape == indices.shape
    assert_close(values, dense[indices], dtype, "sddmm at indices")
    assert_close(values, ops.sddmm_reference(grad_out, x, indices), dtype, "sddmm vs reference")
    assert ops.sddmm(grad_out, x, indices[:0], backend="triton").shape == (0,)


def test_sddmm_mixed_dtypes_promote():
    """Under autocast grad_out can be half while x is fp32: both promote, values are fp32."""
    grad_out, x = randn(6, 20, dtype=torch.float16), randn(6, 24, seed=2)
    indices = torch.tensor([5, 0, 479, 100])
    values = ops.sddmm(grad_out, x, indices, backend="triton")
    expected = ops.sddmm_reference(grad_out, x, indices)
    assert values.dtype == expected.dtype == torch.float32
    assert_close(values, expected, torch.float32, "mixed-dtype sddmm")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_sddmm_rejects_bad_input(backend):
    grad_out, x = randn(4, 6), randn(4, 5)
    with pytest.raises(ValueError, match=r"\[0, 30\).*max 30"):
        ops.sddmm(grad_out, x, torch.tensor([0, 30]), backend=backend)
    with pytest.raises(ValueError, match=r"mask shape \(5, 6\)"):
        ops.sddmm(grad_out, x, torch.ones(5, 6, dtype=torch.bool), backend=backend)
    with pytest.raises(ValueError, match="same tokens"):
        ops.sddmm(grad_out, randn(3, 5), torch.tensor([1]), backend=backend)
    with pytest.raises(ValueError, match="int32"):
        ops.sddmm(grad_out, x, torch.tensor([1], dtype=torch.int32), backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sddmm_twin_blocks_and_csr(dtype, monkeypatch):
    """The PyTorch twin: fp32 through CSR ``sampled_addmm`` (with the caller's ``csr`` or its own),
    bf16 a block of rows at a time (here blocks of 3 rows); both give the dense product's values."""
    import sparse_peft.delta_linear as delta_linear

    monkeypatch.setattr(delta_linear, "BLOCK_ELEMENTS", 3 * 45)
    grad_out, x = randn(13, 70, dtype=dtype), randn(13, 45, dtype=dtype, seed=2)
    indices = torch.randint(0, 70 * 45, (300,), generator=torch.Generator().manual_seed(3))  # any order, repeats
    dense = (grad_out.double().t() @ x.double()).reshape(-1)[indices]
    values = ops.sddmm(grad_out, x, indices, backend="torch")
    assert values.dtype == torch.float32 and rel_err(values.double(), dense) < TOL[dtype]
    csr = ops.csr_pattern(indices, (70, 45))
    assert torch.equal(ops.sddmm(grad_out, x, indices, csr=csr, backend="torch"), values)


def test_csr_pattern_keeps_int32_below_2_31_weights_and_int64_from_there():
    """The compressed-row form a caller keeps between steps holds 4-byte indices for a layer of fewer
    than 2**31 weights; from 2**31 weights on (positions past int32) int64, and the sampled product
    read through it is still the dense product's value at every position."""
    assert ops.position_dtype(2**31 - 1) == torch.int32 and ops.position_dtype(2**31) == torch.int64
    indices = torch.randint(0, 70 * 45, (300,), generator=torch.Generator().manual_seed(3))
    assert all(t.dtype == torch.int32 for t in ops.csr_pattern(indices, (70, 45)))
    out_features, in_features = 2**16, 2**15  # 2**31 weights
    indices = torch.tensor([2**31 - 1, 0, 5 * in_features + 7, 2**31 - in_features, 5 * in_features + 7])
    csr = ops.csr_pattern(indices, (out_features, in_features))
    assert all(t.dtype == torch.int64 for t in csr)
    grad_out, x = randn(3, out_features), randn(3, in_features, seed=2)
    expected = (grad_out[:, indices // in_features].double() * x[:, indices % in_features].double()).sum(0)
    assert rel_err(ops.sddmm(grad_out, x, indices, csr=csr, backend="torch").double(), expected) < TOL[torch.float32]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_csr_pattern_checks_the_index_range_once_for_every_sddmm_through_it(backend):
    """An index outside (out, in) is refused when the compressed-row form is made, naming the values;
    ``sddmm`` given that form does not check again (the check reads the device), without it it does."""
    grad_out, x = randn(4, 6), randn(4, 5, seed=2)
    for bad in ([3, 30], [-1, 3]):
        with pytest.raises(ValueError, match=rf"csr_pattern: .*\[0, 30\).*got min {min(bad)} and max {max(bad)}"):
            ops.csr_pattern(torch.tensor(bad), (6, 5))
        with pytest.raises(ValueError, match=rf"sddmm: .*got min {min(bad)} and max {max(bad)}"):
            ops.sddmm(grad_out, x, torch.tensor(bad), backend=backend)
    indices = torch.tensor([29, 0, 7, 7])
    csr = ops.csr_pattern(indices, (6, 5))
    expected = (grad_out[:, indices // 5].double() * x[:, indices % 5].double()).sum(0)
    reads = []
    real_min = torch.Tensor.min

    def spied_min(tensor, *args, **kwargs):
        reads.append(tensor)
        return real_min(tensor, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "min", spied_min)
        values = ops.sddmm(grad_out, x, indices, csr=csr, backend=backend)
        assert not reads
        assert torch.equal(ops.sddmm(grad_out, x, indices, backend=backend), values) and reads
    assert rel_err(values.double(), expected) < TOL[torch.float32]


def test_the_sddmm_kernel_given_the_sorting_order_reads_nothing_back_and_sorts_nothing():
    """With the compressed-row form SEFT keeps, the kernel's wrapper neither sorts the indices again nor
    reads any value back to the host (``_local_scalar_dense``: on a GPU a wait for all queued work, as
    ``torch.unique``'s count was, once per layer and backward). Repeated indices, in any order, still
    get their own values in their order, and no indices give none."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    grad_out, x = randn(4, 6), randn(4, 5, seed=2)
    indices = torch.tensor([29, 0, 7, 7, 13, 0])
    csr = ops.csr_pattern(indices, (6, 5))
    with Recorder() as recorder:
        values = ops.sddmm(grad_out, x, indices, csr=csr, backend="triton")
    assert not recorder.names & {"_local_scalar_dense", "item", "sort", "_unique2", "unique_consecutive", "nonzero"}
    expected = (grad_out[:, indices // 5].double() * x[:, indices % 5].double()).sum(0)
    assert rel_err(values.double(), expected) < TOL[torch.float32] and values[2] == values[3] and values[1] == values[5]
    assert torch.equal(ops.sddmm(grad_out, x, indices, backend="triton"), values)
    empty = indices[:0]
    assert ops.sddmm(grad_out, x, empty, csr=ops.csr_pattern(empty, (6, 5)), backend="triton").shape == (0,)


def test_sddmm_twin_takes_tokens_in_chunks_that_fit_in_cache(monkeypatch):
    """fp32 ``sampled_addmm`` a chunk of tokens at a time (``token_chunk``: here 64 of 150, so three
    calls); the chunks' sum is the dense product's values, and no tokens give zeros."""
    import sparse_peft.functional.sddmm as twin

    assert twin.token_chunk(8192, torch.float32) == 128 and twin.token_chunk(1024, torch.float32) == 1024
    monkeypatch.setattr(twin, "SAMPLED_CHUNK_BYTES", 1)  # the 64-token floor
    calls = []
    real = torch.sparse.sampled_addmm
    monkeypatch.setattr(torch.sparse, "sampled_addmm", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    grad_out, x = randn(150, 70), randn(150, 45, seed=2)
    indices = torch.randint(0, 70 * 45, (300,), generator=torch.Generator().manual_seed(3))
    values = ops.sddmm(grad_out, x, indices, backend="torch")
    dense = (grad_out.double().t() @ x.double()).reshape(-1)[indices]
    assert [shape[1] for shape in calls] == [64, 64, 22] and rel_err(values.double(), dense) < TOL[torch.float32]
    empty = ops.sddmm(grad_out[:0], x[:0], indices, backend="torch")
    assert empty.shape == (300,) and not empty.any()


def test_seft_takes_its_delta_gradient_from_ops_sddmm(monkeypatch):
    """SEFT's layer leaves the backend to sp.ops and hands it the CSR form of the positions it keeps."""
    peft_model = get_peft_model(pruned_tiny_model("llama", 0.5), sp.SEFTConfig(density=0.05))
    calls = []
    real = ops.sddmm

    def spy(grad_out, x, indices, **kwargs):
        calls.append(kwargs)
        assert torch.equal(kwargs["csr"].col, ops.csr_pattern(indices, (grad_out.shape[1], x.shape[1])).col)
        return real(grad_out, x, indices, **kwargs)

    monkeypatch.setattr(ops, "sddmm", spy)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    deltas = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    assert calls and len(calls) == len(deltas) and all(k.get("backend") is None for k in calls)
    assert all(p.grad is not None for p in deltas)


def test_sddmm_reference_gradcheck():
    """The reference is differentiable (a sampled matmul): gradcheck in float64."""
    indices = torch.tensor([0, 7, 3, 11, 7])
    grad_out = randn(3, 4, dtype=torch.float64, requires_grad=True)
    x = randn(3, 3, dtype=torch.float64, seed=2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, v: ops.sddmm_reference(g, v, indices), (grad_out, x))


# --- masked_linear ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,out_features,in_features", [((3, 7), 70, 45), ((1,), 33, 97)])
def test_masked_linear_matches_reference(dtype, tokens, out_features, in_features):
    mask = sparse_weight((out_features, in_features), sparsity=0.7) != 0
    weight = randn(out_features, in_features, dtype=dtype, seed=2, requires_grad=True)  # dense off the mask too
    bias = randn(out_features, dtype=dtype, seed=3, requires_grad=True)
    x = randn(*tokens, in_features, dtype=dtype, seed=4, requires_grad=True)
    results = {}
    for backend in ("triton", "torch"):
        y = ops.masked_linear(x, weight, mask, bias, backend=backend)
        grads = torch.autograd.grad(y, (x, weight, bias), randn(*y.shape, dtype=dtype, seed=5))
        results[backend] = (y, *grads)
    for name, got, want in zip(("y", "dx", "dW", "dbias"), results["triton"], results["torch"]):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert_close(got, want, dtype, name)
    grad_weight = results["triton"][2]
    assert torch.all(grad_weight[~mask] == 0)  # exactly zero off the mask
    assert torch.count_nonzero(grad_weight[mask]) > 0


def test_masked_linear_ignores_weights_off_the_mask_and_checks_the_mask():
    mask = sparse_weight((16, 24), sparsity=0.5) != 0
    weight = randn(16, 24, seed=2)
    x = randn(5, 24, seed=3)
    y = ops.masked_linear(x, weight, mask, backend="triton")
    assert torch.allclose(y, F.linear(x, weight * mask), atol=1e-5)
    with pytest.raises(ValueError, match=r"mask must be bool of the weight's shape \(16, 24\)"):
        ops.masked_linear(x, weight, mask.float(), backend="triton")


def test_masked_linear_reference_gradcheck():
    mask = sparse_weight((5, 4), sparsity=0.5) != 0
    weight = randn(5, 4, dtype=torch.float64, requires_grad=True)
    x = randn(3, 4, dtype=torch.float64, seed=2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, w: ops.masked_linear_reference(v, w, mask), (x, weight))


# --- bitmask_linear ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", [1, 7, 16])
def test_bitmask_decode_matches_reference(dtype, tokens, monkeypatch):
    weight = sparse_weight((70, 45), sparsity=0.7, dtype=dtype)  # in = 45: a partial last byte
    weight[3] = 0  # an empty row
    packed = ops.pack_bitmask(weight)
    bias = randn(70, dtype=dtype, seed=2)
    x = randn(tokens, 45, dtype=dtype, seed=3)
    expected = ops.bitmask_linear_reference(x, packed, bias)
    from sparse_peft.kernels import bitmask_linear as kernel_module

    def no_unpack(_packed):
        raise AssertionError("the decode path must not unpack the weight")

    monkeypatch.setattr(kernel_module, "unpack_bitmask", no_unpack)
    y = ops.bitmask_linear(x, packed, bias, backend="triton")
    assert y.shape == (tokens, 70) and y.dtype == dtype
    assert_close(y, expected, dtype, "bitmask decode")


def test_bitmask_linear_more_tokens_and_gradients():
    weight = sparse_weight((24, 40), sparsity=0.9)
    packed = ops.pack_bitmask(weight)
    x = randn(3, 9, 40, requires_grad=True)  # 27 tokens: unpacked once, dense GEMM
    y = ops.bitmask_linear(x, packed, backend="triton")
    assert torch.allclose(y, F.linear(x, weight), atol=1e-5)
    x_small = randn(2, 40, seed=2, requires_grad=True)
    grad, = torch.autograd.grad(ops.bitmask_linear(x_small, packed, backend="triton").sum(), x_small)
    grad_ref, = torch.autograd.grad(F.linear(x_small, weight).sum(), x_small)
    assert torch.allclose(grad, grad_ref, atol=1e-5)
    x64 = randn(2, 40, dtype=torch.float64, seed=3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: ops.bitmask_linear_reference(v, packed.to(dtype=torch.float64)), (x64,))


def test_bitmask_linear_rejects_bad_input():
    packed = ops.pack_bitmask(sparse_weight((8, 12)))
    with pytest.raises(ValueError, match=r"x has 10 features.*expects 12"):
        ops.bitmask_linear(randn(2, 10), packed, backend="triton")
    with pytest.raises(ValueError, match="share a dtype"):
        ops.bitmask_linear(randn(2, 12, dtype=torch.float16), packed, backend="torch")
    with pytest.raises(ValueError, match="PackedBitmask"):
        ops.bitmask_linear(randn(2, 12), sparse_weight((8, 12)), backend="triton")


# --- dispatch and 2:4 -------------------------------------------------------------------------------


def test_dispatch_order_keyword_then_env_then_device(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("SPARSE_PEFT_BACKEND", raising=False)
    assert ops.resolve_backend(None, cpu) == "torch"
    assert ops.resolve_backend(None, torch.device("cuda")) == "triton"
    monkeypatch.setenv("SPARSE_PEFT_BACKEND", "triton")
    assert ops.resolve_backend(None, cpu) == "triton"
    assert ops.resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv("SPARSE_PEFT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SPARSE_PEFT_BACKEND must be .*'cuda'"):
        ops.resolve_backend(None, cpu)
    with pytest.raises(ValueError, match="backend must be .*'fast'"):
        ops.resolve_backend("fast", cpu)
    monkeypatch.setenv("SPARSE_PEFT_BACKEND", "triton")
    assert not ops.runs_torch_twin(cpu)
    monkeypatch.setenv("SPARSE_PEFT_BACKEND", "torch")
    assert ops.runs_torch_twin(cpu) and ops.runs_torch_twin(torch.device("cuda"))
    monkeypatch.delenv("SPARSE_PEFT_BACKEND")
    assert ops.runs_torch_twin(cpu) and not ops.runs_torch_twin(torch.device("cuda"))


def test_env_var_routes_to_the_kernel(monkeypatch):
    from sparse_peft.kernels import masked_linear as kernel_module

    calls = []
    real = kernel_module.masked_linear
    monkeypatch.setattr(kernel_module, "masked_linear", lambda *a: calls.append(1) or real(*a))
    x, weight = randn(2, 8), randn(4, 8, seed=2)
    mask = weight > 0
    monkeypatch.delenv("SPARSE_PEFT_BACKEND", raising=False)
    ops.masked_linear(x, weight, mask)
    assert calls == []  # CPU tensors: the reference
    monkeypatch.setenv("SPARSE_PEFT_BACKEND", "triton")
    ops.masked_linear(x, weight, mask)
    assert calls == [1]
    ops.masked_linear(x, weight, mask, backend="torch")
    assert calls == [1]


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.sddmm(randn(2, 3), randn(2, 4), torch.tensor([1]), backend="triton")


def test_kernels_reject_float64():
    with pytest.raises(ValueError, match="float64.*backend='torch'"):
        ops.masked_linear(randn(2, 4, dtype=torch.float64), randn(3, 4, dtype=torch.float64),
                          torch.ones(3, 4, dtype=torch.bool), backend="triton")


def test_semi_structured_falls_back_to_dense_on_cpu():
    weight = torch.randn(8, 16)
    weight.view(8, 4, 4)[:, :, 2:] = 0  # 2:4
    assert "cpu" in ops.semi_structured_unsupported_reason(weight)
    assert ops.to_semi_structured(weight) is weight
    x = randn(3, 5, 16)
    for backend in ("triton", "torch"):
        assert torch.allclose(ops.semi_structured_linear(x, weight, backend=backend), F.linear(x, weight))
