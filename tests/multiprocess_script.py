"""Run by tests/test_multiprocess.py: the same training on 1 process or under
``accelerate launch --multi_gpu --num_processes 2`` (two gloo CPU processes, ``Accelerator(cpu=True)``).

Every method trains on the same global batches with the same seed; with 2 processes each rank takes
half of every batch, DDP averages the gradients and the topology decisions (SEFT's drop-and-grow,
SPT's gradual Wanda pruning) use statistics summed over ranks. Each rank writes its adapters and
masks to ``OUT/world{W}_rank{R}.safetensors``.
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from conftest import linear_masks, pruned_tiny_model
from peft import get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

import sparse_peft as sp

GLOBAL_BATCH, SEQ_LEN, STEPS = 4, 12, 8


def configs():
    return {
        "masked_lora": sp.MaskedLoraConfig(r=4),
        "spp": sp.SPPConfig(r=4),
        "seft": sp.SEFTConfig(density=0.05, update_interval=3, drop_fraction=0.5, drop_decay="constant"),
        "spt": sp.SPTConfig(base_prompt_length=2, target_sparsity=0.7, pruner="wanda", prune_end_step=6,
                            num_prune_steps=3),
    }


def train(method, config, accelerator, state):
    peft_model = get_peft_model(pruned_tiny_model("llama", 0.5), config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    wrapped, optimizer = accelerator.prepare(peft_model, optimizer)
    rank, world = accelerator.process_index, accelerator.num_processes
    local = GLOBAL_BATCH // world
    g = torch.Generator().manual_seed(0)
    wrapped.train()
    if method == "seft":
        sp.seft_step(peft_model, None, 0)
    for step in range(1, STEPS + 1):
        ids = torch.randint(0, 128, (GLOBAL_BATCH, SEQ_LEN), generator=g)[rank * local:(rank + 1) * local]
        accelerator.backward(wrapped(input_ids=ids, labels=ids).loss)
        optimizer.step()
        optimizer.zero_grad()
        if method == "seft":
            sp.seft_step(peft_model, optimizer.optimizer, step)
        elif method == "spt":
            sp.gradual_prune_step(peft_model, step)
    for key, value in get_peft_model_state_dict(peft_model).items():
        state[f"{method}/adapter/{key}"] = value.detach().clone().contiguous()
    base = peft_model.get_base_model()
    for name, mask in linear_masks(base).items():
        state[f"{method}/mask/{name}"] = mask.to(torch.uint8)
    if method == "seft":
        for name, module in peft_model.named_modules():
            if hasattr(module, "current_mask") and hasattr(module, "seft_delta"):
                state[f"{method}/topology/{name}"] = module.current_mask("default").to(torch.uint8)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    if accelerator.num_processes > 1:
        assert torch.distributed.get_backend() == "gloo"
    state = {}
    for method, config in configs().items():
        train(method, config, accelerator, state)
    name = f"world{accelerator.num_processes}_rank{accelerator.process_index}.safetensors"
    save_file(state, str(Path(out_dir) / name))


if __name__ == "__main__":
    main(sys.argv[1])
