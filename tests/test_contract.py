"""The promises every sparse-peft method keeps, on every architecture it supports.

``METHODS`` has one row per method: how to build its config and train it, and what it documents
where methods differ (how exact its unmerge is, what it does on a dense base, whether it merges
at all). Each test below is one promise, run over every method x architecture. A method that does
not apply to an architecture or a promise says why in its row, and the case is skipped with that
reason. A new method joins every check with one row.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import conftest
import pytest
import torch
from conftest import IDS, assert_masks_equal, linear_masks, logits, make_tiny_model, rel_err
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

import sparse_peft as sp
from sparse_peft.sparsity.masks import linear_view

# conftest's tiny models (Llama, Qwen2 and Mistral: separate q/k/v/o nn.Linear, gated MLP; GPT-NeoX:
# one fused query_key_value; OPT: out_proj, fc1/fc2, learned positions) and GPT-2, whose linears are
# transformers' Conv1D (fused c_attn, weight stored in x out).
ARCHS = [*conftest.ARCHS, "gpt2"]
STEPS = 3


def every_linear(model) -> set[str]:
    return {name for name, _ in sp.sparsity.named_linears(model)}


def every_attention(model) -> set[str]:
    return {name for name, _ in model.named_modules() if name.endswith(".self_attn")}


def base_layer_masks(peft_model, adapter_name="default"):
    """The merge of a method that keeps the base's mask: the masks of the base, bit for bit."""
    return {name.replace(".base_layer", ""): lin.weight != 0
            for name, lin in sp.sparsity.named_linears(peft_model.get_base_model())}


def evolved_masks(peft_model, adapter_name="default"):
    """SEFT's merge: the topology the adapter evolved to (stored layout), same count per layer."""
    return {name.removeprefix("base_model.model."): layer.merge_target_mask([adapter_name])
            for name, layer in peft_model.named_modules() if isinstance(layer, sp.tuners.seft.SEFTLayer)}


def seft_step(peft_model, optimizer, step, total_steps):
    return sp.seft_step(peft_model, optimizer, step, total_steps=total_steps)


def rounding_of_add_and_subtract(weight, delta):
    """``(W + ΔW) - ΔW`` in the weight's dtype: a rounding of each, relative to ``|W| + |ΔW|``."""
    return 2 * torch.finfo(weight.dtype).eps * (weight.abs() + delta.abs())


def two_ulps(weight, delta):
    """``W ⊙ f / f``: the weight back to within two units in the last place (docs/spp.md)."""
    return 2 * torch.finfo(weight.dtype).eps * weight.abs()


def bit_for_bit(weight, delta):
    """The merge keeps the values it overwrites (docs/seft.md)."""
    return torch.zeros_like(weight)


@dataclass(frozen=True)
class Method:
    name: str
    config: Callable[[], object]
    lr: float
    #: what the adapter wraps in a model: every prunable linear, or each decoder layer's attention
    targets: Callable[[torch.nn.Module], set[str]] = every_linear
    #: run after every optimizer step: (peft_model, optimizer, step, total steps) -> what it changed
    after_step: Optional[Callable] = None
    #: False: merging is refused with an error saying so (the adapter is not a change of any weight)
    merges: bool = True
    #: the masks ``merge_and_unload`` ends with (stored layout), read before merging
    merged_masks: Callable = base_layer_masks
    #: elementwise bound on |unmerged weight - original| given the weight and the merged update
    unmerge_tolerance: Callable = bit_for_bit
    #: what attaching to a dense (unpruned) base does: (Warning or Exception class, message regex)
    dense_base: tuple[type, str] = (UserWarning, "every targeted layer is dense")
    #: how a refused load names a wrapped layer (the tuner layer -> the text the error contains)
    names_layer: Callable[[BaseTunerLayer], str] = lambda layer: f"at layer '{layer.layer_name}'"
    #: architecture or check -> why this method has no such case
    not_applicable: dict[str, str] = field(default_factory=dict)


METHODS = [
    Method("masked_lora", lambda: sp.MaskedLoraConfig(), lr=1e-2, unmerge_tolerance=rounding_of_add_and_subtract),
    Method("spp", lambda: sp.SPPConfig(), lr=5e-2, unmerge_tolerance=two_ulps),
    Method("seft", lambda: sp.SEFTConfig(density=0.05, update_interval=2, grow_window=1, drop_fraction=0.5,
                                         drop_decay="constant"),
           lr=1e-2, after_step=seft_step, merged_masks=evolved_masks),
    # SPT with target_sparsity prunes a dense base itself while it trains (tests/test_spt.py); with
    # the default (None) its prompt lengths follow the base's sparsity, so a dense base is refused.
    Method("spt", lambda: sp.SPTConfig(), lr=5e-2, targets=every_attention, merges=False,
           dense_base=(ValueError, "every decoder layer has sparsity 0: .* prune the model first"),
           names_layer=lambda layer: f"at decoder layer {layer.layer_index}",
           not_applicable={
               "gpt2": "SPT needs separate nn.Linear q/k/v/o projections and rotary queries; GPT-2 has a fused "
                       "Conv1D c_attn and learned positions",
               "gpt_neox": "SPT needs separate k/v projections to project its prompts; GPT-NeoX fuses "
                           "query_key_value and rotates part of each head",
               "opt": "SPT needs rotary queries and the Llama attention signature; OPT has learned absolute "
                      "positions and out_proj",
               "unmerge": "SPT never merges: its prompts are extra attention positions, not a change of any "
                          "weight (merge_adapter raises; the merge check asserts that)",
           }),
]


def cases(check: str):
    """``(method, arch)`` for every row and architecture; a case the row marks not applicable (to
    the architecture or to ``check``) is skipped with the row's reason."""
    params = []
    for method in METHODS:
        for arch in ARCHS:
            reason = method.not_applicable.get(arch) or method.not_applicable.get(check)
            marks = [pytest.mark.skip(reason=f"{method.name}: {reason}")] if reason else []
            params.append(pytest.param(method, arch, id=f"{method.name}-{arch}", marks=marks))
    return params


def unsupported():
    return [pytest.param(method, arch, id=f"{method.name}-{arch}")
            for method in METHODS for arch in ARCHS if arch in method.not_applicable]


def pruned(arch, dtype=torch.float32):
    model = make_tiny_model(arch).to(dtype)
    sp.prune(model, method="magnitude", sparsity=0.5, show_progress=False)
    return model


def attach(method: Method, model):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dense", category=UserWarning)  # a pruned base is not dense
        return get_peft_model(model, method.config())


def tuner_layers(peft_model) -> dict[str, BaseTunerLayer]:
    return {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules()
            if isinstance(m, BaseTunerLayer)}


def train(peft_model, method: Method, steps: int = STEPS):
    """AdamW (no weight decay) on one fixed batch, so the loss must fall. Returns the losses and
    what ``after_step`` changed at each step."""
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=method.lr,
                                  weight_decay=0.0)
    losses, changes = [], []
    peft_model.train()
    for step in range(1, steps + 1):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if method.after_step is not None:
            changes.append(method.after_step(peft_model, optimizer, step, steps))
    peft_model.eval()
    return losses, changes


def check_trained(method: Method, losses, changes):
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    if method.after_step is not None:
        assert any(changes), f"{method.name}'s step hook changed nothing in {STEPS} steps"


@pytest.mark.parametrize("method, arch", cases("merge"))
def test_training_then_merge_keeps_every_zero(method, arch):
    base = pruned(arch)
    masks = linear_masks(base)
    types = {name: type(lin) for name, lin in sp.sparsity.named_linears(base)}
    targets = method.targets(base)
    base_logits = logits(base)
    peft_model = attach(method, base)
    assert set(tuner_layers(peft_model)) == targets
    assert torch.equal(logits(peft_model), base_logits)  # every method starts at the base model
    prefix = peft_model.base_model.prefix
    for name, param in peft_model.named_parameters():
        assert param.requires_grad == (prefix in name), name

    losses, changes = train(peft_model, method)
    check_trained(method, losses, changes)
    trained = logits(peft_model)
    assert rel_err(trained, base_logits) > 1e-4
    if not method.merges:
        with pytest.raises(ValueError, match="cannot merge"):
            peft_model.merge_and_unload()
        assert_masks_equal(peft_model.unload(), masks)  # training never touched the base
        return

    expected = method.merged_masks(peft_model)
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert {name: type(lin) for name, lin in sp.sparsity.named_linears(merged)} == types  # Conv1D stays Conv1D
    for name, lin in sp.sparsity.named_linears(merged):
        weight = lin.weight
        assert torch.equal(weight != 0, expected[name]), name
        assert int((weight != 0).sum()) == int(masks[name].sum()), name  # each layer's sparsity, exactly
        outside = weight[~expected[name]]
        assert (outside == 0).all() and not outside.signbit().any(), name  # +0.0 at every pruned position
    if method.merged_masks is not base_layer_masks:  # a method that moves the topology did move it
        assert any(not torch.equal(expected[name], masks[name]) for name in masks), "the topology never moved"
    assert rel_err(logits(merged), trained) < 1e-4


@pytest.mark.parametrize("method, arch", cases("save_load"))
def test_save_and_load_give_the_same_outputs(method, arch, tmp_path):
    base = pruned(arch)
    fresh = copy.deepcopy(base)
    peft_model = attach(method, base)
    check_trained(method, *train(peft_model, method))
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    saved = load_file(tmp_path / "adapter_model.safetensors")
    prefix = peft_model.base_model.prefix
    assert any(key.endswith(prefix + "fingerprint") for key in saved)

    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(logits(loaded), expected)


@pytest.mark.parametrize("method, arch", cases("fingerprint"))
def test_a_base_with_another_mask_is_refused_naming_the_layer(method, arch, tmp_path):
    base = pruned(arch)
    # The same weights pruned 2:4: every layer keeps as many weights as at 50%, at other positions.
    other = make_tiny_model(arch)
    sp.prune(other, method="magnitude", pattern="2:4", show_progress=False)
    other_masks = linear_masks(other)
    for name, mask in linear_masks(base).items():
        assert int(mask.sum()) == int(other_masks[name].sum()) and not torch.equal(mask, other_masks[name]), name
    peft_model = attach(method, base)
    peft_model.save_pretrained(tmp_path)
    layers = tuner_layers(peft_model).values()

    before = [(param, param.detach().clone()) for param in other.parameters()]
    with pytest.raises(ValueError, match="does not fit this base model") as refused:
        PeftModel.from_pretrained(other, tmp_path)
    named = [method.names_layer(layer) for layer in layers if method.names_layer(layer) in str(refused.value)]
    assert named, f"the error names none of the wrapped layers: {refused.value}"
    assert all(torch.equal(param, value) for param, value in before)  # the base is left as it was


@pytest.mark.parametrize("method, arch", cases("unmerge"))
def test_unmerge_restores_the_base_weights(method, arch):
    base = pruned(arch)
    masks = linear_masks(base)
    peft_model = attach(method, base)
    train(peft_model, method)
    trained = logits(peft_model)
    layers = tuner_layers(peft_model)
    originals = {name: linear_view(layer.get_base_layer()).weight.detach().clone() for name, layer in layers.items()}
    deltas = {name: layer.get_delta_weight("default") for name, layer in layers.items()}

    peft_model.merge_adapter()
    assert rel_err(logits(peft_model), trained) < 1e-4
    peft_model.unmerge_adapter()
    exact = True
    for name, layer in layers.items():
        stored = layer.get_base_layer().weight
        assert torch.equal(stored != 0, masks[name]), name
        weight = linear_view(layer.get_base_layer()).weight  # out x in, as the update
        error = (weight - originals[name]).abs()
        bound = method.unmerge_tolerance(originals[name], deltas[name])
        assert (error <= bound).all(), (name, (error - bound).max().item())
        exact = exact and bool((bound == 0).all())
    if exact:
        assert torch.equal(logits(peft_model), trained)
    else:
        assert rel_err(logits(peft_model), trained) < 1e-5


@pytest.mark.parametrize("method, arch", cases("disable"))
def test_disabled_adapter_gives_the_base_outputs(method, arch):
    base = pruned(arch)
    base_logits = logits(base)
    peft_model = attach(method, base)
    train(peft_model, method)
    trained = logits(peft_model)
    assert rel_err(trained, base_logits) > 1e-4
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model), base_logits)
    assert torch.equal(logits(peft_model), trained)
    if method.merges:  # a merged adapter is taken out again while disabled
        peft_model.merge_adapter()
        with peft_model.disable_adapter():
            assert rel_err(logits(peft_model), base_logits) < 1e-5


@pytest.mark.parametrize("method, arch", cases("bf16"))
def test_bf16_training_keeps_every_zero_and_merge_keeps_the_sparsity(method, arch):
    base = pruned(arch, torch.bfloat16)
    masks = linear_masks(base)
    base_logits = logits(base)
    peft_model = attach(method, base)
    losses, changes = train(peft_model, method)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    if method.after_step is not None:
        assert any(changes), f"{method.name}'s step hook changed nothing in {STEPS} steps"
    with torch.no_grad():
        out = peft_model(input_ids=IDS).logits
    assert out.dtype == torch.bfloat16 and not torch.equal(out.float(), base_logits)
    for name, mask in base_layer_masks(peft_model).items():  # the base keeps every zero while training
        assert torch.equal(mask, masks[name]), name
    if not method.merges:
        return
    expected = method.merged_masks(peft_model)
    merged = peft_model.merge_and_unload()
    for name, lin in sp.sparsity.named_linears(merged):
        assert lin.weight.dtype == torch.bfloat16, name
        assert torch.equal(lin.weight != 0, expected[name]), name
        assert int((lin.weight != 0).sum()) == int(masks[name].sum()), name


@pytest.mark.parametrize("method, arch", cases("dense_base"))
def test_a_dense_base(method, arch):
    kind, message = method.dense_base
    if issubclass(kind, Warning):
        with pytest.warns(kind, match=message):
            get_peft_model(make_tiny_model(arch), method.config())
    else:
        with pytest.raises(kind, match=message):
            get_peft_model(make_tiny_model(arch), method.config())
    attach(method, pruned(arch))  # and a pruned base attaches without that warning


@pytest.mark.parametrize("method, arch", unsupported())
def test_an_architecture_a_method_does_not_support_is_refused(method, arch):
    """What a row marks not applicable is refused loudly, naming the architecture, not run wrongly."""
    with pytest.raises((TypeError, ValueError), match=arch):
        get_peft_model(pruned(arch), method.config())
