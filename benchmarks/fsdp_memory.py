"""Per-rank memory of SEFT training under FSDP2 on CPU processes (gloo): one process vs
``torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_memory.py``.

A random Llama (hidden 1024, 4 layers, a small vocab so that the decoder layers, the part FSDP
shards per layer, dominate), magnitude-pruned to 50%, SEFT (density 0.01)
with a topology update inside the run. Each rank prints the bytes of parameters it holds after
sharding and its peak resident memory (RSS) during training, sampled every 2 ms from /proc (the
unsharded model each rank builds before ``fully_shard`` is not counted). Run with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the OS and RSS follows what is live.
"""

import os
import threading
import time

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, LlamaConfig

import sparse_peft as sp
from sparse_peft._distributed import local_tensor

STEPS, BATCH, SEQ_LEN = 4, 4, 64


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = rss_bytes(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)


def main() -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=1024, intermediate_size=2752, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config)
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
    monitor = PeakRSS()
    start_rss = rss_bytes()
    monitor.start()
    for step in range(1, STEPS + 1):
        ids = torch.randint(0, 128, (BATCH, SEQ_LEN), generator=g)[rank * local:(rank + 1) * local]
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sp.seft_step(peft_model, optimizer, step)
    monitor.running = False
    monitor.join()
    mib = 2 ** 20
    print(f"world {world} rank {rank}: parameters held {held / mib:.1f} MiB, RSS before training "
          f"{start_rss / mib:.0f} MiB, peak RSS during training {monitor.peak / mib:.0f} MiB", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
