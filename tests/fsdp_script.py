"""Run by tests/test_fsdp.py: the same training in one process, or under
``torchrun --nproc_per_node 2`` with FSDP2 (``fully_shard`` per decoder layer and on the root, gloo).

Every method trains on the same global batches with the same seed; with 2 processes each rank takes
half of every batch. SEFT's drop-and-grow and SPT's gradual pruning run inside the run. Then the
adapter is saved as users save it from a sharded model (the full state dict gathered to rank 0's
CPU, ``save_pretrained(state_dict=...)``), SPT's pruning state with it, into ``OUT/<method>/``;
every rank also writes the masks, SEFT topologies and index sets it holds to
``OUT/<method>/rank{R}.safetensors``, for the test to compare across ranks.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import pruned_tiny_model
# the data-parallel script's methods, batches and steps, so the two runs compare
from multiprocess_script import GLOBAL_BATCH, SEQ_LEN, STEPS, configs
from peft import get_peft_model
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

import sparse_peft as sp
from sparse_peft._distributed import full_tensor

def shard(peft_model):
    """What users do with FSDP2 (and what accelerate's FSDP2 plugin does): one unit per decoder layer,
    then the root for the rest (embeddings, norm, head)."""
    for layer in peft_model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(peft_model)


def rank_state(peft_model) -> dict[str, torch.Tensor]:
    """What every rank must hold identically: the base masks (gathered from the shards), SEFT's
    topologies and every adapter buffer (index sets, fingerprints; FSDP does not shard buffers)."""
    state = {}
    for name, linear in sp.sparsity.named_linears(peft_model.get_base_model()):
        state[f"mask/{name}"] = full_tensor(linear.weight.detach() != 0).to(torch.uint8)
    for name, module in peft_model.named_modules():
        if isinstance(module, sp.tuners.seft.layer.SEFTLayer):
            state[f"topology/{name}"] = module.current_mask("default").to(torch.uint8)
    for name, buffer in peft_model.named_buffers():
        if any(key in name for key in ("seft_", "_fingerprint")):
            state[f"buffer/{name}"] = buffer.detach().cpu().clone()
    return state


def collected_rows(peft_model) -> dict[str, torch.Tensor]:
    """Rows of SEFT's accumulated gradient this rank holds before an update, and the layers' rows:
    under FSDP each rank must hold only its shard's rows."""
    layers = [m for m in peft_model.modules() if isinstance(m, sp.tuners.seft.layer.SEFTLayer)]
    held = sum(layer.grad_accum.shape[0] for layer in layers)
    return {"check/grad_accum_rows": torch.tensor(held), "check/rows": torch.tensor(sum(l.out_features for l in layers))}


def train(method, config, out: Path, world: int, rank: int) -> None:
    peft_model = get_peft_model(pruned_tiny_model("llama", 0.5), config)
    if world > 1:
        shard(peft_model)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    local = GLOBAL_BATCH // world
    g = torch.Generator().manual_seed(0)
    state_rows = {}
    peft_model.train()
    if method == "seft":
        sp.seft_step(peft_model, None, 0)
    for step in range(1, STEPS + 1):
        ids = torch.randint(0, 128, (GLOBAL_BATCH, SEQ_LEN), generator=g)[rank * local:(rank + 1) * local]
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if method == "seft":
            if step % config.update_interval == 0:
                state_rows = collected_rows(peft_model)
            sp.seft_step(peft_model, optimizer, step)
        elif method == "spt":
            sp.gradual_prune_step(peft_model, step)
    target = out / method
    state = {**rank_state(peft_model), **state_rows}
    # Gathered on every rank (a collective), kept on rank 0's CPU only: how accelerate saves FSDP2.
    full = get_model_state_dict(peft_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        peft_model.save_pretrained(str(target), state_dict=full)
    if method == "spt":
        sp.save_pruning_state(peft_model, target)  # every rank: the masks are gathered
    target.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target / f"rank{rank}.safetensors"))


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    methods = sys.argv[2].split(",") if len(sys.argv) > 2 else list(configs())
    for method in methods:
        train(method, configs()[method], Path(out_dir), world, rank)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
