"""sp.method_config (a peft config from a method name) and sp.parse_target (a target written as text)."""

import pytest
from peft import LoraConfig, get_peft_model
from conftest import make_tiny_model

import sparse_peft as sp


@pytest.mark.parametrize("text, expected", [
    ("0.5", {"sparsity": 0.5}), ("50%", {"sparsity": 0.5}), (" 70% ", {"sparsity": 0.7}), (0.7, {"sparsity": 0.7}),
    ("0", {"sparsity": 0.0}), ("2:4", {"pattern": "2:4"}), (" 02:8", {"pattern": "2:8"}),
])
def test_parse_target_reads_fractions_percentages_and_patterns(text, expected):
    assert sp.parse_target(text) == expected


@pytest.mark.parametrize("text", ["1.5", "100%", "-0.1", "abc", "", "nan", "4:2", "2:4:8", "a:b", True])
def test_parse_target_refuses_bad_input_naming_it(text):
    with pytest.raises(ValueError) as error:
        sp.parse_target(text)
    assert repr(text) in str(error.value)


def test_parse_target_output_is_what_prune_takes():
    model = make_tiny_model("llama")
    report = sp.prune(model, method="magnitude", **sp.parse_target("2:4"))
    assert all(sp.is_nm_sparse(layer.weight, 2, 4) for _, layer in sp.sparsity.named_linears(model))
    report = sp.prune(make_tiny_model("llama"), method="magnitude", **sp.parse_target("60%"))
    assert report.global_sparsity == pytest.approx(0.6, abs=0.01)


def test_method_config_builds_each_method_with_its_options():
    lora = sp.method_config("lora", r=4)
    assert isinstance(lora, LoraConfig) and (lora.r, lora.lora_alpha) == (4, 8) and lora.target_modules == "all-linear"
    assert sp.method_config("lora", r=4, lora_alpha=3, target_modules=["q_proj"]).lora_alpha == 3
    masked = sp.method_config("masked_lora", r=16, lora_alpha=None)
    assert isinstance(masked, sp.MaskedLoraConfig) and masked.lora_alpha == 32
    spp = sp.method_config("spp", r=4, alpha=2.0)
    assert isinstance(spp, sp.SPPConfig) and (spp.r, spp.alpha) == (4, 2.0)
    seft = sp.method_config("seft", density=0.1, update_interval=5)
    assert isinstance(seft, sp.SEFTConfig) and (seft.density, seft.update_interval) == (0.1, 5)
    spt = sp.method_config("spt", target_pattern="2:4", base_prompt_length=2)
    assert isinstance(spt, sp.SPTConfig) and spt.target_sparsity == 0.5
    model = make_tiny_model("llama")
    sp.prune(model, method="magnitude", sparsity=0.5)
    peft_model = get_peft_model(model, sp.method_config("masked_lora", r=2))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) > 0


def test_method_config_names_an_unknown_method_or_option():
    with pytest.raises(ValueError, match=r"unknown method 'qlora'; choose from lora, masked_lora, spp, seft, spt"):
        sp.method_config("qlora")
    with pytest.raises(ValueError, match=r"method_config\('spp'\): unknown option 'rank'; SPPConfig takes .*\br\b"):
        sp.method_config("spp", rank=8)
    with pytest.raises(ValueError, match="density"):  # the config itself checks the values
        sp.method_config("seft", density=2.0)
