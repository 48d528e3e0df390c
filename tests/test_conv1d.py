"""GPT-2-style models, whose linears are transformers' ``Conv1D`` (weight stored in x out, ``y = x W + b``).

Every pruner, the report and every mask-keeping tuner must treat such a layer as the ``nn.Linear`` it
stands for: rows are outputs, N:M groups run along consecutive inputs. The reference is the "linear
twin": the same model with every ``Conv1D`` replaced by an ``nn.Linear`` holding ``Wᵀ``.
"""

import copy

import pytest
import torch
from conftest import calibration_batches, linear_masks, logits, make_tiny_model, rel_err
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import sparse_peft as sp
from sparse_peft.cli import main
from sparse_peft.tuners.masked_lora import MaskedLoraLayer
from sparse_peft.tuners.seft import SEFTLayer
from sparse_peft.tuners.spp import SPPLayer

LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LAYER_CLS = {"masked_lora": MaskedLoraLayer, "spp": SPPLayer, "seft": SEFTLayer}
FINGERPRINT = {"masked_lora": "masked_lora_fingerprint", "spp": "spp_fingerprint", "seft": "seft_fingerprint"}


def make_gpt2(seed: int = 0):
    return make_tiny_model("gpt2", seed=seed)


def linear_twin(model):
    """A copy of ``model`` with every Conv1D replaced by the equivalent nn.Linear (weight ``Wᵀ``)."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, Conv1D):
            linear = nn.Linear(module.nx, module.nf)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, linear)
    return twin


def pruned_gpt2(sparsity=0.5, pattern=None):
    model = make_gpt2()
    sp.prune(model, method="magnitude", sparsity=None if pattern else sparsity, pattern=pattern, show_progress=False)
    return model


def conv1d_names(model):
    return [name for name, m in model.named_modules() if isinstance(m, Conv1D)]


def make_config(method, twin_check=False):
    """Adapters that change the model from step 0 (``twin_check``) or start at the base model."""
    if method == "masked_lora":
        return sp.MaskedLoraConfig(r=4, init_lora_weights=not twin_check)
    if method == "spp":
        return sp.SPPConfig(r=4, init_b_zero=not twin_check)
    return sp.SEFTConfig(density=0.05, update_interval=2, grow_window=1, drop_decay="constant")


def train(peft_model, method, steps=4, seed=0):
    """AdamW steps of next-token loss (SEFT: with ``seft_step`` after each); returns the losses and SEFT's updates."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses, updates = [], []
    peft_model.train()
    for step in range(1, steps + 1):
        ids = torch.randint(0, 128, (2, 12), generator=g)
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if method == "seft":
            changes = sp.seft_step(peft_model, optimizer, step, total_steps=steps)
            if changes:
                updates.append(changes)
    peft_model.eval()
    return losses, updates


# --- pruning ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(pattern="2:4")], ids=["50%", "2:4"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_conv1d_like_its_linear_twin(method, target):
    model = make_gpt2()
    twin = linear_twin(model)
    assert torch.equal(logits(model), logits(twin))  # the twin is the same function
    calibration = calibration_batches(n=2)
    report = sp.prune(model, method=method, calibration=calibration, show_progress=False, **target)
    twin_report = sp.prune(twin, method=method, calibration=calibration, show_progress=False, **target)

    names = [f"transformer.h.{i}.{layer}" for i in range(2) for layer in LAYERS]
    assert list(report.layers) == names  # every Conv1D is seen, the head is not
    for name in names:
        layer, conv = report.layers[name], model.get_submodule(name)
        assert layer.shape == tuple(conv.weight.T.shape)  # reported out x in, like nn.Linear
        assert layer.zeros == conv.weight.numel() // 2 and layer.sparsity == 0.5, name
        assert layer.pattern == ("2:4" if "pattern" in target else twin_report.layers[name].pattern), name
        assert layer.to_dict() == twin_report.layers[name].to_dict(), name
        kept = conv.weight != 0
        if "pattern" in target:  # 2 of every 4 consecutive inputs: along dim 0 of the stored weight
            assert (kept.reshape(conv.nx // 4, 4, conv.nf).sum(dim=1) == 2).all(), name
        elif method != "sparsegpt":  # compared per output row: every output (a column of the stored weight) loses half
            assert (kept.sum(dim=0) == conv.nx // 2).all(), name
        twin_weight = twin.get_submodule(name).weight
        if method == "magnitude":  # no calibration forward: bit for bit the twin's result
            assert torch.equal(conv.weight.T, twin_weight), name
        else:  # the calibration GEMMs of Conv1D and nn.Linear may round differently in the last bit
            agree = (kept.T == (twin_weight != 0)).float().mean().item()
            assert agree > 0.98, (name, agree)
    assert report.global_sparsity == 0.5


def test_owl_allocates_conv1d_like_its_linear_twin():
    model = make_gpt2()
    twin = linear_twin(model)
    options = dict(method="wanda", sparsity=0.5, allocation="owl", owl_threshold=2.0, owl_lambda=0.1,
                   calibration=calibration_batches(n=2), show_progress=False)
    report, twin_report = sp.prune(model, **options), sp.prune(twin, **options)
    zeros = {name: layer.zeros for name, layer in report.layers.items()}
    assert zeros == {name: layer.zeros for name, layer in twin_report.layers.items()}
    assert len(set(layer.sparsity for layer in report.layers.values())) > 1  # the blocks really differ
    assert report.zeros == report.numel // 2  # the global count is exact


def test_report_sees_conv1d_through_peft_wrapping():
    model = pruned_gpt2(pattern="2:4")
    before = sp.sparsity_report(model).to_dict()
    peft_model = get_peft_model(model, sp.MaskedLoraConfig(r=2))
    assert sp.sparsity_report(peft_model).to_dict() == before
    assert before["global_sparsity"] == 0.5 and len(before["layers"]) == 8


class _HeadOnly(nn.Module):
    """A language model with nothing to prune: embeddings and an output head only."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(128, 16)
        self.lm_head = nn.Linear(16, 128)

    def forward(self, input_ids, **kwargs):
        return self.lm_head(self.embed(input_ids))


def test_nothing_to_prune_is_an_error():
    with pytest.raises(ValueError, match=r"nothing to prune in _HeadOnly: it has no torch.nn.Linear or transformers "
                                         r"Conv1D layer besides the output head"):
        sp.prune(_HeadOnly(), method="magnitude", sparsity=0.5, show_progress=False)


def test_cli_nothing_to_prune_answers_in_one_line(tmp_path, monkeypatch, capsys):
    import sparse_peft.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda path, need_tokenizer=False: (_HeadOnly(), None))
    capsys.readouterr()
    assert main(["prune", "--out", str(tmp_path / "out"), "--method", "magnitude", "--sparsity", "0.5"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "nothing to prune in _HeadOnly" in captured.err
    assert not (tmp_path / "out").exists()


def test_cli_prunes_a_saved_gpt2(tmp_path, capsys):
    make_gpt2().save_pretrained(tmp_path / "base")
    capsys.readouterr()
    assert main(["prune", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "pruned"), "--method",
                 "magnitude", "--sparsity", "0.5"]) == 0
    assert "pruned with magnitude to global sparsity 50.00%" in capsys.readouterr().out
    pruned = sp.load_sparse(tmp_path / "pruned", show_progress=False)
    report = sp.sparsity_report(pruned)
    assert len(report.layers) == 8 and report.global_sparsity == 0.5
    assert all(layer.sparsity == 0.5 for layer in report.layers.values())
    assert torch.equal(logits(pruned), logits(pruned_gpt2()))  # what was saved is what sp.prune makes


# --- tuners -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["masked_lora", "spp", "seft"])
def test_tuner_layer_sees_the_conv1d_out_by_in(method):
    """Training, merge, unmerge, save/load on GPT-2 are in tests/test_contract.py; here the layout."""
    base = pruned_gpt2(0.5)
    masks = linear_masks(base)
    peft_model = get_peft_model(copy.deepcopy(base), make_config(method))
    wrapped = {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules()
               if isinstance(m, LAYER_CLS[method])}
    assert sorted(wrapped) == sorted(conv1d_names(base))  # "all-linear" takes every Conv1D, not the head
    for name, layer in wrapped.items():
        stored = base.get_submodule(name).weight  # in x out
        assert (layer.out_features, layer.in_features) == tuple(stored.T.shape), name
        assert torch.equal(layer.sparsity_mask, masks[name].T), name  # the mask is out x in


@pytest.mark.parametrize("method", ["masked_lora", "spp", "seft"])
def test_tuner_on_conv1d_computes_what_it_computes_on_the_linear_twin(method):
    base = pruned_gpt2(0.5)
    twin = linear_twin(base)
    models = []
    for model in (base, twin):
        torch.manual_seed(0)  # the same adapter initialisation, layer by layer
        models.append(get_peft_model(copy.deepcopy(model), make_config(method, twin_check=True)))
    conv_model, twin_model = models
    for (name, conv_layer), (_, twin_layer) in zip(
            [(n, m) for n, m in conv_model.named_modules() if isinstance(m, LAYER_CLS[method])],
            [(n, m) for n, m in twin_model.named_modules() if isinstance(m, LAYER_CLS[method])]):
        # the fingerprint is of the out x in mask: the same whichever way the base stores its weight
        assert torch.equal(getattr(conv_layer, FINGERPRINT[method])["default"],
                           getattr(twin_layer, FINGERPRINT[method])["default"]), name
        torch.testing.assert_close(conv_layer.get_delta_weight("default"), twin_layer.get_delta_weight("default"))
    if method != "seft":  # the adapters already change the model at step 0
        assert rel_err(logits(conv_model), logits(base)) > 1e-3
    assert rel_err(logits(conv_model), logits(twin_model)) < 1e-5

    train(conv_model, method, steps=2)
    train(twin_model, method, steps=2)
    assert rel_err(logits(conv_model), logits(twin_model)) < 1e-4
    merged, merged_twin = conv_model.merge_and_unload(), twin_model.merge_and_unload()
    for name, conv in sp.sparsity.named_linears(merged):
        linear = merged_twin.get_submodule(name)
        assert torch.equal(conv.weight.T != 0, linear.weight != 0), name
        torch.testing.assert_close(conv.weight.T, linear.weight, rtol=1e-4, atol=1e-5)


def test_merge_and_unload_sparse_keeps_conv1d_masks():
    base = pruned_gpt2(0.5)
    masks = linear_masks(base)
    peft_model = get_peft_model(copy.deepcopy(base), sp.SEFTConfig(density=0.05, update_interval=2, grow_window=1,
                                                                    drop_decay="constant"))
    train(peft_model, "seft")
    evolved = {name.removeprefix("base_model.model."): m.merge_target_mask() for name, m in peft_model.named_modules()
               if isinstance(m, SEFTLayer)}
    trained = logits(peft_model)
    merged, report = sp.merge_and_unload_sparse(peft_model)
    assert report.mean_removed_fraction == 0.0  # nothing SEFT trained falls outside its own mask
    for name, conv in sp.sparsity.named_linears(merged):
        assert torch.equal(conv.weight != 0, evolved[name]), name
        assert int((conv.weight != 0).sum()) == int(masks[name].sum()), name
    assert rel_err(logits(merged), trained) < 1e-4


def test_spp_fused_kernel_reads_the_conv1d_weight_transposed(monkeypatch):
    """The fused path on CUDA passes a Conv1D's weight as its out x in view (what the layer computes
    with); here the Triton kernel runs in the interpreter and must give what the layer's CPU path gives."""
    from sparse_peft import ops
    from sparse_peft.tuners._shared import base_view

    peft_model = get_peft_model(pruned_gpt2(0.5), sp.SPPConfig(r=4, init_b_zero=False))
    layer = peft_model.base_model.model.transformer.h[0].mlp.c_fc
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = layer(x)
        fused = ops.spp_linear(x, base_view(layer).weight, layer.spp_A["default"], layer.spp_b["default"],
                               layer.alpha["default"], layer.get_base_layer().bias, backend="triton")
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)
