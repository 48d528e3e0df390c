"""FSDP2 (``fully_shard``) on two gloo CPU processes trains every method to what one process trains
with the same global batch; masks and SEFT topologies are identical on every rank after every
update; the adapter saved from the sharded model loads into one process and merges."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import IDS, linear_masks, logits, norm_rel_err, pruned_tiny_model
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

import sparse_peft as sp

SCRIPT = Path(__file__).with_name("fsdp_script.py")
METHODS = ("masked_lora", "spp", "seft", "spt")


def _run(args, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, *args, str(SCRIPT), str(out)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=SCRIPT.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    _run([], out / "world1")
    # Launched as users launch it: torchrun (torch.distributed.run), two processes.
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], out / "world2")
    return out


def _files(runs, world, method):
    return {path.name: path for path in (runs / f"world{world}" / method).iterdir()}


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_ranks_hold_identical_masks_topologies_and_index_sets(runs, method):
    rank0 = load_file(runs / "world2" / method / "rank0.safetensors")
    rank1 = load_file(runs / "world2" / method / "rank1.safetensors")
    single = load_file(runs / "world1" / method / "rank0.safetensors")
    assert rank0.keys() == rank1.keys() == single.keys()
    for key in rank0:
        if key.startswith("check/"):
            continue
        assert torch.equal(rank0[key], rank1[key]), key
        if "frozen_delta" in key:  # trained values: float tolerance
            assert norm_rel_err(rank0[key], single[key]) < 1e-3, (key, norm_rel_err(rank0[key], single[key]))
        else:  # masks, topologies, index sets, fingerprints: the same decisions exactly
            assert torch.equal(rank0[key], single[key]), key
    if method == "seft":
        assert any(v.numel() for k, v in single.items() if "seft_added" in k), "no pruned position was re-grown"
        # Each rank held only its rows of the accumulated gradient (about half), none of it replicated.
        for state in (rank0, rank1):
            assert 0 < int(state["check/grad_accum_rows"]) < int(state["check/rows"])
        assert int(rank0["check/grad_accum_rows"]) + int(rank1["check/grad_accum_rows"]) == int(rank0["check/rows"])
    if method == "spt":  # pruned from 0.5 to the target 0.7 inside the run
        masks = [v for k, v in single.items() if k.startswith("mask/") and ".layers." in k]
        kept = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
        assert abs(kept - 0.3) < 0.01, kept


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_adapter_equals_one_process_with_the_same_global_batch(runs, method):
    single = load_file(_files(runs, 1, method)["adapter_model.safetensors"])
    sharded = load_file(_files(runs, 2, method)["adapter_model.safetensors"])
    assert single.keys() == sharded.keys()
    moved = False
    for key, a in single.items():
        b = sharded[key]
        if a.is_floating_point():
            assert norm_rel_err(b, a) < 1e-3, (key, norm_rel_err(b, a))
            moved = moved or bool(a.abs().sum() > 0)
        else:
            assert torch.equal(a, b), key
    assert moved, "nothing was trained"


def _load(runs, world, method):
    """The adapter saved from a run, loaded into one process on a fresh pruned base."""
    directory = runs / f"world{world}" / method
    if method != "spt":
        return PeftModel.from_pretrained(pruned_tiny_model("llama", 0.5), str(directory))
    # SPT pruned the base during training: re-apply its masks to a fresh base, then load the prompts.
    import fsdp_script

    peft_model = get_peft_model(pruned_tiny_model("llama", 0.5), fsdp_script.configs()["spt"])
    sp.load_pruning_state(peft_model, directory)
    set_peft_model_state_dict(peft_model, load_file(directory / "adapter_model.safetensors"))
    return peft_model


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_adapter_loads_into_one_process_and_merges_like_the_one_process_run(runs, method):
    single, sharded = _load(runs, 1, method), _load(runs, 2, method)
    single.eval()
    sharded.eval()
    torch.testing.assert_close(logits(sharded, IDS), logits(single, IDS), rtol=1e-4, atol=1e-4)
    if method == "spt":  # SPT refuses to merge (its prompts are not a weight change)
        masks_single, masks_sharded = linear_masks(single.get_base_model()), linear_masks(sharded.get_base_model())
    else:
        merged_single, merged_sharded = sp.merge_and_unload_sparse(single)[0], sp.merge_and_unload_sparse(sharded)[0]
        masks_single, masks_sharded = linear_masks(merged_single), linear_masks(merged_sharded)
        for (name, a), (_, b) in zip(sp.sparsity.named_linears(merged_single), sp.sparsity.named_linears(merged_sharded)):
            assert norm_rel_err(b.weight, a.weight) < 1e-4, (name, norm_rel_err(b.weight, a.weight))
    assert masks_single.keys() == masks_sharded.keys()
    for name in masks_single:
        assert torch.equal(masks_single[name], masks_sharded[name]), name
