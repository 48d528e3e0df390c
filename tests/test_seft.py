"""SEFT: a sparse delta whose topology evolves by drop-and-grow while every layer keeps its count.

What every method promises (training then merge, save/load, refusal of another mask, unmerge,
disable, bf16, a dense base) is checked on every architecture in tests/test_contract.py; this
file tests what is special to SEFT.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import IDS, TokenDataset, linear_masks, logits, make_tiny_model, pruned_tiny_model, rel_err
from peft import PeftModel, get_peft_model

import sparse_peft as sp
from sparse_peft.training.seft import drop_fraction_at, seft_summary
from sparse_peft.tuners.seft import SEFTLayer, effective_weight
from sparse_peft.tuners.seft.functional import sparse_delta_linear
from sparse_peft.tuners.seft.functional import grow_within_groups, largest, smallest, smallest_per_group


def seft_layers(model):
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, SEFTLayer)}


def nonzero_counts(masks):
    return {name: int(mask.sum()) for name, mask in masks.items()}


def current_masks(peft_model, adapter="default"):
    return {name: layer.current_mask(adapter) for name, layer in seft_layers(peft_model).items()}


def train_seft(peft_model, steps, lr=1e-2, seed=0, optimizer=None, batch=2):
    """A custom loop: AdamW, then ``seft_step`` after every optimizer step. Returns the updates."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr)
    updates = []
    peft_model.train()
    sp.seft_step(peft_model, optimizer, 0, total_steps=steps)
    for step in range(1, steps + 1):
        ids = torch.randint(0, 128, (batch, 12), generator=g)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        changes = sp.seft_step(peft_model, optimizer, step, total_steps=steps)
        if changes:
            updates.append((step, changes))
    peft_model.eval()
    return updates, optimizer


def test_fifty_steps_topology_evolves_counts_stay(arch):
    """Fifty steps, an update every 10, counts equal, zeros re-grown, merge exact."""
    model = pruned_tiny_model(arch, 0.5)
    start_masks = linear_masks(model)
    base_logits = logits(model)
    peft_model = get_peft_model(model, sp.SEFTConfig(density=0.05, update_interval=10, drop_fraction=0.5))
    assert torch.equal(logits(peft_model), base_logits)  # Δ = 0: unchanged at step 0
    for name, p in peft_model.named_parameters():
        assert p.requires_grad == ("seft_delta" in name), name

    updates, _ = train_seft(peft_model, steps=50)
    assert [step for step, _ in updates] == [10, 20, 30, 40]  # the drop fraction is 0 at step 50
    for step, changes in updates:
        for name, counts in changes.items():
            assert counts["regrown"] == counts["pruned"], (step, name)
    regrown_total = sum(seft_summary(changes)["regrown"] for _, changes in updates)
    assert regrown_total > 0

    masks_now = current_masks(peft_model)
    assert nonzero_counts(masks_now) == nonzero_counts(start_masks)
    newly_on = sum(int((masks_now[n] & ~start_masks[n]).sum()) for n in start_masks)
    assert newly_on > 0, "no pruned position came back"

    trained = logits(peft_model)
    assert rel_err(trained, base_logits) > 1e-4
    merged = peft_model.merge_and_unload()
    assert not seft_layers(merged)
    for name, lin in sp.sparsity.named_linears(merged):
        mask = lin.weight != 0
        assert torch.equal(mask, masks_now[name]), name  # the merged zeros are the evolved topology
        assert int(mask.sum()) == int(start_masks[name].sum()), name
    assert sp.sparsity_report(merged).global_sparsity == pytest.approx(0.5, abs=1e-9)
    assert rel_err(logits(merged), trained) < 1e-4


def test_merge_and_unload_sparse_keeps_the_evolved_topology():
    model = pruned_tiny_model("llama", 0.5)
    peft_model = get_peft_model(model, sp.SEFTConfig(density=0.05, update_interval=5, drop_decay="constant"))
    train_seft(peft_model, steps=10)
    masks = current_masks(peft_model)
    expected = {n: layer.effective_weight("default") for n, layer in seft_layers(peft_model).items()}
    merged, report = sp.merge_and_unload_sparse(peft_model)
    for name, lin in sp.sparsity.named_linears(merged):
        assert torch.equal(lin.weight != 0, masks[name]), name
        kept, want = lin.weight[masks[name]], expected[name][masks[name]]
        # A kept position whose trained value is exactly 0 (re-grown, not trained yet) holds ±tiny.
        assert torch.equal(kept[want != 0], want[want != 0]), name
        assert (kept[want == 0].abs() <= torch.finfo(kept.dtype).tiny).all(), name
    assert report.mean_removed_fraction == 0.0  # nothing SEFT trained falls outside its own mask


def test_regrown_positions_become_nonzero_and_train():
    model = pruned_tiny_model("llama", 0.5)
    start_masks = linear_masks(model)
    peft_model = get_peft_model(model, sp.SEFTConfig(density=0.05, update_interval=5, drop_fraction=0.5,
                                                     drop_decay="constant"))
    train_seft(peft_model, steps=12)  # updates at 5 and 10; slots grown at 5 train for 7 steps
    merged = peft_model.merge_and_unload()
    values_at_new = torch.cat([lin.weight[(lin.weight != 0) & ~start_masks[name]]
                               for name, lin in sp.sparsity.named_linears(merged)])
    assert values_at_new.numel() > 0
    # Trained values, not merely the ±tiny placeholders that keep an exact-zero position counted.
    assert (values_at_new.abs() > 1e-6).sum() > values_at_new.numel() // 2


def test_only_sparse_state_survives_between_steps():
    """Trainable parameters and optimizer state are O(|A|); the dense gradient exists only in the window."""
    model = pruned_tiny_model("llama", 0.5)
    config = sp.SEFTConfig(density=0.03, update_interval=10, grow_window=2)
    peft_model = get_peft_model(model, config)
    layers = seft_layers(peft_model)
    for layer in layers.values():
        size = round(0.03 * layer.sparsity_mask.numel())
        assert layer.seft_delta["default"].shape == (size,)
        assert layer.seft_index["default"].shape == (size,)
        assert layer.sparsity_mask.view(-1)[layer.seft_index["default"]].all()  # A starts on nonzeros
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    collected_at = []
    for step in range(1, 13):
        ids = torch.randint(0, 128, (2, 12), generator=g)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if any(layer.grad_accum is not None for layer in layers.values()):
            collected_at.append(step)
        sp.seft_step(peft_model, opt, step, total_steps=100)
    assert collected_at == [9, 10]  # the two steps before the update at 10, nothing else
    assert all(layer.grad_accum is None for layer in layers.values())
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim():
                assert value.numel() <= max(round(0.03 * l.sparsity_mask.numel()) for l in layers.values())


def test_optimizer_state_reset_at_changed_slots():
    model = pruned_tiny_model("llama", 0.5)
    peft_model = get_peft_model(model, sp.SEFTConfig(density=0.05, update_interval=4, grow_window=1,
                                                     drop_fraction=0.3, drop_decay="constant"))
    layers = seft_layers(peft_model)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    peft_model.train()
    for step in range(1, 5):
        ids = torch.randint(0, 128, (2, 12), generator=g)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 4:
            before_index = {n: l.seft_index["default"].clone() for n, l in layers.items()}
            before_state = {n: opt.state[l.seft_delta["default"]]["exp_avg"].clone() for n, l in layers.items()}
        changes = sp.seft_step(peft_model, opt, step)
    assert changes
    for name, layer in layers.items():
        moved = layer.seft_index["default"] != before_index[name]
        assert int(moved.sum()) == changes[name]["grown"] > 0
        state = opt.state[layer.seft_delta["default"]]
        assert torch.all(state["exp_avg"][moved] == 0) and torch.all(state["exp_avg_sq"][moved] == 0)
        assert torch.equal(state["exp_avg"][~moved], before_state[name][~moved])
        assert torch.all(layer.seft_delta["default"].detach()[moved] == 0)


def test_regrow_init_from_gradient_sets_moments():
    model = pruned_tiny_model("llama", 0.5)
    peft_model = get_peft_model(model, sp.SEFTConfig(density=0.05, update_interval=3, regrow_init="gradient",
                                                     drop_decay="constant"))
    _, opt = train_seft(peft_model, steps=3)
    for layer in seft_layers(peft_model).values():
        state = opt.state[layer.seft_delta["default"]]
        assert (state["exp_avg_sq"] > 0).all()  # no slot was left with an empty second moment


def test_sparse_delta_gradients_match_dense_autograd():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 11, generator=g, dtype=torch.float64)
    weight[torch.rand(7, 11, generator=g) < 0.5] = 0
    delta_index = torch.tensor([0, 5, 12, 40, 76], dtype=torch.int64)
    frozen_index = torch.tensor([3, 5], dtype=torch.int64)
    frozen_delta = torch.tensor([0.5, -0.25], dtype=torch.float64)
    removed_index = torch.tensor([20, 33], dtype=torch.int64)
    x = torch.randn(3, 4, 11, generator=g, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(x, delta):
        return sparse_delta_linear(x, delta, weight, delta_index, frozen_index, frozen_delta, removed_index)

    assert torch.autograd.gradcheck(fn, (x, delta))
    # The same numbers as building the dense effective weight with autograd.
    dense = weight.clone().view(-1).index_add(0, frozen_index, frozen_delta).index_add(0, delta_index, delta)
    dense = dense.index_fill(0, removed_index, 0.0).view(7, 11)
    expected = torch.nn.functional.linear(x, dense)
    assert torch.allclose(fn(x, delta), expected)
    eff = effective_weight(weight, delta_index, delta, frozen_index, frozen_delta, removed_index)
    assert torch.all(eff.view(-1)[removed_index] == 0)


def test_save_load_roundtrip_keeps_evolved_topology(tmp_path):
    model = pruned_tiny_model("llama", 0.5)
    peft_model = get_peft_model(model, sp.SEFTConfig(density=0.05, update_interval=5, drop_decay="constant"))
    train_seft(peft_model, steps=10)
    trained = logits(peft_model)
    layers = seft_layers(peft_model)
    assert any(layer.seft_added["default"].numel() for layer in layers.values())
    peft_model.save_pretrained(tmp_path)

    reloaded = PeftModel.from_pretrained(pruned_tiny_model("llama", 0.5), tmp_path)
    assert torch.equal(logits(reloaded), trained)
    for name, layer in seft_layers(reloaded).items():
        for attr in ("seft_index", "seft_added", "seft_removed", "seft_frozen_index"):
            assert torch.equal(getattr(layer, attr)["default"], getattr(layers[name], attr)["default"]), (name, attr)
    masks = current_masks(peft_model)
    merged = reloaded.merge_and_unload()
    for name, lin in sp.sparsity.named_linears(merged):
        assert torch.equal(lin.weight != 0, masks[name]), name

    # Onto a base with another mask: refused, naming the layer.
    with pytest.raises(ValueError, match="does not fit this base model at layer"):
        PeftModel.from_pretrained(pruned_tiny_model("llama", 0.5, seed=1), tmp_path)


def test_seft_callback_under_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = pruned_tiny_model("llama", 0.5)
    start = nonzero_counts(linear_masks(model))
    peft_model = get_peft_model(model, sp.SEFTConfig(density=0.05, update_interval=3, drop_fraction=0.5))
    callback = sp.SEFTCallback()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=9, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=3,
                             use_cpu=True, disable_tqdm=True)
    data = TokenDataset(n=24, with_attention_mask=False)
    Trainer(model=peft_model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert [h["step"] for h in callback.history] == [3, 6]  # the fraction decays to 0 at max_steps
    assert sum(h["regrown"] for h in callback.history) > 0
    assert nonzero_counts(current_masks(peft_model)) == start


def test_drop_fraction_schedule():
    config = sp.SEFTConfig(drop_fraction=0.4, decay_steps=100)
    assert drop_fraction_at(config, 0) == pytest.approx(0.4)
    assert drop_fraction_at(config, 50) == pytest.approx(0.2)
    assert drop_fraction_at(config, 100) == 0.0
    linear = sp.SEFTConfig(drop_fraction=0.4, drop_decay="linear")
    assert drop_fraction_at(linear, 25, total_steps=100) == pytest.approx(0.3)
    assert drop_fraction_at(sp.SEFTConfig(drop_decay="constant"), 10**6, total_steps=10) == pytest.approx(0.3)


@pytest.mark.parametrize("field, value", [
    ("density", 0.0), ("density", 1.0), ("update_interval", 0), ("drop_fraction", 1.5),
    ("drop_decay", "step"), ("drop_criterion", "random"), ("grow_window", 30), ("regrow_init", "copy"),
    ("sensitivity_criterion", "hessian"), ("decay_steps", -1), ("update_groups", 0), ("update_groups", 30),
    ("grow_into", "pruned"),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"SEFTConfig.{field}"):
        sp.SEFTConfig(**{field: value})


def test_update_groups_refuse_a_window_longer_than_their_spacing():
    with pytest.raises(ValueError, match=r"grow_window=3 is longer than the 2 steps between two groups' updates"):
        sp.SEFTConfig(update_interval=8, update_groups=4, grow_window=3)


def test_update_groups_stagger_the_updates_and_bound_the_collection():
    """Two groups at update_interval 4: the first half of the layers updates at steps 4, 8, 12, the
    second at 6, 10; at no step do more than half of the layers hold a dense-gradient accumulator,
    and every layer keeps its count of nonzeros."""
    model = pruned_tiny_model("llama", 0.5)
    peft_model = get_peft_model(model, sp.SEFTConfig(density=0.05, update_interval=4, update_groups=2,
                                                     grow_window=2, drop_decay="constant"))
    layers = seft_layers(peft_model)
    names = list(layers)
    first, second = set(names[: len(names) // 2]), set(names[len(names) // 2:])
    counts = nonzero_counts(current_masks(peft_model))
    holding = []  # per step, the layers whose backward accumulated the dense gradient
    original = SEFTLayer.accumulate_rows

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        holding[-1].add(self)

    SEFTLayer.accumulate_rows = spy
    try:
        g = torch.Generator().manual_seed(0)
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
        updated = {}
        peft_model.train()
        sp.seft_step(peft_model, optimizer, 0)
        for step in range(1, 13):
            holding.append(set())
            ids = torch.randint(0, 128, (2, 12), generator=g)
            peft_model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            for name in sp.seft_step(peft_model, optimizer, step):
                updated.setdefault(name, []).append(step)
    finally:
        SEFTLayer.accumulate_rows = original
    assert {name: updated.get(name) for name in names} == {
        **{name: [4, 8, 12] for name in first}, **{name: [6, 10] for name in second}}
    assert max(len(held) for held in holding) == len(first)
    assert all(held <= {layers[n] for n in first} or held <= {layers[n] for n in second} for held in holding)
    assert nonzero_counts(current_masks(peft_model)) == counts


def test_density_above_layer_nonzeros_is_refused_naming_the_layer():
    model = pruned_tiny_model("llama", 0.9)
    with pytest.raises(ValueError, match=r"layer '.*proj'.*density=0.2"):
        get_peft_model(model, sp.SEFTConfig(density=0.2))


def test_n_m_sparse_model_keeps_its_pattern_through_updates_and_merge():
    model = make_tiny_model("llama")
    sp.prune(model, method="magnitude", pattern="2:4", show_progress=False)
    start_masks = linear_masks(model)
    peft_model = get_peft_model(model, sp.SEFTConfig(density=0.1, update_interval=4, drop_fraction=0.5,
                                                     drop_decay="constant"))
    assert {layer.nm_pattern for layer in seft_layers(peft_model).values()} == {(2, 4)}
    updates, _ = train_seft(peft_model, steps=12, lr=5e-2)
    assert sum(seft_summary(changes)["regrown"] for _, changes in updates) > 0
    masks_now = current_masks(peft_model)
    assert any(not torch.equal(masks_now[n], start_masks[n]) for n in start_masks), "the topology never moved"
    for name, mask in masks_now.items():
        # Exactly 2 of every 4: the count per group, not only per layer.
        assert torch.equal(mask.view(-1, 4).sum(dim=1), torch.full((mask.numel() // 4,), 2)), name
    merged = peft_model.merge_and_unload()
    for name, lin in sp.sparsity.named_linears(merged):
        assert torch.equal(lin.weight != 0, masks_now[name]), name
        assert sp.sparsity.is_nm_sparse(lin.weight, 2, 4), name


def test_n_m_save_load_keeps_the_pattern_and_further_updates_keep_it(tmp_path):
    def base():
        model = make_tiny_model("llama")
        sp.prune(model, method="magnitude", pattern="2:4", show_progress=False)
        return model

    peft_model = get_peft_model(base(), sp.SEFTConfig(density=0.1, update_interval=4, drop_fraction=0.5,
                                                      drop_decay="constant"))
    train_seft(peft_model, steps=8, lr=5e-2)
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(base(), tmp_path, is_trainable=True)
    assert torch.equal(logits(reloaded), logits(peft_model))
    assert {layer.nm_pattern for layer in seft_layers(reloaded).values()} == {(2, 4)}  # found again on load
    train_seft(reloaded, steps=8, lr=5e-2)
    for name, mask in current_masks(reloaded).items():
        assert torch.equal(mask.view(-1, 4).sum(dim=1), torch.full((mask.numel() // 4,), 2)), name
    for name, lin in sp.sparsity.named_linears(reloaded.merge_and_unload()):
        assert sp.sparsity.is_nm_sparse(lin.weight, 2, 4) and int((lin.weight != 0).sum()) * 2 == lin.weight.numel()


def test_n_m_pattern_found_when_a_kept_weight_is_exactly_zero():
    model = make_tiny_model("llama")
    sp.prune(model, method="magnitude", pattern="2:4", show_progress=False)
    with torch.no_grad():
        q_proj = model.model.layers[0].self_attn.q_proj.weight
        q_proj.view(-1)[(q_proj.view(-1) != 0).nonzero()[0]] = 0.0  # one group now holds a single nonzero
    peft_model = get_peft_model(model, sp.SEFTConfig(density=0.05))
    assert {layer.nm_pattern for layer in seft_layers(peft_model).values()} == {(2, 4)}
    # An unstructured 50% mask is not mistaken for 2:4.
    unstructured = get_peft_model(pruned_tiny_model("llama", 0.5), sp.SEFTConfig(density=0.05))
    assert {layer.nm_pattern for layer in seft_layers(unstructured).values()} == {None}


def test_n_m_sparse_model_refuses_density_above_half_the_nonzeros():
    model = make_tiny_model("llama")
    sp.prune(model, method="magnitude", pattern="2:4", show_progress=False)
    with pytest.raises(ValueError, match=r"layer '.*'.*density=0.3.*2:4.*density <= 0.25"):
        get_peft_model(model, sp.SEFTConfig(density=0.3))


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_grow_into_kept_moves_A_but_never_the_mask(tmp_path, pattern):
    def base():
        model = make_tiny_model("llama")
        sp.prune(model, method="magnitude", **({"pattern": pattern} if pattern else {"sparsity": 0.5}),
                 show_progress=False)
        return model

    start_masks = linear_masks(base())
    config = sp.SEFTConfig(density=0.1, update_interval=4, drop_fraction=0.5, drop_decay="constant", grow_into="kept")
    peft_model = get_peft_model(base(), config)
    start_index = {name: layer.seft_index["default"].clone() for name, layer in seft_layers(peft_model).items()}
    updates, _ = train_seft(peft_model, steps=12, lr=5e-2)
    summary = [seft_summary(changes) for _, changes in updates]
    assert sum(s["grown"] for s in summary) > 0 and sum(s["regrown"] + s["pruned"] for s in summary) == 0
    layers = seft_layers(peft_model)
    assert any(not torch.equal(layers[n].seft_index["default"], start_index[n]) for n in layers), "A never moved"
    for name, layer in layers.items():
        assert torch.equal(layer.current_mask("default"), start_masks[name]), name
        assert bool(start_masks[name].view(-1)[layer.seft_index["default"]].all()), name  # A on nonzeros only
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(base(), tmp_path)
    assert {layer.grow_into["default"] for layer in seft_layers(reloaded).values()} == {"kept"}
    assert torch.equal(logits(reloaded), logits(peft_model))
    for name, lin in sp.sparsity.named_linears(peft_model.merge_and_unload()):
        assert torch.equal(lin.weight != 0, start_masks[name]), name


def test_grow_into_kept_refuses_density_above_half_the_nonzeros_naming_the_layer():
    with pytest.raises(ValueError, match=r"layer '.*proj'.*density=0.3.*grow_into='kept'.*density <= 0.25"):
        get_peft_model(pruned_tiny_model("llama", 0.5), sp.SEFTConfig(density=0.3, grow_into="kept"))


def test_grow_within_groups_leaves_every_regrown_position_a_partner():
    # Two groups of 4; active positions 0, 1 | 4, 5; position 0 stays in A, 1 was just dropped.
    active = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    staying = torch.tensor([0])
    score = torch.tensor([float("-inf"), 0.5, 10.0, 9.0, 0.1, 0.2, 5.0, 0.3])
    # Greedy would grow 2 and 3, but group 0 has one partner (position 1): 3 gives way to 6.
    grown = grow_within_groups(score, active, staying, 2, 4)
    assert grown.tolist() == [2, 6]
    # Growing the active position 1 uses group 0's only partner: 2 can no longer come back.
    score[1] = 9.5
    grown = grow_within_groups(score, active, staying, 2, 4)
    assert sorted(grown.tolist()) == [1, 6]
    # The partners are then each group's lowest-scoring active positions outside A.
    need = torch.tensor([0, 1])
    assert smallest_per_group(torch.tensor([9.0, 9, 9, 9, 3.0, 1.0, 9, 9]), need, 4).tolist() == [5]


def test_two_active_adapters_refused():
    model = pruned_tiny_model("llama", 0.5)
    peft_model = get_peft_model(model, sp.SEFTConfig(density=0.02))
    peft_model.add_adapter("other", sp.SEFTConfig(density=0.02, seed=1))
    peft_model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="one adapter at a time"):
        logits(peft_model)


DDP_SCRIPT = Path(__file__).with_name("seft_ddp_script.py")


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_data_parallel_ranks_agree(tmp_path):
    """Two gloo processes with different data: after several updates the masks are identical."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    # accelerate's own `--cpu` launcher needs mpirun for more than one process; its torchrun launcher
    # (`--multi_gpu`) with Accelerator(cpu=True) in the script gives two gloo processes on a CPU.
    cmd = [shutil.which("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(DDP_SCRIPT), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                            cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from safetensors.torch import load_file

    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and rank0
    assert int(rank0["regrown_total"]) > 0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


def test_layout_cache_follows_every_topology_change():
    """The layer reuses its sorted layout between steps; after an update, and after loading other
    index sets in place, the forward uses the new topology (same logits as a fresh layout)."""
    peft_model = get_peft_model(pruned_tiny_model("llama", 0.5),
                                sp.SEFTConfig(density=0.05, update_interval=2, drop_decay="constant"))
    layer = seft_layers(peft_model)["model.layers.0.mlp.up_proj"]
    first = layer.layout("default")
    assert layer.layout("default") is first  # reused while nothing changed
    train_seft(peft_model, steps=4)
    assert layer.seft_added["default"].numel() or layer.seft_frozen_index["default"].numel()
    x = torch.randn(2, 3, layer.in_features)
    fresh = sparse_delta_linear(x, layer.seft_delta["default"], layer.get_base_layer().weight,
                                layer.seft_index["default"], layer.seft_frozen_index["default"],
                                layer.seft_frozen_delta["default"], layer.seft_removed["default"])
    assert torch.equal(layer(x), fresh)  # llama's linears have no bias
    before = layer.layout("default")
    with torch.no_grad():  # an in-place change of an index set (as a state-dict load does) is seen too
        layer.seft_index["default"].copy_(torch.flip(layer.seft_index["default"], [0]))
    assert layer.layout("default") is not before


def test_layout_keeps_four_byte_indices_and_exact_gradients_after_updates():
    """The layout a layer keeps between steps (several indices per trained weight) holds int32
    indices (17 bytes a changed position, where int64 took 33), after topology updates too, and the
    forward and Δ's gradient read through it equal dense references."""
    peft_model = get_peft_model(pruned_tiny_model("llama", 0.5),
                                sp.SEFTConfig(density=0.05, update_interval=2, drop_decay="constant"))
    train_seft(peft_model, steps=4)
    layer = seft_layers(peft_model)["model.layers.0.mlp.up_proj"]
    index, frozen = layer.seft_index["default"], layer.seft_frozen_index["default"]
    assert frozen.numel()  # updated: positions left A
    layout = layer.layout("default")
    assert all(t.dtype == torch.int32 for t in layout if t.dtype != torch.bool)
    changed = frozen.numel() + index.numel() + layer.seft_removed["default"].numel()
    # crow and row_offsets: out + 1 offsets each, row_offsets in host memory (blocks find their positions there)
    assert sum(t.nbytes for t in layout) <= 17 * changed + 8 * (layer.out_features + 1)
    row_starts = torch.arange(layer.out_features + 1) * layer.in_features
    assert layout.row_offsets.device.type == "cpu"
    assert torch.equal(layout.row_offsets.long(), torch.searchsorted(layout.positions.long(), row_starts))
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(1))
    grad_y = torch.randn(2, 3, layer.out_features, generator=torch.Generator().manual_seed(2))
    delta = layer.seft_delta["default"]
    delta.grad = None
    y = layer(x)
    y.backward(grad_y)
    weight = layer.effective_weight("default")
    assert rel_err(y.double(), x.double() @ weight.double().t()) < 1e-6
    dense_grad = grad_y.reshape(-1, layer.out_features).double().t() @ x.reshape(-1, layer.in_features).double()
    assert rel_err(delta.grad.double(), dense_grad.reshape(-1)[index]) < 1e-6


def test_a_training_pass_reads_back_only_the_host_row_offsets(monkeypatch):
    """On a GPU, reading a tensor's value into Python waits for all queued work. A SEFT layer's forward
    and backward read only the layout's row offsets, which live in host memory: not each block's
    bounds from its positions on the device (one stall per block and pass)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sparse_peft import delta_linear

    peft_model = get_peft_model(pruned_tiny_model("llama", 0.5), sp.SEFTConfig(density=0.05, update_interval=100))
    layer = seft_layers(peft_model)["model.layers.0.mlp.up_proj"]
    monkeypatch.setattr(delta_linear, "BLOCK_ELEMENTS", 3 * layer.in_features)  # several blocks of rows
    host = layer.layout("default").row_offsets.untyped_storage().data_ptr()
    reads = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:  # .item(), int(), float(), bool()
                reads.append(args[0].untyped_storage().data_ptr() == host)
            return func(*args, **(kwargs or {}))

    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(False) or real_tolist(t))
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    with Reads():
        layer(x).square().sum().backward()
    assert layer.seft_delta["default"].grad is not None and x.grad is not None
    blocks = -(-layer.out_features // 3)
    assert reads.count(True) == 2 * 2 * blocks and all(reads)  # two offsets a block, forward and backward


def test_the_backward_rebuilds_its_blocks_from_the_forwards_values_and_frees_them(monkeypatch):
    """The forward makes the changed positions' values (``W + F + Δ`` there, 0 where switched off) once
    for the layer, and the backward rebuilds every block of the effective weight from them instead of
    making them again. The backward frees them while the graph is still held (by the output here);
    a second backward through a retained graph makes them anew and gives the same gradients."""
    import weakref

    from sparse_peft import delta_linear
    from sparse_peft.tuners.seft import functional

    monkeypatch.setattr(delta_linear, "BLOCK_ELEMENTS", 2 * 11)  # 4 blocks of 2 rows
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 11, generator=g)
    weight[torch.rand(7, 11, generator=g) < 0.5] = 0
    delta_index, frozen_index, removed_index = torch.tensor([0, 5, 12, 40, 76]), torch.tensor([3, 5]), torch.tensor([20])
    frozen_delta = torch.tensor([0.5, -0.25])
    x = torch.randn(3, 11, generator=g, requires_grad=True)
    delta = torch.randn(5, generator=g, requires_grad=True)
    made = []
    real_init = functional.SparseUpdate.__init__
    monkeypatch.setattr(functional.SparseUpdate, "__init__", lambda self, *a, **k: made.append(self) or real_init(self, *a, **k))
    y = sparse_delta_linear(x, delta, weight, delta_index, frozen_index, frozen_delta, removed_index)
    assert len(made) == 1
    values = weakref.ref(made.pop().values)
    grad_y = torch.randn(y.shape, generator=g)
    y.backward(grad_y, retain_graph=True)
    assert not made and values() is None
    grads = x.grad.clone(), delta.grad.clone()
    x.grad = delta.grad = None
    y.backward(grad_y)
    assert len(made) == 1 and torch.equal(x.grad, grads[0]) and torch.equal(delta.grad, grads[1])
    effective = effective_weight(weight, delta_index, delta, frozen_index, frozen_delta, removed_index)
    assert torch.allclose(grads[0], grad_y @ effective)


def test_smallest_and_largest_equal_a_stable_sort_selected_a_block_at_a_time(monkeypatch):
    """The positions a topology update drops, grows and switches off are the first ``k`` of a stable
    sort (ties to the lower index, in the sort's order), found a block of scores at a time."""
    from sparse_peft.sparsity import selection

    monkeypatch.setattr(selection, "RANK_BLOCK_ELEMENTS", 7)
    g = torch.Generator().manual_seed(4)
    for trial in range(20):
        scores = torch.randint(-3, 4, (50,), generator=g).float() if trial % 2 else torch.randn(50, generator=g)
        scores[trial % 50] = float("inf")
        scores[(3 * trial) % 50] = -float("inf")
        scores = scores.to(torch.bfloat16 if trial % 3 == 0 else torch.float32)
        for k in (0, 1, 9, 25, 49, 50):
            assert torch.equal(smallest(scores, k), torch.argsort(scores, stable=True)[:k]), (trial, k)
            assert torch.equal(largest(scores, k), torch.argsort(scores, descending=True, stable=True)[:k]), (trial, k)


def test_topology_update_sorts_nothing_of_a_layers_size(monkeypatch):
    """A topology update ranks the whole layer's gradient and sensitivity without a sort of the layer
    (which would hold an int64 order and a copy: 12 bytes a weight, on every rank): every sort it
    makes is of at most |A| entries."""
    peft_model = get_peft_model(pruned_tiny_model("llama", 0.5),
                                sp.SEFTConfig(density=0.05, update_interval=2, drop_decay="constant"))
    sorted_sizes = []
    for name in ("argsort", "sort", "topk"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name,
                            lambda t, *a, _real=real, **k: sorted_sizes.append(t.numel()) or _real(t, *a, **k))
    updates, _ = train_seft(peft_model, steps=4)
    assert updates and any(c["grown"] for _, changes in updates for c in changes.values())
    assert sorted_sizes and max(sorted_sizes) <= max(layer.seft_index["default"].numel()
                                                     for layer in seft_layers(peft_model).values())
