"""SPT (sparsity-aware prompt tuning): per-layer prompts, gated attention, gradual pruning, peft round trips."""

import math

import pytest
import torch
from conftest import IDS, calibration_batches, logits, make_tiny_model, pruned_tiny_model, rel_err, train_steps
from peft import PeftModel, get_peft_model

import sparse_peft as sp
from sparse_peft.sparsity import growth, selection
from sparse_peft.sparsity.growth import grow_keep_mask, grow_keep_mask_nm
from sparse_peft.sparsity.selection import rowwise_keep_mask
from sparse_peft.tuners.spt import PRUNING_STATE_FILE, SPTAttention

SPT_ARCHS = ["llama", "qwen2", "mistral"]


def base_linears(peft_or_model):
    """``{name: linear}`` of every prunable linear (names without peft's wrappers)."""
    model = peft_or_model.get_base_model() if hasattr(peft_or_model, "get_base_model") else peft_or_model
    return {name.replace(".base_layer", ""): lin for name, lin in sp.sparsity.named_linears(model)}


def zero_counts(model):
    return {name: int((lin.weight == 0).sum()) for name, lin in base_linears(model).items()}


def trained_spt(arch="llama", steps=3, **config):
    model = pruned_tiny_model(arch, 0.5)
    peft_model = get_peft_model(model, sp.SPTConfig(base_prompt_length=config.pop("base_prompt_length", 4), **config))
    train_steps(peft_model, steps=steps, lr=5e-2)
    return peft_model


def prune_blocks(model, block_sparsities):
    """Magnitude-prune every linear of decoder block ``l`` to ``block_sparsities[l]`` (row-wise)."""
    for name, lin in sp.sparsity.named_linears(model):
        index = int(name.split("layers.")[1].split(".")[0])
        n_zeros = round(block_sparsities[index] * lin.weight.numel())
        keep = rowwise_keep_mask(lin.weight.detach().abs(), n_zeros)
        with torch.no_grad():
            lin.weight.mul_(keep)


def expected_length(p_base, s, mean):
    return max(1, math.floor(p_base * s / mean + 0.5))


# --- prompt lengths ------------------------------------------------------------------------------------


def test_lengths_follow_the_measured_sparsity_of_each_layer():
    block_sparsities = {0: 0.2, 1: 0.4, 2: 0.6, 3: 0.8}
    model = make_tiny_model("llama", layers=4)
    prune_blocks(model, block_sparsities)
    peft_model = get_peft_model(model, sp.SPTConfig(base_prompt_length=10))  # target None: lengths from the model
    lengths = sp.spt_prompt_lengths(peft_model)
    measured = peft_model.peft_config["default"].layer_sparsities
    mean = sum(measured.values()) / 4
    assert lengths == {l: expected_length(10, measured[l], mean) for l in range(4)}
    assert lengths == {0: 4, 1: 8, 2: 12, 3: 16}  # 10 * s / 0.5
    for l in range(4):  # proportional within rounding
        assert abs(lengths[l] - 10 * measured[l] / mean) <= 0.5
    for module in peft_model.modules():
        if isinstance(module, SPTAttention):
            assert module.spt_prompt["default"].shape == (lengths[module.layer_index], 64)
            assert module.spt_gate["default"].shape == (4,)  # one gate per query head


def test_owl_allocation_sets_lengths_and_the_final_counts():
    allocation = {0: 0.3, 1: 0.45, 2: 0.55, 3: 0.7}  # mean 0.5
    model = make_tiny_model("qwen2", layers=4)
    config = sp.SPTConfig(base_prompt_length=8, target_sparsity=0.5, allocation="owl", layer_sparsities=allocation,
                          pruner="magnitude", prune_end_step=4, num_prune_steps=2)
    peft_model = get_peft_model(model, config)
    assert sp.spt_prompt_lengths(peft_model) == {0: 5, 1: 7, 2: 9, 3: 11}
    sp.gradual_prune_step(peft_model, 4)
    counts = zero_counts(peft_model)
    numel = {name: lin.weight.numel() for name, lin in base_linears(peft_model).items()}
    assert sum(counts.values()) == round(0.5 * sum(numel.values()))  # global target exactly
    for l, s in allocation.items():
        block = [n for n in counts if f"layers.{l}." in n]
        block_sparsity = sum(counts[n] for n in block) / sum(numel[n] for n in block)
        assert abs(block_sparsity - s) < 1e-3


def test_dense_model_at_creation_uses_the_target_allocation():
    peft_model = get_peft_model(make_tiny_model("llama"), sp.SPTConfig(base_prompt_length=6, target_sparsity=0.6))
    assert sp.spt_prompt_lengths(peft_model) == {0: 6, 1: 6}
    assert peft_model.peft_config["default"].layer_sparsities == {0: 0.6, 1: 0.6}


def test_set_layer_sparsities_recomputes_the_lengths_and_keeps_trained_vectors():
    peft_model = get_peft_model(make_tiny_model("llama"), sp.SPTConfig(base_prompt_length=4, target_sparsity=0.5,
                                                                         allocation="owl",
                                                                         layer_sparsities={0: 0.5, 1: 0.5}))
    before = {m.layer_index: m.spt_prompt["default"].detach().clone()
              for m in peft_model.modules() if isinstance(m, SPTAttention)}
    with pytest.warns(UserWarning, match="rebuild the optimizer"):
        lengths = peft_model.base_model.set_layer_sparsities({0: 0.25, 1: 0.75})
    assert lengths == sp.spt_prompt_lengths(peft_model) == {0: 2, 1: 6}
    for m in peft_model.modules():
        if isinstance(m, SPTAttention):
            keep = min(4, lengths[m.layer_index])
            assert torch.equal(m.spt_prompt["default"][:keep], before[m.layer_index][:keep])
            assert m.spt_prompt["default"].requires_grad
    assert peft_model.peft_config["default"].prompt_lengths == {0: 2, 1: 6}


def test_only_the_chosen_layers_get_prompts():
    peft_model = get_peft_model(pruned_tiny_model("mistral", 0.5, layers=3), sp.SPTConfig(layers=[0, 2]))
    assert sorted(sp.spt_prompt_lengths(peft_model)) == [0, 2]
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist: the model has 2 decoder layers"):
        get_peft_model(pruned_tiny_model("llama", 0.5), sp.SPTConfig(layers=[0, 5]))


# --- the forward -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", SPT_ARCHS)
def test_step0_logits_equal_the_base_model(arch):
    model = pruned_tiny_model(arch, 0.5)
    base_logits = logits(model)
    peft_model = get_peft_model(model, sp.SPTConfig(base_prompt_length=4))
    assert torch.equal(logits(peft_model), base_logits)  # gates at 0
    with torch.no_grad():
        for m in peft_model.modules():
            if isinstance(m, SPTAttention):
                m.spt_gate["default"].fill_(0.5)
    assert rel_err(logits(peft_model), base_logits) > 1e-4  # the prompt path is live once gates open
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model), base_logits)


def open_gates(peft_model, value=0.5):
    with torch.no_grad():
        for m in peft_model.modules():
            if isinstance(m, SPTAttention):
                m.spt_gate["default"].copy_(torch.linspace(-value, value, m.spt_gate["default"].numel()))


@pytest.mark.parametrize("arch", SPT_ARCHS)
def test_attention_output_equals_the_formula(arch):
    """out = W_o (attn(h) + g ⊙ softmax(q K_Pᵀ · scaling) V_P) + b_o, written here from the base's parts."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    peft_model = get_peft_model(pruned_tiny_model(arch, 0.5), sp.SPTConfig(base_prompt_length=3))
    open_gates(peft_model)
    wrapper = next(m for m in peft_model.modules() if isinstance(m, SPTAttention))
    attn, seen = wrapper.base_layer, {}

    def capture(module, args, kwargs, output):
        seen["kwargs"], seen["output"] = dict(kwargs), output[0]

    handle = wrapper.register_forward_hook(capture, with_kwargs=True)
    logits(peft_model)
    handle.remove()
    kwargs = seen["kwargs"]
    with torch.no_grad():
        o_input = {}
        handle = attn.o_proj.register_forward_pre_hook(lambda module, args: o_input.setdefault("a", args[0]))
        attn(**kwargs)  # the base alone: no hooks of the wrapper
        handle.remove()
        h = kwargs["hidden_states"]
        batch, tokens, _ = h.shape
        heads, kv_heads, head_dim = wrapper.num_heads, wrapper.num_kv_heads, wrapper.head_dim
        q = attn.q_proj(h).view(batch, tokens, heads, head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        prompt, gate = wrapper.spt_prompt["default"], wrapper.spt_gate["default"]
        k = attn.k_proj(prompt).view(-1, kv_heads, head_dim)
        v = attn.v_proj(prompt).view(-1, kv_heads, head_dim)
        context = torch.zeros(batch, tokens, heads, head_dim)
        for head in range(heads):  # consecutive query heads share a kv head
            kv = head // (heads // kv_heads)
            probs = (q[:, head] @ k[:, kv].T * wrapper.scaling).softmax(-1)
            context[:, :, head] = gate[head] * probs @ v[:, kv]
        expected = attn.o_proj(o_input["a"] + context.reshape(batch, tokens, -1))
    assert gate.abs().max() > 0 and rel_err(expected, attn.o_proj(o_input["a"])) > 1e-4  # the prompts count
    torch.testing.assert_close(seen["output"], expected, rtol=1e-5, atol=1e-6)


def training_step_flops(model, ids) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids).logits.float().pow(2).mean().backward()
    return counter.get_total_flops()


def test_the_prompt_path_adds_no_gemm_of_the_attentions_size():
    """The wrapper reads q_proj's output and feeds o_proj once: a training step costs the base's GEMMs
    plus the prompts' own, far less than one more token x hidden x hidden GEMM per layer."""
    hidden, layers, prompt_length = 128, 2, 2
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    base = pruned_tiny_model("llama", 0.5, hidden=hidden, layers=layers).requires_grad_(False)
    base.enable_input_require_grads()  # the backward then runs through every layer, as with prompts
    base_flops = training_step_flops(base, ids)
    peft_model = get_peft_model(pruned_tiny_model("llama", 0.5, hidden=hidden, layers=layers),
                                sp.SPTConfig(base_prompt_length=prompt_length))
    peft_model.enable_input_require_grads()
    open_gates(peft_model)
    extra = training_step_flops(peft_model, ids) - base_flops
    one_attention_gemm = 2 * ids.numel() * hidden * hidden
    assert 0 < extra < 0.5 * one_attention_gemm * layers  # computing q and W_o·d apart: 4 such GEMMs a layer


@pytest.mark.parametrize("arch", SPT_ARCHS)
def test_generate_gives_the_same_tokens_with_and_without_the_cache(arch):
    peft_model = trained_spt(arch)
    gates = [m.spt_gate["default"] for m in peft_model.modules() if isinstance(m, SPTAttention)]
    assert all(g.abs().max() > 0 for g in gates)  # the prompts take part
    prompt = IDS[:, :5]
    with_cache = peft_model.generate(input_ids=prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    without = peft_model.generate(input_ids=prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    with peft_model.disable_adapter():
        base = peft_model.generate(input_ids=prompt, max_new_tokens=10, do_sample=False)
    assert not torch.equal(base, with_cache)  # the trained prompts change what is generated


def test_left_padded_batch_matches_each_sequence_alone():
    peft_model = trained_spt("qwen2")
    long, short = IDS[0, :8], IDS[1, :5]
    batch = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    batch[0], mask[0] = long, 1
    batch[1, 3:], mask[1, 3:] = short, 1  # left padding
    generated = peft_model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                    pad_token_id=0)
    alone_long = peft_model.generate(input_ids=long[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone_short = peft_model.generate(input_ids=short[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generated[0, 8:], alone_long[0, 8:])
    assert torch.equal(generated[1, 8:], alone_short[0, 5:])
    # and the logits of the real tokens agree
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = peft_model(input_ids=batch, attention_mask=mask, position_ids=position_ids).logits
        single = peft_model(input_ids=short[None]).logits
    torch.testing.assert_close(padded[1, 3:], single[0], rtol=1e-4, atol=1e-5)


def test_training_moves_only_prompts_and_gates():
    model = pruned_tiny_model("llama", 0.5)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, sp.SPTConfig(base_prompt_length=4))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".spt_prompt." in n or ".spt_gate." in n for n in trainable)
    assert len(trainable) == 4  # 2 layers x (prompt, gate)
    start = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    train_steps(peft_model, steps=3, lr=5e-2)
    for n, p in peft_model.named_parameters():
        if n in start:
            assert not torch.equal(p, start[n]), f"{n} did not train"
    base = peft_model.get_base_model()
    for n, p in base.named_parameters():
        if "spt_" not in n:
            assert torch.equal(p, weights[n.replace(".base_layer", "")]), f"{n} changed"


# --- gradual pruning -------------------------------------------------------------------------------------


def test_grow_keep_mask_matches_rowwise_from_dense_and_nests_from_uneven_rows():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 10, generator=g)
    dense = torch.ones(6, 10, dtype=torch.bool)
    for n in (0, 7, 30, 59):
        assert torch.equal(grow_keep_mask(scores, dense, n), rowwise_keep_mask(scores, n))
    uneven = dense.clone()
    uneven[0, :7] = False  # one row far sparser than the rest
    uneven[3, 2] = False
    grown = grow_keep_mask(scores, uneven, 20)
    assert int((~grown).sum()) == 20
    assert not (grown & ~uneven).any()  # every old zero is still pruned
    per_row = (~grown).sum(dim=1).tolist()
    assert per_row[0] == 7 and max(per_row[1:]) - min(per_row[1:]) <= 1  # the others evened out
    with pytest.raises(ValueError, match="cannot grow a mask with 8 zeros to 5"):
        grow_keep_mask(scores, uneven, 5)


def test_grow_keep_mask_ranks_a_block_of_rows_at_a_time_with_the_same_result(monkeypatch):
    """The ranking's transients exist for a block of rows only, and blocking changes nothing: the same
    mask as ranking the whole layer at once, including the last zeros chosen across rows."""
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(11, 8, generator=g)
    keep = torch.rand(11, 8, generator=g) > 0.2  # uneven existing zeros
    counts = [int((~keep).sum()) + k for k in (1, 9, 23)]
    whole = [grow_keep_mask(scores, keep, n) for n in counts]  # 88 weights: one block
    ranked_sizes = []
    lowest_per_row = growth.lowest_per_row

    def recording_lowest_per_row(ranked, k):
        ranked_sizes.append(ranked.shape)
        return lowest_per_row(ranked, k)

    monkeypatch.setattr(selection, "RANK_BLOCK_ELEMENTS", 3 * 8)  # 3 rows a block: 4 blocks, the last of 2
    monkeypatch.setattr(growth, "lowest_per_row", recording_lowest_per_row)
    for n, expected in zip(counts, whole):
        assert torch.equal(grow_keep_mask(scores, keep, n), expected)
    assert ranked_sizes and max(shape[0] for shape in ranked_sizes) == 3
    assert sum(shape[0] for shape in ranked_sizes) == 3 * 11  # every row ranked once per call


def _grow_by_sorting(scores, keep, n_zeros):
    """The row-wise growth rule written with a stable sort of every row (the reference)."""
    rows, cols = scores.shape
    zeros = (~keep).sum(dim=1)
    level = max(L for L in range(cols + 1) if int(zeros.clamp(min=L).sum()) <= n_zeros)
    per_row = zeros.clamp(min=level)
    order = torch.argsort(scores.masked_fill(~keep, float("-inf")), dim=1, stable=True)
    new_keep = keep.clone()
    next_candidates = []
    for r in range(rows):
        new_keep[r, order[r, :per_row[r]]] = False
        if per_row[r] == level < cols:
            next_candidates.append((float(scores[r, order[r, level]]), r, int(order[r, level])))
    for _, r, c in sorted(next_candidates)[:n_zeros - int(per_row.sum())]:
        new_keep[r, c] = False
    return new_keep


def test_grow_keep_mask_equals_a_stable_sort_of_every_row_with_ties_and_infinities():
    """The rule selects each row's k-th score instead of sorting the row; ties (equal scores) still go to
    the lower index and infinite scores rank as a sort ranks them."""
    g = torch.Generator().manual_seed(2)
    for trial in range(40):
        scores = torch.randint(0, 3, (5, 9), generator=g).float()  # many ties
        if trial % 2:
            scores = torch.rand(5, 9, generator=g)
        scores[trial % 5, trial % 9] = float("inf")
        keep = torch.rand(5, 9, generator=g) > 0.4
        for n in range(int((~keep).sum()), 46):
            assert torch.equal(grow_keep_mask(scores, keep, n), _grow_by_sorting(scores, keep, n)), (trial, n)


def _grow_nm_by_sorting(scores, keep, n_zeros, n, m):
    """The N:M growth rule written with a stable sort (the reference): in every group, its kept weights
    in score order, the first `room` of them candidates; the layer's lowest candidates, ties to the
    lower position, become the new zeros. NaN ranks with +inf (lower position first)."""
    ranked = scores.nan_to_num(nan=float("inf")).reshape(-1, m)
    groups_keep = keep.reshape(-1, m)
    candidates = []  # (score, flat position)
    for g in range(groups_keep.shape[0]):
        kept = [j for j in sorted(range(m), key=lambda j: (float(ranked[g, j]), j)) if groups_keep[g, j]]
        room = max(0, (m - n) - (m - len(kept)))
        candidates += [(float(ranked[g, j]), g * m + j) for j in kept[:room]]
    new_keep = keep.clone().view(-1)
    for _, position in sorted(candidates)[:n_zeros - int((~keep).sum())]:
        new_keep[position] = False
    return new_keep.view(keep.shape)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8)])
def test_grow_keep_mask_nm_equals_a_stable_sort_with_ties_infinities_and_blocks(monkeypatch, n, m):
    """The N:M rule ranks each group by pairwise comparisons, a block of rows at a time, and selects the
    layer's lowest candidates: the same zeros as sorting, with ties, ±inf and NaN scores (a kept
    weight scored NaN or +inf never lets an old zero count as a new one), in one block or several."""
    g = torch.Generator().manual_seed(3)
    for trial in range(12):
        scores = torch.randint(0, 3, (5, 2 * m), generator=g).float()  # many ties
        if trial % 2:
            scores = torch.rand(5, 2 * m, generator=g)
        scores[trial % 5, trial % (2 * m)] = float("nan")
        scores[(trial + 2) % 5, (trial + 3) % (2 * m)] = float("inf")
        scores[(trial + 4) % 5, (trial + 1) % (2 * m)] = float("-inf")
        keep = torch.rand(5, 2 * m, generator=g) > 0.3
        have = int((~keep).sum())
        capacity = have + int(((m - n) - (~keep).reshape(-1, m).sum(dim=1)).clamp(min=0).sum())
        for block_elements in (1 << 22, 2 * 2 * m):  # one block; 2 rows a block (the last of 1)
            monkeypatch.setattr(selection, "RANK_BLOCK_ELEMENTS", block_elements)
            for n_zeros in range(have, capacity + 1):
                grown = grow_keep_mask_nm(scores, keep, n_zeros, n, m)
                assert torch.equal(grown, _grow_nm_by_sorting(scores, keep, n_zeros, n, m)), (trial, n_zeros)
                assert int((~grown).sum()) == n_zeros and not (grown & ~keep).any()


def test_nm_rules_rank_a_block_of_rows_at_a_time(monkeypatch):
    """Neither N:M rule ranks more than a block of rows at once, and each ranks every group once: what
    bounds their transients on a large layer (the candidates' scores are all that outlive a block)."""
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(10, 16, generator=g)
    keep = grow_keep_mask_nm(scores, torch.ones(10, 16, dtype=torch.bool), 30, 2, 4)
    ranked_groups = []
    rank_in_groups = selection.rank_in_groups

    def recording_rank_in_groups(ranked, eligible=None):
        ranked_groups.append(ranked.shape[0])
        return rank_in_groups(ranked, eligible)

    monkeypatch.setattr(selection, "RANK_BLOCK_ELEMENTS", 3 * 16)  # 3 rows (12 groups) a block: 4 blocks
    monkeypatch.setattr(selection, "rank_in_groups", recording_rank_in_groups)
    monkeypatch.setattr(growth, "rank_in_groups", recording_rank_in_groups)
    for call in (lambda: selection.nm_keep_mask(scores, 2, 4), lambda: grow_keep_mask_nm(scores, keep, 70, 2, 4)):
        ranked_groups.clear()
        call()
        assert ranked_groups == [12, 12, 12, 4]


def test_nm_keep_mask_equals_a_stable_sort_of_every_group(monkeypatch):
    """``nm_keep_mask`` prunes each group's M - N lowest scores (ties to the lower index, NaN with +inf
    after every finite score) as a stable sort does, one block of rows or several."""
    g = torch.Generator().manual_seed(4)
    for n, m in [(2, 4), (1, 4), (4, 8), (3, 16)]:
        scores = torch.randint(0, 4, (7, 4 * m), generator=g).float()
        scores[torch.rand(7, 4 * m, generator=g) < 0.05] = float("nan")
        scores[torch.rand(7, 4 * m, generator=g) < 0.05] = float("inf")
        scores[torch.rand(7, 4 * m, generator=g) < 0.05] = float("-inf")
        order = torch.argsort(scores.nan_to_num(nan=float("inf")).reshape(-1, m), dim=1, stable=True)
        expected = torch.ones(7 * 4, m, dtype=torch.bool).scatter_(1, order[:, : m - n], False).reshape(7, 4 * m)
        for block_elements in (1 << 22, 3 * 4 * m):
            monkeypatch.setattr(selection, "RANK_BLOCK_ELEMENTS", block_elements)
            assert torch.equal(selection.nm_keep_mask(scores, n, m), expected), (n, m, block_elements)


@pytest.mark.parametrize("pruner, use_calibration", [("magnitude", False), ("wanda", False), ("wanda", True)])
def test_gradual_pruning_reaches_the_target_exactly_with_nested_masks(pruner, use_calibration):
    model = make_tiny_model("llama")
    config = sp.SPTConfig(base_prompt_length=4, target_sparsity=0.6, pruner=pruner, prune_start_step=1,
                          prune_end_step=7, prune_interval=2)
    peft_model = get_peft_model(model, config)
    assert config.pruning_steps() == [1, 3, 5, 7]
    calibration = calibration_batches() if use_calibration else None
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    previous = {n: lin.weight != 0 for n, lin in base_linears(peft_model).items()}
    sparsities = []
    for step in range(9):
        report = sp.gradual_prune_step(peft_model, step, calibration=calibration)
        masks = {n: lin.weight != 0 for n, lin in base_linears(peft_model).items()}
        for n, mask in masks.items():
            assert not (mask & ~previous[n]).any(), f"{n}: a pruned weight came back at step {step}"
        previous = masks
        if step in (1, 3, 5, 7):
            scheduled = sp.cubic_sparsity(step, 6, 0.6, 0.0, start_step=1)
            assert report.event_step == step and report.scheduled_sparsity == pytest.approx(scheduled)
            assert report.global_sparsity == pytest.approx(scheduled, abs=1e-3)
        else:
            assert report.new_zeros == 0
        sparsities.append(report.global_sparsity)
        peft_model.train()
        ids = torch.randint(0, 128, (2, 12), generator=g)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert sparsities == sorted(sparsities) and sparsities[2] < sparsities[-1]
    for name, lin in base_linears(peft_model).items():
        assert int((lin.weight == 0).sum()) == round(0.6 * lin.weight.numel()), name  # each layer exactly
    assert set(report.layers) == set(base_linears(peft_model))
    assert peft_model.base_model.gradual_pruning.running_norms.stats == {}  # statistics stop once the target is reached


@pytest.mark.parametrize("pruner", ["magnitude", "wanda"])
def test_gradual_pruning_to_2_4_follows_the_schedule_and_ends_exactly_2_4(pruner):
    model = make_tiny_model("llama")
    config = sp.SPTConfig(base_prompt_length=4, target_pattern="2:4", pruner=pruner, prune_start_step=1,
                          prune_end_step=7, prune_interval=2)
    assert config.target_sparsity == 0.5
    peft_model = get_peft_model(model, config)
    previous = {n: lin.weight != 0 for n, lin in base_linears(peft_model).items()}
    for step in range(9):
        report = sp.gradual_prune_step(peft_model, step, calibration=calibration_batches())
        masks = {n: lin.weight != 0 for n, lin in base_linears(peft_model).items()}
        for n, mask in masks.items():
            assert not (mask & ~previous[n]).any(), f"{n}: a pruned weight came back at step {step}"
            # On the way too: no group of 4 ever has more than 2 zeros.
            assert int((~mask).reshape(-1, 4).sum(dim=1).max()) <= 2, (n, step)
        previous = masks
        if step in (1, 3, 5, 7):
            scheduled = sp.cubic_sparsity(step, 6, 0.5, 0.0, start_step=1)
            assert report.global_sparsity == pytest.approx(scheduled, abs=1e-3)
    for name, lin in base_linears(peft_model).items():
        assert sp.sparsity.is_nm_sparse(lin.weight, 2, 4), name
        assert int((lin.weight == 0).sum()) == lin.weight.numel() // 2, name
    unloaded = peft_model.unload()
    assert all(sp.sparsity.is_nm_sparse(lin.weight, 2, 4) for _, lin in sp.sparsity.named_linears(unloaded))


def test_grow_keep_mask_nm_takes_the_lowest_scores_where_a_group_has_room():
    keep = torch.tensor([[False, True, True, True, True, True, True, True]])  # group 0 has one zero already
    scores = torch.tensor([[0.0, 1.0, 2.0, 0.5, 3.0, 4.0, 9.0, 8.0]])
    assert (~grow_keep_mask_nm(scores, keep, 2, 2, 4)).nonzero()[:, 1].tolist() == [0, 3]
    # Next lowest is 1.0, but group 0 would then hold 3 zeros: 3.0 in group 1 instead.
    assert (~grow_keep_mask_nm(scores, keep, 3, 2, 4)).nonzero()[:, 1].tolist() == [0, 3, 4]
    with pytest.raises(ValueError, match=r"cannot grow a mask with 1 zeros to 5 zeros at 2:4 \(at most 4 fit\)"):
        grow_keep_mask_nm(scores, keep, 5, 2, 4)
    # A group already past 2 zeros has no room and keeps its zeros.
    full = torch.tensor([[False, False, False, True, True, True, True, True]])
    assert (~grow_keep_mask_nm(scores, full, 5, 2, 4)).nonzero()[:, 1].tolist() == [0, 1, 2, 4, 5]
    # A group whose kept weights all score NaN still gets its new zero (its old zero is not a candidate).
    unscored = torch.tensor([[0.0, float("nan"), float("nan"), float("nan")]])
    assert (~grow_keep_mask_nm(unscored, keep[:, :4], 2, 2, 4)).nonzero()[:, 1].tolist() == [0, 1]


def test_2_4_target_keeps_groups_that_already_have_more_zeros():
    # Exact zeros in a checkpoint (or an earlier unstructured prune) can leave a group with 3 or 4 zeros:
    # it is 2:4 as it is, and SPT never un-prunes, so it stays and the other groups go to 2 of 4.
    model = make_tiny_model("llama")
    sp.prune(model, method="magnitude", sparsity=0.6, show_progress=False)
    before = {n: lin.weight == 0 for n, lin in base_linears(model).items()}
    peft_model = get_peft_model(model, sp.SPTConfig(target_pattern="2:4", pruner="magnitude", prune_end_step=2,
                                                    num_prune_steps=2))
    sp.gradual_prune_step(peft_model, 2)
    for name, lin in base_linears(peft_model).items():
        zeros = lin.weight == 0
        assert sp.sparsity.is_nm_sparse(lin.weight, 2, 4), name
        assert not (before[name] & ~zeros).any(), name
        expected = before[name].reshape(-1, 4).sum(dim=1).clamp(min=2).sum()
        assert int(zeros.sum()) == int(expected) > lin.weight.numel() // 2, name


def test_2_4_target_refuses_inputs_not_a_multiple_of_4():
    model = make_tiny_model("llama")
    linear = model.model.layers[0].mlp.down_proj
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(linear.in_features - 2, linear.out_features, bias=False)
    model.model.layers[0].mlp.up_proj = torch.nn.Linear(model.config.hidden_size, linear.in_features - 2, bias=False)
    model.model.layers[0].mlp.gate_proj = torch.nn.Linear(model.config.hidden_size, linear.in_features - 2,
                                                          bias=False)
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp.down_proj' has \d+ inputs, not a multiple of 4"):
        get_peft_model(model, sp.SPTConfig(target_pattern="2:4"))


def test_skipped_calls_catch_up_and_a_dense_start_jumps_to_initial_sparsity():
    peft_model = get_peft_model(make_tiny_model("mistral"), sp.SPTConfig(
        target_sparsity=0.5, initial_sparsity=0.2, pruner="magnitude", prune_end_step=10, num_prune_steps=5))
    report = sp.gradual_prune_step(peft_model, 0)
    assert report.global_sparsity == pytest.approx(0.2, abs=1e-3)
    report = sp.gradual_prune_step(peft_model, 50)  # long after the end: the final event applies
    assert report.event_step == 10 and report.global_sparsity == pytest.approx(0.5, abs=1e-6)
    assert sp.gradual_prune_step(peft_model, 51).new_zeros == 0


def test_wanda_without_statistics_asks_for_calibration():
    peft_model = get_peft_model(make_tiny_model("llama"), sp.SPTConfig(target_sparsity=0.5, initial_sparsity=0.3))
    with pytest.raises(ValueError, match="Wanda needs activation norms.*calibration="):
        sp.gradual_prune_step(peft_model, 0)


def test_pruning_refuses_a_model_sparser_than_its_target():
    with pytest.raises(ValueError, match="already sparser than their target.*model.layers.0"):
        get_peft_model(prune_and_return(make_tiny_model("llama"), {0: 0.8, 1: 0.1}),
                       sp.SPTConfig(target_sparsity=0.5))


def prune_and_return(model, block_sparsities):
    prune_blocks(model, block_sparsities)
    return model


def test_callback_prunes_during_trainer_training(tmp_path):
    from transformers import Trainer, TrainingArguments

    peft_model = get_peft_model(make_tiny_model("llama"), sp.SPTConfig(
        base_prompt_length=4, target_sparsity=0.5, prune_end_step=4, num_prune_steps=2))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (12, 12), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    callback = sp.GradualPruningCallback()
    Trainer(model=peft_model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert [r.event_step for r in callback.history] == [2, 4]  # step 0 has s_0 = 0: nothing to prune
    for name, lin in base_linears(peft_model).items():
        assert int((lin.weight == 0).sum()) == round(0.5 * lin.weight.numel()), name
    short = TrainingArguments(output_dir=str(tmp_path), max_steps=3, report_to=[], use_cpu=True, disable_tqdm=True)
    with pytest.raises(ValueError, match="prune_end_step=4 is after the last training step"):
        Trainer(model=peft_model, args=short, train_dataset=data, callbacks=[sp.GradualPruningCallback()]).train()


def masks_of(model):
    return {name: (lin.weight != 0).clone() for name, lin in base_linears(model).items()}


def gradual_trainer(tmp_path, seed=0, **args):
    """A Trainer on a fresh dense tiny Llama that SPT prunes to 50% by magnitude at steps 2, 4, 6."""
    from transformers import Trainer, TrainingArguments

    peft_model = get_peft_model(make_tiny_model("llama", seed=seed), sp.SPTConfig(
        base_prompt_length=4, target_sparsity=0.5, pruner="magnitude", prune_end_step=6, num_prune_steps=3))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (16, 12), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], logging_strategy="no", use_cpu=True,
                             disable_tqdm=True, **args)
    callback = sp.GradualPruningCallback()
    return peft_model, Trainer(model=peft_model, args=args, train_dataset=data, callbacks=[callback]), callback


def test_a_trainer_checkpoint_taken_mid_pruning_resumes_on_a_fresh_model(tmp_path):
    full_model, trainer, _ = gradual_trainer(tmp_path, save_steps=3)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-3"
    assert (checkpoint / PRUNING_STATE_FILE).is_file()

    # The checkpoint holds the prompts, not the pruned base: a fresh model cannot take them as it is.
    fresh, trainer, _ = gradual_trainer(tmp_path)
    with pytest.raises(ValueError, match=r"call sp.load_pruning_state\(peft_model, checkpoint\) first"):
        trainer.train(resume_from_checkpoint=str(checkpoint))

    resumed, trainer, callback = gradual_trainer(tmp_path)
    assert sp.load_pruning_state(resumed, checkpoint) == [0, 2]
    at_step_3 = masks_of(resumed)
    assert {name: int((~keep).sum()) for name, keep in at_step_3.items()} != zero_counts(full_model)  # not at 50% yet
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert [r.event_step for r in callback.history] == [4, 6]  # event 2 is not applied twice
    final = masks_of(resumed)
    for name, keep in masks_of(full_model).items():
        assert torch.equal(final[name], keep), name  # magnitude pruning: the same masks as without the stop
        assert torch.equal(final[name] & at_step_3[name], final[name]), name  # masks only grow
        assert int((~keep).sum()) == round(0.5 * keep.numel()), name


def test_a_pruning_state_is_refused_by_another_base_or_config_and_changes_nothing(tmp_path):
    pruned, trainer, _ = gradual_trainer(tmp_path, save_strategy="no")
    trainer.train()
    path = sp.save_pruning_state(pruned, tmp_path / "state")

    other_base = get_peft_model(make_tiny_model("llama", seed=1), sp.SPTConfig(
        base_prompt_length=4, target_sparsity=0.5, pruner="magnitude", prune_end_step=6, num_prune_steps=3))
    before = {name: lin.weight.clone() for name, lin in base_linears(other_base).items()}
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: the kept weights sum to .* not the model"):
        sp.load_pruning_state(other_base, path)
    for name, lin in base_linears(other_base).items():
        assert torch.equal(lin.weight, before[name]), name

    other_target = get_peft_model(make_tiny_model("llama"), sp.SPTConfig(
        base_prompt_length=4, target_sparsity=0.6, pruner="magnitude", prune_end_step=6, num_prune_steps=3))
    with pytest.raises(ValueError, match=r"q_proj: the saved run prunes it to \d+ zeros, this SPTConfig to"):
        sp.load_pruning_state(other_target, path.parent)
    with pytest.raises(FileNotFoundError, match="no SPT pruning state"):
        sp.load_pruning_state(other_target, tmp_path)
    no_schedule = get_peft_model(pruned_tiny_model("llama"), sp.SPTConfig(base_prompt_length=4))
    with pytest.raises(ValueError, match="does not prune gradually"):
        sp.save_pruning_state(no_schedule, tmp_path / "none")


def test_owl_layer_sparsities_spread_the_target():
    model = make_tiny_model("llama", layers=3)
    allocation = sp.owl_layer_sparsities(model, 0.5, calibration_batches(), owl_lambda=0.1, show_progress=False)
    assert sorted(allocation) == [0, 1, 2]
    assert all(0.4 - 1e-9 <= s <= 0.6 + 1e-9 for s in allocation.values())
    assert sum(allocation.values()) / 3 == pytest.approx(0.5)  # equal-sized blocks: the mean is the target
    with pytest.raises(ValueError, match="allocation='owl' on a model at sparsity 0.0000.*owl_layer_sparsities"):
        get_peft_model(model, sp.SPTConfig(target_sparsity=0.5, allocation="owl"))


# --- merging, saving, loading --------------------------------------------------------------------------------


def test_merge_is_refused_and_unload_returns_the_untouched_sparse_base():
    model = pruned_tiny_model("llama", 0.5)
    base_logits, weights = logits(model), {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = trained_spt("llama")  # same seed: same pruned base
    with pytest.raises(ValueError, match="SPT cannot merge: its prompts are extra key/value positions"):
        peft_model.merge_and_unload()
    with pytest.raises(ValueError, match="SPT cannot merge"):
        peft_model.merge_adapter()
    assert any(isinstance(m, SPTAttention) for m in peft_model.modules())  # nothing was unloaded
    unloaded = peft_model.unload()
    assert not any(isinstance(m, SPTAttention) for m in unloaded.modules())
    assert {n for n, _ in unloaded.named_parameters()} == set(weights)
    for n, p in unloaded.named_parameters():
        assert torch.equal(p, weights[n])
    assert torch.equal(logits(unloaded), base_logits)


def test_sparsity_report_sees_the_linears_inside_wrapped_attention():
    peft_model = trained_spt("llama")
    report, base_report = sp.sparsity_report(peft_model), sp.sparsity_report(peft_model.unload())
    assert set(report.layers) == set(base_report.layers)
    assert any("q_proj" in name for name in report.layers)
    assert report.global_sparsity == base_report.global_sparsity


def test_save_and_load_round_trip_after_gradual_pruning(tmp_path):
    peft_model = get_peft_model(make_tiny_model("qwen2"), sp.SPTConfig(
        target_sparsity=0.5, pruner="magnitude", prune_end_step=2, num_prune_steps=1, allocation="owl",
        layer_sparsities={0: 0.4, 1: 0.6}))
    sp.gradual_prune_step(peft_model, 2)
    train_steps(peft_model, steps=2, lr=5e-2)
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.split(".")[-1] for k in saved} == {"spt_prompt", "spt_gate", "spt_fingerprint"}
    counts = zero_counts(peft_model)
    base = peft_model.unload()
    loaded = PeftModel.from_pretrained(base, tmp_path)
    assert torch.equal(logits(loaded), expected)
    assert sp.spt_prompt_lengths(loaded) == {0: 6, 1: 10}
    assert zero_counts(loaded) == counts

    other = pruned_tiny_model("qwen2", 0.5)  # same weights, another mask
    with pytest.raises(ValueError, match="does not fit this base model at decoder layer 0"):
        PeftModel.from_pretrained(other, tmp_path)


# --- refusals --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, why", [("gpt_neox", "fused query_key_value"), ("opt", "learned absolute positions")])
def test_unsupported_architectures_are_refused(arch, why):
    with pytest.raises(ValueError, match=f"SPT does not support model_type='{arch}': .*{why}.*Supported: llama"):
        get_peft_model(pruned_tiny_model(arch, 0.5), sp.SPTConfig())


def test_dense_model_without_target_is_refused():
    with pytest.raises(ValueError, match="every decoder layer has sparsity 0.*target_sparsity"):
        get_peft_model(make_tiny_model("llama"), sp.SPTConfig())


@pytest.mark.parametrize("kwargs, match", [
    (dict(base_prompt_length=0), "base_prompt_length must be a positive integer, got 0"),
    (dict(target_sparsity=1.0), "target_sparsity must be None or a number in \\(0, 1\\), got 1.0"),
    (dict(target_sparsity=0.3, initial_sparsity=0.5), "initial_sparsity=0.5 is above target_sparsity=0.3"),
    (dict(initial_sparsity=-0.1), "initial_sparsity must be a number in \\[0, 1\\), got -0.1"),
    (dict(schedule="linear"), "schedule must be one of \\('cubic',\\), got 'linear'"),
    (dict(pruner="sparsegpt"), "pruner must be one of \\('wanda', 'magnitude'\\), got 'sparsegpt'"),
    (dict(prune_start_step=5, prune_end_step=5), "prune_end_step must be an integer > prune_start_step=5, got 5"),
    (dict(num_prune_steps=4, prune_interval=2), "at most one of SPTConfig.num_prune_steps \\(4\\)"),
    (dict(num_prune_steps=0), "num_prune_steps must be an integer >= 1, got 0"),
    (dict(allocation="global"), "allocation must be one of \\('uniform', 'owl'\\), got 'global'"),
    (dict(layers=[1, 1]), "layers has repeated indices"),
    (dict(layers=[-1]), "layers must be a non-empty list of layer indices"),
    (dict(layer_sparsities={0: 1.5}), "layer_sparsities\\[0\\] must be a sparsity in \\[0, 1\\), got 1.5"),
    (dict(prompt_lengths={"x": 3}), "prompt_lengths: key 'x' is not a layer index"),
    (dict(init_std=0), "init_std must be a number > 0, got 0"),
    (dict(target_pattern="4:2"), "target_pattern must be 'N:M' with 0 < N < M .*got '4:2'"),
    (dict(target_pattern="2:4", target_sparsity=0.6), "'2:4' means target_sparsity=0.5, got target_sparsity=0.6"),
    (dict(target_pattern="2:4", allocation="owl"), "'2:4' needs allocation='uniform'"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sp.SPTConfig(**kwargs)


@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj"], "all-linear", ["self_attn"], []])
def test_user_target_modules_are_refused_pointing_to_layers(target_modules):
    with pytest.raises(ValueError, match=r"SPTConfig.target_modules=.* SPT wraps the whole self-attention module of "
                                         r"each decoder layer .*SPTConfig.layers=\[layer indices\]"):
        sp.SPTConfig(target_modules=target_modules)


def test_target_modules_naming_other_layers_than_layers_are_refused():
    config = sp.SPTConfig(layers=[1], target_modules=["model.layers.0.self_attn"])  # SPT's form, other layer
    with pytest.raises(ValueError, match=r"SPTConfig.target_modules=\['model.layers.0.self_attn'\] .*"
                                         r"\['model.layers.1.self_attn'\].*SPTConfig.layers"):
        get_peft_model(pruned_tiny_model("llama", 0.5), config)


def test_config_with_the_target_modules_spt_sets_round_trips(tmp_path):
    from peft import PeftConfig

    peft_model = get_peft_model(pruned_tiny_model("llama", 0.5), sp.SPTConfig(base_prompt_length=4, layers=[1]))
    assert peft_model.peft_config["default"].target_modules == {"model.layers.1.self_attn"}
    train_steps(peft_model, steps=1, lr=5e-2)
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    loaded_config = PeftConfig.from_pretrained(tmp_path)
    assert loaded_config.target_modules == {"model.layers.1.self_attn"} and loaded_config.layers == [1]
    loaded = PeftModel.from_pretrained(pruned_tiny_model("llama", 0.5), tmp_path)
    assert torch.equal(logits(loaded), expected)
    assert sp.spt_prompt_lengths(loaded) == {1: 4}


def test_config_json_round_trip_restores_integer_layer_keys(tmp_path):
    from peft import PeftConfig

    config = sp.SPTConfig(target_sparsity=0.5, allocation="owl", layer_sparsities={0: 0.4, 1: 0.6},
                          prompt_lengths={0: 3, 1: 5}, num_prune_steps=4)
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, sp.SPTConfig)
    assert loaded.layer_sparsities == {0: 0.4, 1: 0.6} and loaded.prompt_lengths == {0: 3, 1: 5}
    assert loaded.pruning_steps() == [0, 25, 50, 75, 100]
