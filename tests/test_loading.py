"""Every documented way of loading an adapter refuses one trained on another pruned base, naming the layer."""

import pytest
import torch
from peft import PeftModel, get_peft_model

import sparse_peft as sp
from conftest import logits, pruned_tiny_model, train_steps

CONFIGS = {
    "masked_lora": lambda: sp.MaskedLoraConfig(r=4),
    "spp": lambda: sp.SPPConfig(r=4),
    "seft": lambda: sp.SEFTConfig(density=0.05),
    "spt": lambda: sp.SPTConfig(base_prompt_length=4),
}
# What each method's refusal names: the wrapped linear (transformers loads in its own order, so any
# of them), or the decoder layer whose attention SPT wraps.
LINEAR = r"at layer 'model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj'"
LAYER = {"masked_lora": LINEAR, "spp": LINEAR, "seft": LINEAR, "spt": r"at decoder layer \d+"}


def load_with_transformers(base, path):
    base.load_adapter(str(path))
    return base


def load_with_peft_from_pretrained(base, path):
    return PeftModel.from_pretrained(base, path)


def load_with_peft_load_adapter(base, path, method):
    # A PeftModel that already has an adapter of the same method, trained on this base.
    peft_model = get_peft_model(base, CONFIGS[method]())
    peft_model.load_adapter(str(path), adapter_name="loaded")
    return peft_model


ROUTES = {
    "transformers_load_adapter": lambda base, path, method: load_with_transformers(base, path),
    "PeftModel.from_pretrained": lambda base, path, method: load_with_peft_from_pretrained(base, path),
    "peft_model.load_adapter": load_with_peft_load_adapter,
}


@pytest.fixture(params=sorted(CONFIGS))
def saved_adapter(request, tmp_path):
    """An adapter trained a little on a 50%-sparse llama, saved to ``tmp_path``."""
    method = request.param
    peft_model = get_peft_model(pruned_tiny_model("llama", 0.5), CONFIGS[method]())
    if method != "seft":  # SEFT trains through its own step; its saved state is what matters here
        train_steps(peft_model, steps=1)
    peft_model.save_pretrained(tmp_path)
    return method, tmp_path, logits(peft_model)


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_an_adapter_from_another_pruned_base_is_refused_on_every_route(saved_adapter, route):
    method, path, _ = saved_adapter
    other = pruned_tiny_model("llama", 0.7)  # same shapes, another mask
    weights = [(p, p.detach().clone()) for p in other.parameters()]
    with pytest.raises(ValueError, match=rf"does not fit this base model {LAYER[method]}"):
        ROUTES[route](other, path, method)
    assert all(torch.equal(p, before) for p, before in weights)  # the base weights are never touched


def test_transformers_load_adapter_onto_the_matching_base_loads(saved_adapter):
    _, path, expected = saved_adapter
    plain = load_with_transformers(pruned_tiny_model("llama", 0.5), path)
    assert torch.allclose(logits(plain), expected, atol=1e-5)
