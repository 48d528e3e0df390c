"""Per-rank memory of SEFT training under FSDP2 on CPU processes (gloo): one process vs ``torchrun --standalone
--nproc_per_node 2 benchmarks/fsdp_memory.py``. Each rank prints the parameter bytes it holds and its RSS before and
at its peak during training. Setup, commands (with ``MALLOC_MMAP_THRESHOLD_=65536``: RSS then follows what is live)
and results: docs/results/distributed.md.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.fsdp import fully_shard

import sparse_peft as sp
from sparse_peft._distributed import local_tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MIB, PeakMemory, random_llama  # noqa: E402

STEPS, BATCH, SEQ_LEN = 4, 4, 64


def main() -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    model = random_llama(hidden=1024, intermediate=2752, layers=4, vocab=128, heads=16, max_position_embeddings=256)
    sp.prune(model, method="magnitude", sparsity=0.5, show_progress=False)
    peft_model = get_peft_model(model, sp.SEFTConfig(density=0.01, update_interval=2, drop_fraction=0.3,
                                                     drop_decay="constant"))
    if world > 1:
        for layer in peft_model.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(peft_model)
    held = sum(local_tensor(p).numel() * p.element_size() for p in peft_model.parameters())
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    local = BATCH // world
    sp.seft_step(peft_model, None, 0)
    memory = PeakMemory(interval=0.002)
    memory.start()
    for step in range(1, STEPS + 1):
        ids = torch.randint(0, 128, (BATCH, SEQ_LEN), generator=g)[rank * local:(rank + 1) * local]
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sp.seft_step(peft_model, optimizer, step)
    memory.stop()
    print(f"world {world} rank {rank}: parameters held {held / MIB:.1f} MiB, RSS before training "
          f"{memory.base / MIB:.0f} MiB, peak RSS during training {memory.peak / MIB:.0f} MiB", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
