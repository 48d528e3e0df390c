"""SEFT (drop-and-grow inside the run) on a pruned Llama under FSDP2, then the adapter saved.

    accelerate launch --config_file examples/fsdp2_accelerate.yaml examples/fsdp2_train.py   # GPUs
    torchrun --standalone --nproc_per_node 2 examples/fsdp2_train.py                         # CPUs too

Under accelerate the FSDP plugin shards the model (one unit per decoder layer); under plain torchrun
the script calls ``fully_shard`` itself the same way. A tiny random Llama keeps it self-contained:
load your pruned checkpoint instead.
"""

import os

import torch
import torch.distributed as dist
from accelerate import Accelerator
from peft import get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, LlamaConfig

import sparse_peft as sp
from sparse_peft.training.seft import seft_summary

STEPS, LOCAL_BATCH, SEQ_LEN, OUT = 6, 2, 32, "fsdp2-seft-adapter"


def build():
    torch.manual_seed(0)  # the same base on every rank
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    sp.prune(model, method="magnitude", sparsity=0.5, show_progress=False)
    return get_peft_model(model, sp.SEFTConfig(density=0.02, update_interval=3, drop_fraction=0.3))


def main():
    peft_model = build()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    if os.environ.get("ACCELERATE_USE_FSDP", "false") == "true":
        accelerator = Accelerator()
        model, optimizer = accelerator.prepare(peft_model, optimizer)
        inner_optimizer, device, rank = optimizer.optimizer, accelerator.device, accelerator.process_index
    else:  # torchrun: shard as accelerate's FSDP2 plugin does, then build the optimizer on the shards
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        for layer in peft_model.get_base_model().model.layers:
            fully_shard(layer)
        model = fully_shard(peft_model)
        optimizer = inner_optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        device, rank = torch.device("cpu"), dist.get_rank()
    model.train()
    generator = torch.Generator().manual_seed(rank)  # each rank its own data
    sp.seft_step(peft_model, None, 0, total_steps=STEPS)
    for step in range(1, STEPS + 1):
        ids = torch.randint(0, 256, (LOCAL_BATCH, SEQ_LEN), generator=generator).to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        # On the PeftModel and the inner optimizer: every rank takes part (the update gathers each layer).
        changes = sp.seft_step(peft_model, inner_optimizer, step, total_steps=STEPS)
        if changes and rank == 0:
            print(f"step {step}: {seft_summary(changes)}")
    # The full state dict is gathered by every rank and kept on rank 0's CPU.
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        peft_model.save_pretrained(OUT, state_dict=state_dict)
        print(f"saved the adapter to {OUT}/")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
