"""Compressed sparse checkpoints: bit-exact round trips, sizes on disk, and damaged files refused."""

import json
import struct

import pytest
import torch
from conftest import IDS, ARCHS, linear_masks, assert_masks_equal, logits, make_tiny_model, pruned_tiny_model
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import sparse_peft as sp
from sparse_peft.io import FORMAT_FILE, WEIGHTS_FILE, BitmaskLinear, checkpoint_bytes

KB = 1024


def int_view(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_state_bit_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, f"{name}: dtype {sa[name].dtype} vs {sb[name].dtype}"
        assert torch.equal(int_view(sa[name]), int_view(sb[name])), f"{name}: bits differ"


def tensor_offsets(path):
    """name -> (start, end) byte range of each tensor in a safetensors file."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    base = 8 + header_len
    return {k: (base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"}


def flip_byte(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.fixture
def saved(tmp_path):
    model = pruned_tiny_model("llama", 0.5).to(torch.bfloat16)
    sp.save_sparse(model, tmp_path / "ckpt", show_progress=False)
    return model, tmp_path / "ckpt"


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_bit_exact_every_arch(arch, tmp_path):
    model = pruned_tiny_model(arch, 0.5).to(torch.bfloat16)
    masks = linear_masks(model)
    record = sp.save_sparse(model, tmp_path, show_progress=False)
    assert record["layers"] and all(info["layout"] == "bitmask" for info in record["layers"].values())
    loaded = sp.load_sparse(tmp_path, show_progress=False)
    assert type(loaded) is type(model)
    assert_state_bit_identical(model, loaded)
    assert_masks_equal(loaded, masks)
    # Same model as the ordinary dense export loaded by transformers (buffers included).
    sp.export_dense(model, tmp_path / "dense")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert torch.equal(logits(loaded), logits(reference))
    tied = getattr(model.config, "tie_word_embeddings", False)
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied


def test_round_trip_fp32_and_nm(tmp_path):
    model = make_tiny_model("qwen2")
    sp.prune(model, method="magnitude", pattern="2:4", show_progress=False)
    record = sp.save_sparse(model, tmp_path, show_progress=False)
    assert {info["pattern"] for info in record["layers"].values()} == {"2:4"}
    assert {info["dtype"] for info in record["layers"].values()} == {"float32"}
    loaded = sp.load_sparse(tmp_path, show_progress=False)
    assert_state_bit_identical(model, loaded)
    assert all(sp.is_nm_sparse(m.weight, 2, 4) for _, m in sp.sparsity.named_linears(loaded))


def test_dense_layers_are_stored_as_is(tmp_path):
    model = pruned_tiny_model("llama", 0.5)
    dense_name = "model.layers.0.mlp.down_proj"
    with torch.no_grad():
        model.get_submodule(dense_name).weight.add_(1e-3).abs_().add_(1e-3)  # fully dense
    record = sp.save_sparse(model, tmp_path, show_progress=False)
    assert dense_name + ".weight" not in record["layers"]
    assert "model.layers.0.mlp.up_proj.weight" in record["layers"]
    assert_state_bit_identical(model, sp.load_sparse(tmp_path, show_progress=False))


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_size_on_disk_within_bound(sparsity, tmp_path):
    model = pruned_tiny_model("llama", sparsity, hidden=128).to(torch.bfloat16)
    sp.save_sparse(model, tmp_path, show_progress=False)
    sizes = checkpoint_bytes(tmp_path)
    dense = sum(2 * m.weight.numel() for _, m in sp.sparsity.named_linears(model))
    assert sizes["dense_bf16_linears"] == dense
    bound = (2 * (1 - sparsity) + 1 / 8) / 2 * dense
    assert sizes["packed_linears"] <= bound + 1
    # What the file really takes beyond the non-linear tensors (header included).
    assert sizes["file"] - sizes["other_tensors"] <= bound + 8 * KB
    assert sizes["file"] - sizes["other_tensors"] <= {0.5: 0.57, 0.7: 0.37}[sparsity] * dense + 8 * KB


def test_packed_load_keeps_bitmask_layers(saved, monkeypatch):
    model, path = saved
    plain = sp.load_sparse(path, show_progress=False)
    packed = sp.load_sparse(path, packed=True, show_progress=False)
    packed_layers = {n: m for n, m in packed.named_modules() if isinstance(m, BitmaskLinear)}
    assert set(packed_layers) == {n for n, _ in sp.sparsity.named_linears(model)}
    for name, layer in packed_layers.items():
        expected = model.get_submodule(name).weight
        assert layer.packed.nnz == int((expected != 0).sum())
        assert torch.equal(int_view(layer.to_linear().weight), int_view(expected))
    assert torch.equal(logits(packed), logits(plain))
    # without the decode cache every call goes through sp.ops.bitmask_linear (which picks the backend)
    calls, real = [], sp.ops.bitmask_linear
    monkeypatch.setattr(sp.ops, "bitmask_linear", lambda *args: calls.append(1) or real(*args))
    sp.set_decode_cache(packed, False)
    assert torch.equal(logits(packed), logits(plain)) and len(calls) == len(packed_layers)
    # A packed model saves again to the same checkpoint content and exports densely.
    sp.save_sparse(packed, path / "again", show_progress=False)
    assert_state_bit_identical(model, sp.load_sparse(path / "again", show_progress=False))
    sp.export_dense(packed, path / "dense")
    assert isinstance(packed.model.layers[0].self_attn.q_proj, BitmaskLinear)  # caller's model untouched
    assert_state_bit_identical(model, AutoModelForCausalLM.from_pretrained(path / "dense"))


def test_export_dense_keeps_zeros(tmp_path):
    model = pruned_tiny_model("gpt_neox", 0.7)
    sp.export_dense(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_state_bit_identical(model, loaded)
    assert abs(sp.sparsity_report(loaded).global_sparsity - 0.7) < 0.01
    assert not (tmp_path / FORMAT_FILE).exists()


def test_tokenizer_saved_beside_the_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["[UNK]"] + list("abcdefgh "))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    sp.save_sparse(pruned_tiny_model("llama", 0.5), tmp_path, tokenizer=tokenizer, show_progress=False)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("bad cafe")["input_ids"] == tokenizer("bad cafe")["input_ids"]


# --- damaged or mismatched checkpoints are refused ----------------------------------------------------

def test_truncated_file(saved):
    _, path = saved
    weights = path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        sp.load_sparse(path, show_progress=False)


def test_flipped_byte_fails_checksum(saved):
    _, path = saved
    name = "model.layers.1.mlp.up_proj.weight.sparse_values"
    flip_byte(path / WEIGHTS_FILE, tensor_offsets(path / WEIGHTS_FILE)[name][0] + 3)
    with pytest.raises(ValueError, match=f"{WEIGHTS_FILE}.*SHA-256.*corrupted"):
        sp.load_sparse(path, show_progress=False)


def test_flipped_bit_in_mask_caught_without_checksum(saved):
    _, path = saved
    name = "model.layers.0.self_attn.k_proj.weight.sparse_bits"
    flip_byte(path / WEIGHTS_FILE, tensor_offsets(path / WEIGHTS_FILE)[name][0])
    with pytest.raises(ValueError, match="k_proj.*bits mark"):
        sp.load_sparse(path, verify_checksum=False, show_progress=False)


def test_damaged_header(saved):
    _, path = saved
    weights = path / WEIGHTS_FILE
    raw = bytearray(weights.read_bytes())
    raw[0:8] = struct.pack("<Q", 10**9)  # header length past the end of the file
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="safetensors"):
        sp.load_sparse(path, verify_checksum=False, show_progress=False)


def edit_format(path, edit):
    record = json.loads((path / FORMAT_FILE).read_text())
    edit(record)
    (path / FORMAT_FILE).write_text(json.dumps(record))


def test_wrong_version_and_format(saved):
    _, path = saved
    edit_format(path, lambda r: r.update(version=99))
    with pytest.raises(ValueError, match="version 99"):
        sp.load_sparse(path, show_progress=False)
    edit_format(path, lambda r: r.update(version=1, format="something-else"))
    with pytest.raises(ValueError, match="something-else"):
        sp.load_sparse(path, show_progress=False)
    (path / FORMAT_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sp.load_sparse(path, show_progress=False)
    (path / FORMAT_FILE).unlink()
    with pytest.raises(ValueError, match="not a sparse-peft checkpoint"):
        sp.load_sparse(path, show_progress=False)


def test_nnz_mismatch(saved):
    _, path = saved
    name = "model.layers.1.self_attn.o_proj.weight"
    edit_format(path, lambda r: r["layers"][name].update(nnz=r["layers"][name]["nnz"] + 1))
    with pytest.raises(ValueError, match=r"o_proj.*nnz=\d+"):
        sp.load_sparse(path, show_progress=False)


def test_shape_mismatch_with_config(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mlp.*\(128, 64\).*\(96, 64\)"):
        sp.load_sparse(path, show_progress=False)


def test_peft_model_must_be_merged(tmp_path):
    peft_model = get_peft_model(pruned_tiny_model("llama", 0.5), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge"):
        sp.save_sparse(peft_model, tmp_path)
    with pytest.raises(ValueError, match="merge"):
        sp.export_dense(peft_model, tmp_path)
