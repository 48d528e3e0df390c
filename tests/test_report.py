import json
import struct
import sys

import pytest
import torch

from sparse_peft.sparsity import SparsityReport, sparsity_report


def _zero_first(weight, count):
    with torch.no_grad():
        weight.view(-1)[:count] = 0.0


def test_hand_counts(tiny_model):
    model = tiny_model("llama")
    q = model.model.layers[0].self_attn.q_proj.weight
    down = model.model.layers[1].mlp.down_proj.weight
    _zero_first(q, 100)
    _zero_first(down, 1000)
    report = sparsity_report(model)
    assert isinstance(report, SparsityReport)

    expected_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert list(report.layers) == expected_names
    q_rec = report.layers["model.layers.0.self_attn.q_proj"]
    assert (q_rec.numel, q_rec.zeros) == (q.numel(), 100)
    assert q_rec.sparsity == 100 / q.numel()
    assert report.layers["model.layers.1.mlp.down_proj"].zeros == 1000
    total = sum(m.weight.numel() for n, m in model.named_modules() if n in expected_names)
    assert report.numel == total and report.zeros == 1100
    assert report.global_sparsity == 1100 / total


def test_pattern_detection(tiny_model):
    model = tiny_model("llama")
    layers = model.model.layers[0]
    with torch.no_grad():
        w = layers.self_attn.q_proj.weight  # 2:4: zero the last two of every group of four
        w.view(w.shape[0], -1, 4)[..., 2:] = 0
        w = layers.self_attn.k_proj.weight  # 4:8 but not 2:4: zero the last four of every eight
        w.view(w.shape[0], -1, 8)[..., 4:] = 0
        layers.self_attn.v_proj.weight.view(-1)[:3] = 0  # unstructured
    report = sparsity_report(model)
    assert report.layers["model.layers.0.self_attn.q_proj"].pattern == "2:4"
    assert report.layers["model.layers.0.self_attn.k_proj"].pattern == "4:8"
    assert report.layers["model.layers.0.self_attn.v_proj"].pattern is None
    assert report.layers["model.layers.0.self_attn.o_proj"].pattern is None  # dense


def test_dict_markdown_repr(tiny_model):
    model = tiny_model("opt")
    _zero_first(model.model.decoder.layers[0].fc1.weight, 7)
    report = sparsity_report(model)
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["zeros"] == 7 and as_dict["global_sparsity"] == report.global_sparsity
    assert as_dict["layers"]["model.decoder.layers.0.fc1"]["zeros"] == 7
    markdown = report.to_markdown()
    for name in report.layers:
        assert f"| {name} |" in markdown
    assert "Global sparsity" in markdown and "lm_head" not in markdown
    assert "\n" not in repr(report) and len(repr(report)) < 160 and str(report) == repr(report)


def test_peft_wrapped_model_reports_base_names(tiny_model, arch):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(arch)
    _zero_first(next(m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)).weight, 11)
    plain = sparsity_report(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    wrapped = sparsity_report(peft_model)
    assert list(wrapped.layers) == list(plain.layers)
    assert wrapped.to_dict() == plain.to_dict()
    assert not any("lora" in name or "base_layer" in name for name in wrapped.layers)
    # the inner tuner model (LoraModel) works too, and so does the merged model
    assert list(sparsity_report(peft_model.base_model).layers) == list(plain.layers)
    merged = peft_model.merge_and_unload()
    assert list(sparsity_report(merged).layers) == list(plain.layers)


def test_plot_writes_a_png_sized_by_the_layer_count(tiny_model, tmp_path):
    pytest.importorskip("matplotlib")
    model = tiny_model("llama")
    _zero_first(model.model.layers[0].self_attn.q_proj.weight, 10)
    report = sparsity_report(model)
    path = tmp_path / "layers.png"
    report.plot(path)
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert (width, height) == (round(150 * max(6, 0.18 * len(report.layers))), 600)


def test_plot_without_matplotlib_says_so(tiny_model, tmp_path, monkeypatch):
    report = sparsity_report(tiny_model("llama"))
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import raise ImportError
    with pytest.raises(ImportError, match=r"SparsityReport.plot needs matplotlib.*pip install matplotlib"):
        report.plot(tmp_path / "layers.png")
    assert not (tmp_path / "layers.png").exists()
