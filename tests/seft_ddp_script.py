"""Run by tests/test_seft.py under ``accelerate launch --multi_gpu --num_processes 2``: SEFT with DDP
on two CPU processes (``Accelerator(cpu=True)`` picks gloo).

Each rank trains on different tokens; topology decisions use the all-reduced gradient, so both ranks
must end with the same index sets and masks. Each rank writes its state to ``OUT/rank{r}.safetensors``.
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from conftest import pruned_tiny_model
from peft import get_peft_model
from safetensors.torch import save_file

import sparse_peft as sp
from sparse_peft.training.seft import seft_summary
from sparse_peft.tuners.seft import SEFTLayer


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    # Really two gloo processes, or the test would compare a rank with itself.
    assert accelerator.num_processes == 2, accelerator.state
    assert torch.distributed.get_backend() == "gloo"
    model = pruned_tiny_model("llama", 0.5)
    peft_model = get_peft_model(model, sp.SEFTConfig(density=0.05, update_interval=4, drop_fraction=0.5,
                                                     drop_decay="constant"))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    wrapped, optimizer = accelerator.prepare(peft_model, optimizer)
    # Different data on each rank: identical masks afterwards come from the reduced decision only.
    g = torch.Generator().manual_seed(100 + accelerator.process_index)
    regrown = 0
    wrapped.train()
    for step in range(1, 13):
        ids = torch.randint(0, 128, (2, 12), generator=g)
        accelerator.backward(wrapped(input_ids=ids, labels=ids).loss)
        optimizer.step()
        optimizer.zero_grad()
        changes = sp.seft_step(peft_model, optimizer.optimizer, step)
        if changes:
            regrown += seft_summary(changes)["regrown"]
    state = {"regrown_total": torch.tensor(regrown)}
    for name, layer in peft_model.named_modules():
        if isinstance(layer, SEFTLayer):
            state[f"{name}.mask"] = layer.current_mask("default").to(torch.uint8)
            state[f"{name}.index"] = layer.seft_index["default"].clone()
            state[f"{name}.delta"] = layer.seft_delta["default"].detach().clone()
    save_file(state, str(Path(out_dir) / f"rank{accelerator.process_index}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
