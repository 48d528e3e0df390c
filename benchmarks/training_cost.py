"""Training cost of each method against peft's LoRA: extra memory and step time on a random Llama.

    python benchmarks/training_cost.py --hidden 1024 --dtypes bf16 --checkpointing off --steps 3
    python benchmarks/training_cost.py --tiny                    # a quick check of every row

The Llama (``--layers`` decoder layers, hidden H, intermediate 4H, H/64 heads) is magnitude-pruned to 50% and, for
bf16, cast after pruning. Every run trains all 7 projections with AdamW on random tokens: LoRA and masked LoRA at
r=16, SPP's default, SEFT at density 0.02 between topology updates and while collecting (every layer, or one of
``update_groups=4``), SPT with one pruning event (50% -> 60%) in the last step, which its median leaves out. Each row:
a fresh process. "Extra memory": what ``get_peft_model``, the optimizer and the steps add (``common.PeakMemory``:
sampled RSS on the CPU, the allocator's peak on CUDA). Step time: the median of ``--steps`` after ``--warmup``.
``--rounds N`` runs each cell's methods N times in turn: medians, and the median per-round ratio to LoRA. A run fails
on a non-finite loss or a layer whose zeros differ from the pruned model's (SPT: 60%'s; merged or base model).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import statistics
import sys

import torch

import sparse_peft as sp

from common import (
    MIB, PeakMemory, WorkerFailed, append_jsonl, arg_parser, command_line, machine_info, markdown_table, random_llama,
    spawn, timed)

METHODS = ["lora", "masked_lora", "spp", "seft", "seft_collecting", "seft_collecting_4groups", "spt"]
LABELS = {"seft_collecting": "seft (collecting)", "seft_collecting_4groups": "seft (collecting, update_groups=4)"}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SPT_TARGET = 0.6  # SPT's event prunes the 50%-pruned model to this sparsity


def peft_config(method: str, total_steps: int):
    if method == "lora":
        return sp.method_config("lora", r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS)
    if method == "masked_lora":
        return sp.method_config("masked_lora", r=16, lora_alpha=32, target_modules="all-linear")
    if method == "spp":
        return sp.method_config("spp", target_modules="all-linear")
    if method.startswith("seft"):  # no topology update within the run
        return sp.method_config("seft", density=0.02, update_interval=total_steps + 1000, target_modules="all-linear",
                                update_groups=4 if method.endswith("4groups") else 1)
    if method == "spt":  # events at step 0 (at 50% already: nothing to prune) and in the last step (to 60%)
        return sp.method_config("spt", base_prompt_length=8, target_sparsity=SPT_TARGET, initial_sparsity=0.5,
                                pruner="magnitude", prune_end_step=total_steps, num_prune_steps=1)
    raise ValueError(f"unknown method {method!r}")


def build_model(args, hidden: int, dtype: str, checkpointing: bool):
    shape = dict(hidden=hidden, intermediate=4 * hidden, layers=args.layers, vocab=args.vocab, heads=hidden // 64 or 1)
    with torch.device(args.device):  # on a GPU, built there: a CPU's random init of every weight takes longer
        model = random_llama(**shape, seed=args.seed, max_position_embeddings=max(2048, args.seq_len), use_cache=False)
    sp.prune(model, method="magnitude", sparsity=0.5, show_progress=False)
    model.to(DTYPES[dtype])
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def zeros_per_layer(model, sparsity=None) -> dict[str, int]:  # now, or the exact count once pruned to `sparsity`
    return {name: sp.sparsity.selection.unstructured_zero_count(sparsity, layer.numel) if sparsity else layer.zeros
            for name, layer in sp.sparsity_report(model).layers.items()}


def per_step_hook(method: str, peft_model, optimizer):
    """What a training loop calls after each optimizer step (and at step 0, before training)."""
    if method == "spt":
        return lambda step: sp.gradual_prune_step(peft_model, step)
    if method.startswith("seft"):
        if method.startswith("seft_collecting"):  # every layer, or one group of 4: the first quarter
            layers = [module for module in peft_model.modules() if hasattr(module, "start_collecting")]
            for module in layers[: len(layers) // (4 if method.endswith("4groups") else 1)]:
                module.start_collecting()
        return lambda step: sp.seft_step(peft_model, optimizer, step) if step > 0 else None
    return lambda step: None


def train_step(model, optimizer, batch, hook, step: int) -> float:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    hook(step)
    return loss.item()


def check_sparsity(method: str, peft_model, before: dict[str, int], fault: bool) -> None:
    # SPT refuses merging, and peft's LoRA merge densifies: their base models (the report unwraps) are checked
    after_model = peft_model if method in ("spt", "lora") else peft_model.merge_and_unload()
    if fault:  # --inject-fault: one more zero, as a broken merge would leave
        _, linear = next(iter(sp.sparsity.named_linears(after_model)))
        with torch.no_grad():
            linear.weight.view(-1)[(linear.weight.view(-1) != 0).nonzero()[0]] = 0
    after = zeros_per_layer(after_model)
    changed = {name: (before.get(name), after.get(name)) for name in set(before) | set(after)
               if before.get(name) != after.get(name)}
    if changed:
        name = sorted(changed)[0]
        raise SystemExit(f"{method}: {len(changed)} layers changed their zeros, e.g. {name} {changed[name]}")


def run_worker(args, method: str, hidden: int, dtype: str, checkpointing: bool) -> dict:
    from peft import get_peft_model

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    model = build_model(args, hidden, dtype, checkpointing)
    before = zeros_per_layer(model, SPT_TARGET if method == "spt" else None)
    g = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g).to(args.device)
    memory = PeakMemory(cuda)
    memory.start()
    total = args.warmup + args.steps
    peft_model = get_peft_model(model, peft_config(method, total)).train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    hook = per_step_hook(method, peft_model, optimizer)
    hook(0)
    losses, times = zip(*(timed(lambda: train_step(peft_model, optimizer, batch, hook, step), cuda)
                          for step in range(1, total + 1)))
    extra, steady = memory.stop(), times[args.warmup:-1] if method == "spt" and args.steps > 1 else times[args.warmup:]
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"{method}: non-finite loss {list(losses)}")
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    check_sparsity(method, peft_model, before, args.inject_fault)
    return dict(method=method, hidden=hidden, dtype=dtype, checkpointing=checkpointing, layers=args.layers,
                vocab=args.vocab, batch=args.batch, seq_len=args.seq_len, device=args.device, threads=args.threads,
                warmup=args.warmup, steps=args.steps, extra_memory_mb=extra / MIB,
                step_time_s=statistics.median(steady), step_times_s=list(times), losses=list(losses),
                trainable_params=trainable, malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"), ok=True)


def run_in_subprocess(argv: list[str], spec: str) -> dict:
    """One combination in a fresh interpreter; a failed one is a row with ``ok=False``."""
    print(f"running {spec}", file=sys.stderr, flush=True)
    try:
        return spawn(__file__, [*argv, "--worker", spec])
    except WorkerFailed as failure:
        tail = failure.output.splitlines()[-1]
        print(f"worker {spec} failed (exit {failure.status}): {tail}", file=sys.stderr)
        method, hidden, dtype, ckpt = spec.split(":")
        return dict(method=method, hidden=int(hidden), dtype=dtype, checkpointing=ckpt == "on", ok=False, error=tail)


def table(rows: list[dict]) -> str:
    """One line per (method, cell): medians over the rounds, and the median of the per-round ratios to LoRA."""
    lora = {(r["hidden"], r["dtype"], r["checkpointing"], r["round"]): r for r in rows if r["method"] == "lora" and r["ok"]}
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["method"], r["hidden"], r["dtype"], r["checkpointing"]), []).append(r)
    lines = []
    for (method, *cell), runs in cells.items():
        line = [LABELS.get(method, method), *cell[:2], "on" if cell[2] else "off"]
        for key, spec in (("extra_memory_mb", ".1f"), ("step_time_s", ".3f")) if all(r["ok"] for r in runs) else ():
            ratios = [r[key] / ref[key] for r in runs if (ref := lora.get((*cell, r["round"]))) and ref[key]]
            line += [format(statistics.median(r[key] for r in runs), spec),
                     f"{statistics.median(ratios):.2f}" if ratios else "-"]
        lines.append(line if len(line) > 4 else [*line, "FAILED", "", "", ""])
    return markdown_table(["method", "hidden", "dtype", "checkpointing", "extra memory (MB)", "x LoRA",
                           "step time (s)", "x LoRA"], "lrllrrrr", lines)


def parse_args(argv):
    p = arg_parser(__doc__, threads=1)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--hidden", nargs="+", type=int, default=[1024, 2048])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--checkpointing", default="both", choices=["off", "on", "both"])
    p.add_argument("--steps", type=int, default=5, help="measured steps (median step time)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="each cell's methods this many times, in turn")
    for flag, default in (("--layers", 4), ("--seq-len", 256), ("--batch", 2), ("--vocab", 8192), ("--seed", 0)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--tiny", action="store_true", help="quick check: hidden 128, 2 layers, seq 32")
    p.add_argument("--out", default=None, help="append the raw rows (JSON lines) here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # method:hidden:dtype:on|off
    p.add_argument("--inject-fault", action="store_true", help=argparse.SUPPRESS)  # tests: break the zeros check
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.tiny:
        args.hidden, args.layers, args.seq_len = [128], 2, 32
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        method, hidden, dtype, ckpt = args.worker.split(":")
        print(json.dumps(run_worker(args, method, int(hidden), dtype, ckpt == "on")), flush=True)
        return 0
    torch.set_num_threads(args.threads)
    ckpts = {"off": ["off"], "on": ["on"], "both": ["off", "on"]}[args.checkpointing]
    print(f"`{command_line(__file__, argv)}`\n\n{machine_info()}\n\n"
          f"{datetime.datetime.now().isoformat(timespec='seconds')}\n", flush=True)
    rows, methods, rounds = [], sorted(args.methods, key=METHODS.index), range(args.rounds)
    for hidden, dtype, ckpt, round_, method in itertools.product(args.hidden, args.dtypes, ckpts, rounds, methods):
        rows.append(dict(run_in_subprocess(argv, f"{method}:{hidden}:{dtype}:{ckpt}"), round=round_))
        if args.out:  # row by row, so that a run cut short keeps what it measured
            append_jsonl(args.out, rows[-1:])
    print(table(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
