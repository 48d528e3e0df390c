"""Decoding from packed checkpoints on the CPU: the decode cache gives the dense model's tokens and
logits, is rebuilt after a move or a cast, can be dropped or switched off; benchmarks/decode.py end
to end on a tiny random Llama. No timings are asserted."""

import copy
import importlib.util
import pickle
import sys
from pathlib import Path

import pytest
import torch
from conftest import IDS, logits, make_tiny_model, pruned_tiny_model

import sparse_peft as sp
from sparse_peft.io import BitmaskLinear

NEW_TOKENS = 12


def greedy(model, new_tokens=NEW_TOKENS):
    with torch.no_grad():
        return model.generate(IDS[:1], attention_mask=torch.ones_like(IDS[:1]), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def packed_layers(model):
    return [m for m in model.modules() if isinstance(m, BitmaskLinear)]


def saved_checkpoint(path, sparsity=None, pattern=None, dtype=torch.float32):
    model = make_tiny_model("llama")
    sp.prune(model, method="magnitude", sparsity=sparsity, pattern=pattern, show_progress=False)
    sp.save_sparse(model.to(dtype), path, show_progress=False)
    return path


@pytest.mark.parametrize("pruning", [{"sparsity": 0.5}, {"pattern": "2:4"}], ids=["50%", "2:4"])
def test_packed_generate_equals_dense(pruning, tmp_path):
    path = saved_checkpoint(tmp_path, **pruning)
    dense = sp.load_sparse(path, show_progress=False)
    packed = sp.load_sparse(path, packed=True, show_progress=False)
    uncached = sp.load_sparse(path, packed=True, decode_cache=False, show_progress=False)
    assert packed_layers(packed) and all(layer.decode_cache_bytes == 0 for layer in packed_layers(packed))
    want = greedy(dense)
    assert torch.equal(greedy(packed), want)
    assert torch.equal(greedy(uncached), want)
    # The cache holds each layer's dense weight, built on its first call; without it nothing is kept.
    dense_linear_bytes = sum(m.weight.numel() * 4 for _, m in sp.sparsity.named_linears(dense))
    assert sp.decode_cache_bytes(packed) == dense_linear_bytes
    assert sp.decode_cache_bytes(uncached) == 0
    # Both paths compute the dense layers' own F.linear: the logits are equal, not just close.
    assert torch.allclose(logits(packed), logits(dense), rtol=0, atol=0)
    assert torch.equal(logits(uncached), logits(dense))


def test_cache_is_dropped_and_rebuilt_after_a_cast_and_a_move(tmp_path):
    path = saved_checkpoint(tmp_path, sparsity=0.5)
    dense = sp.load_sparse(path, show_progress=False)
    packed = sp.load_sparse(path, packed=True, show_progress=False)
    logits(packed)
    assert sp.decode_cache_bytes(packed) > 0
    packed.to(torch.bfloat16)  # casting builds new buffers: the fp32 copies must go
    assert sp.decode_cache_bytes(packed) == 0
    dense.to(torch.bfloat16)
    assert torch.equal(logits(packed), logits(dense))
    layer = packed_layers(packed)[0]
    assert layer._decode_cache.weight.dtype == torch.bfloat16
    packed.to("cpu")  # a move that changes nothing still drops it; the next call decodes again
    assert sp.decode_cache_bytes(packed) == 0
    assert torch.equal(greedy(packed), greedy(dense))


def test_cache_follows_edited_values():
    model = pruned_tiny_model("llama", 0.5)
    layer = BitmaskLinear(sp.ops.pack_bitmask(model.model.layers[0].mlp.up_proj.weight.detach()))
    x = torch.randn(3, layer.in_features)
    before = layer(x)
    with torch.no_grad():
        layer.values.mul_(2)  # in place: the version counter says the copy is stale
    assert torch.allclose(layer(x), 2 * before)
    layer.values = layer.values / 2  # a new tensor in the buffer's place
    assert torch.equal(layer(x), before)


def test_drop_and_switch_off(tmp_path):
    path = saved_checkpoint(tmp_path, sparsity=0.5)
    packed = sp.load_sparse(path, packed=True, show_progress=False)
    want = logits(packed)
    held = sp.decode_cache_bytes(packed)
    assert sp.drop_decode_cache(packed) == held > 0
    assert sp.decode_cache_bytes(packed) == 0
    assert torch.equal(logits(packed), want) and sp.decode_cache_bytes(packed) == held  # rebuilt lazily
    assert sp.set_decode_cache(packed, False) == len(packed_layers(packed))
    assert sp.decode_cache_bytes(packed) == 0
    assert torch.equal(logits(packed), want) and sp.decode_cache_bytes(packed) == 0
    assert "decode_cache=False" in repr(packed_layers(packed)[0])


def test_copies_and_pickles_leave_the_cache_behind(tmp_path):
    path = saved_checkpoint(tmp_path, sparsity=0.5)
    packed = sp.load_sparse(path, packed=True, show_progress=False)
    want = logits(packed)
    for copied in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
        assert sp.decode_cache_bytes(copied) == 0
        assert torch.equal(logits(copied), want)
    assert sp.decode_cache_bytes(packed) > 0  # the original keeps its own


def test_cache_built_under_inference_mode_serves_autograd_later():
    layer = BitmaskLinear(sp.ops.pack_bitmask(pruned_tiny_model("llama", 0.5).model.layers[0].mlp.up_proj.weight.detach()))
    with torch.inference_mode():
        layer(torch.randn(2, layer.in_features))
    x = torch.randn(2, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, layer.to_linear().weight.sum(0).expand_as(x))


def test_mismatched_input_goes_to_the_op_and_its_error():
    layer = BitmaskLinear(sp.ops.pack_bitmask(torch.tensor([[1.0, 0.0], [0.0, 2.0]])))
    with pytest.raises(ValueError, match="share a dtype"):
        layer(torch.ones(1, 2, dtype=torch.float64))
    assert layer.decode_cache_bytes == 0


# --- benchmarks/decode.py end to end on a tiny model -------------------------------------------------

_spec = importlib.util.spec_from_file_location(
    "decode_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "decode.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)

TINY = ["--model", "random", "--hidden", "64", "--intermediate", "128", "--layers", "2", "--vocab", "128",
        "--new-tokens", "6", "--prompt-tokens", "5", "--repeats", "1"]


def test_decode_benchmark_runs_and_checks_tokens(tmp_path, capsys):
    md = tmp_path / "decode.md"
    args = [*TINY, "--sparsities", "0.5", "--variants", "dense,packed,packed-nocache",
            "--markdown", str(md)]
    assert bench.main(args) == 0
    table = md.read_text()
    assert "Command: `python benchmarks/decode.py --model random" in table and "Hardware: " in table
    assert "torch threads 1" in table and "Date: " in table
    for variant in ("dense", "packed", "packed-nocache"):
        assert f"| 50% | {variant} | " in table
    assert table.count("| yes |") == 3 and "**NO**" not in table


def test_decode_benchmark_fails_when_packed_tokens_differ(tmp_path, monkeypatch, capsys):
    real = bench.run_worker

    def one_token_off(job):
        result = real(job)
        if job["variant"] == "packed":
            result["tokens"][2] += 1
        return result

    monkeypatch.setattr(bench, "run_worker", one_token_off)
    assert bench.main([*TINY, "--sparsities", "0.5"]) == 1
    captured = capsys.readouterr()
    assert "**NO**: differ from step 2" in captured.out and "FAILED" in captured.err


def test_near_ties_are_reported_not_failed():
    dense = {"tokens": [1, 2, 3], "gaps": [1.0, 0.01, 1.0]}
    assert bench.same_tokens(dense, {"tokens": [1, 2, 3]}, 0.0) == (True, "yes")
    ok, note = bench.same_tokens(dense, {"tokens": [1, 5, 3]}, 0.05)
    assert ok and "near-tie" in note
    assert not bench.same_tokens(dense, {"tokens": [1, 5, 3]}, 0.0)[0]
    assert not bench.same_tokens(dense, {"tokens": [9, 2, 3]}, 0.05)[0]


@pytest.mark.parametrize("bad", [["--variants", "packed"], ["--variants", "dense,csr"], ["--sparsities", "1.5"],
                                 ["--repeats", "0"]])
def test_decode_benchmark_refuses_bad_arguments(bad, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(bad)
    assert "--" + bad[0].lstrip("-").split()[0] in capsys.readouterr().err
