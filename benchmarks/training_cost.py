"""Training cost of each method against peft's LoRA: extra memory and step time on a random Llama.

    python benchmarks/training_cost.py --hidden 1024 --dtypes bf16 --checkpointing off --steps 3
    python benchmarks/training_cost.py --tiny                    # a quick check of every row

The model is built in code (``LlamaConfig``: ``--layers`` decoder layers, hidden H, intermediate 4H,
H/64 heads, ``--vocab`` tokens; no model hub), magnitude-pruned to 50% and, for bf16, cast after
pruning (peft's default autocast keeps the adapters fp32). Every run trains all 7 projections with
AdamW on ``--batch`` x ``--seq-len`` random token ids: LoRA and masked LoRA at r=16, SPP's default
config, SEFT at density 0.02 between topology updates ("seft") and while its layers collect the
dense gradient for the next update ("seft (collecting)"), SPT with gradual pruning
(``sp.gradual_prune_step`` after each optimizer step, as ``GradualPruningCallback`` does; two
pruning events fall within the run, the median step is one without).

Each (method, hidden, dtype, checkpointing) runs in a fresh subprocess (this script with
``--worker``), so that one run's memory never counts in another's. "Extra memory" is what the
training adds on top of the pruned model: ``get_peft_model`` + optimizer + warm-up and measured steps.

- CPU: the worker builds and prunes the model, collects garbage and reads its resident set size
  (``/proc/self/statm``) as the baseline. Model building has its own transient peak (the fp32 model
  before the bf16 cast, pruning scores), and ``ru_maxrss`` cannot be reset, so the training peak is
  taken from a thread that samples ``statm`` every 5 ms during the training phase only, raised to
  ``ru_maxrss`` at the end if ``ru_maxrss`` grew during that phase (then it is that phase's exact peak).
  extra = peak - baseline. A spike shorter than 5 ms under the build peak can be missed. glibc keeps
  freed blocks of up to 32 MiB in its heap once its mmap threshold has adapted, so with its default
  settings the RSS peak also counts the fragmentation of transient blocks. ``--malloc default`` (the
  default) measures what a plain process gets; with ``--malloc fixed`` the workers run with
  ``MALLOC_MMAP_THRESHOLD_=131072``: every block of 128 KiB or more is its own mapping, returned on
  free, so the RSS follows the live tensors, but the page faults slow every step.
- CUDA (``--device cuda``): ``torch.cuda.reset_peak_memory_stats()`` after pruning;
  extra = ``max_memory_allocated() - memory_allocated()`` at that point; steps timed with CUDA events.

Step time is the median over ``--steps`` measured steps after ``--warmup`` steps (forward, backward,
optimizer step and the method's per-step hook), with ``--threads`` torch threads (default 1).
Each worker also checks the run: the loss is finite, and every layer ends with exactly the zeros it
had after pruning (after ``merge_and_unload()``; SPT, which refuses merging, on its base; LoRA, whose
merge densifies, on its frozen base). A failed check fails the run and the script exits non-zero.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time

import torch

import sparse_peft as sp

from common import machine_info

METHODS = ["lora", "masked_lora", "spp", "seft", "seft_collecting", "spt"]
LABELS = {"seft_collecting": "seft (collecting)"}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20


def peft_config(method: str, total_steps: int):
    if method == "lora":
        return sp.method_config("lora", r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS)
    if method == "masked_lora":
        return sp.method_config("masked_lora", r=16, lora_alpha=32, target_modules="all-linear")
    if method == "spp":
        return sp.method_config("spp", target_modules="all-linear")
    if method.startswith("seft"):  # no topology update within the run
        return sp.method_config("seft", density=0.02, update_interval=total_steps + 1000, target_modules="all-linear")
    if method == "spt":  # two pruning events within the run (the model is at the target already)
        return sp.method_config("spt", base_prompt_length=8, target_sparsity=0.5, initial_sparsity=0.5,
                                pruner="magnitude", prune_end_step=total_steps, num_prune_steps=2)
    raise ValueError(f"unknown method {method!r}")


def build_model(args, hidden: int, dtype: str, checkpointing: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max(2048, args.seq_len), use_cache=False)
    model = LlamaForCausalLM(config).to(args.device)
    sp.prune(model, method="magnitude", sparsity=0.5, show_progress=False)
    model.to(DTYPES[dtype])
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def zeros_per_layer(model) -> dict[str, int]:
    return {name: layer.zeros for name, layer in sp.sparsity_report(model).layers.items()}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def trim_heap() -> None:
    """Return the heap's free memory to the OS (glibc), so the baseline holds no memory freed by the build."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Memory:
    """Extra memory of the training phase over the baseline taken at ``start()`` (see the docstring);
    on the CPU a thread samples the RSS every ``interval`` seconds in between."""

    def __init__(self, device: str, interval: float = 0.005):
        self.cuda, self.interval, self._stop = device.startswith("cuda"), interval, threading.Event()

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def start(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        trim_heap()
        self.base = self.peak = rss_bytes()
        self.max_rss0 = max_rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        self._stop.set()
        self._thread.join()
        end = max_rss()  # grew during training: the training phase's exact peak
        return max(self.peak, rss_bytes(), end if end > self.max_rss0 else 0) - self.base


def per_step_hook(method: str, peft_model, optimizer):
    """What a training loop calls after each optimizer step (and at step 0, before training)."""
    if method == "spt":
        return lambda step: sp.gradual_prune_step(peft_model, step)
    if method.startswith("seft"):
        if method == "seft_collecting":
            for module in peft_model.modules():
                if hasattr(module, "start_collecting"):
                    module.start_collecting()
        return lambda step: sp.seft_step(peft_model, optimizer, step) if step > 0 else None
    return lambda step: None


def timed_step(model, optimizer, batch, hook, step: int, cuda: bool) -> tuple[float, float]:
    """One training step; returns (loss, seconds)."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    hook(step)
    if cuda:
        end.record()
        end.synchronize()
        return loss.item(), start.elapsed_time(end) / 1000
    return loss.item(), time.perf_counter() - t0


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
    before = zeros_per_layer(model)
    g = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g).to(args.device)
    memory = Memory(args.device)
    memory.start()
    total = args.warmup + args.steps
    peft_model = get_peft_model(model, peft_config(method, total))
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    hook = per_step_hook(method, peft_model, optimizer)
    hook(0)
    losses, times = [], []
    for step in range(1, total + 1):
        loss, seconds = timed_step(peft_model, optimizer, batch, hook, step, cuda)
        losses.append(loss)
        times.append(seconds)
    extra = memory.stop()
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"{method}: non-finite loss {losses}")
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    check_sparsity(method, peft_model, before, args.inject_fault)
    return dict(method=method, hidden=hidden, dtype=dtype, checkpointing=checkpointing, layers=args.layers,
                vocab=args.vocab, batch=args.batch, seq_len=args.seq_len, device=args.device, threads=args.threads,
                warmup=args.warmup, steps=args.steps, extra_memory_mb=extra / MB,
                step_time_s=statistics.median(times[args.warmup:]), step_times_s=times, losses=losses,
                trainable_params=trainable, malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"), ok=True)


def spawn(argv: list[str], spec: str, malloc: str) -> dict:
    """Run one combination in a fresh interpreter; its last stdout line is the JSON row."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", spec]
    print(f"running {spec}", file=sys.stderr, flush=True)
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": "131072"} if malloc == "fixed" else {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    method, hidden, dtype, ckpt = spec.split(":")
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    print(f"worker {spec} failed (exit {proc.returncode}): {tail}", file=sys.stderr)
    return dict(method=method, hidden=int(hidden), dtype=dtype, checkpointing=ckpt == "on", ok=False, error=tail)


def ratio(value, reference) -> str:
    return f"{value / reference:.2f}" if reference else "-"


def table(rows: list[dict]) -> str:
    lora = {(r["hidden"], r["dtype"], r["checkpointing"]): r for r in rows if r["method"] == "lora" and r["ok"]}
    lines = ["| method | hidden | dtype | checkpointing | extra memory (MB) | x LoRA | step time (s) | x LoRA |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {LABELS.get(r['method'], r['method'])} | {r['hidden']} | {r['dtype']} | " \
               f"{'on' if r['checkpointing'] else 'off'} |"
        if not r["ok"]:
            lines.append(f"{head} FAILED | | | |")
            continue
        ref = lora.get((r["hidden"], r["dtype"], r["checkpointing"]))
        mem, sec = r["extra_memory_mb"], r["step_time_s"]
        lines.append(f"{head} {mem:.1f} | {ratio(mem, ref and ref['extra_memory_mb'])} | {sec:.3f} | "
                     f"{ratio(sec, ref and ref['step_time_s'])} |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--hidden", nargs="+", type=int, default=[1024, 2048])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--checkpointing", default="both", choices=["off", "on", "both"])
    p.add_argument("--steps", type=int, default=5, help="measured steps (median step time)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each worker")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malloc", default="default", choices=["fixed", "default"],
                   help="CPU: glibc's mmap threshold fixed at 128 KiB in the workers, or glibc's default")
    p.add_argument("--tiny", action="store_true", help="quick check: hidden 128, 2 layers, seq 32")
    p.add_argument("--out", default=None, help="append the raw rows (JSON lines) here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # method:hidden:dtype:on|off
    p.add_argument("--inject-fault", action="store_true", help=argparse.SUPPRESS)  # tests: break the zeros check
    args = p.parse_args(argv)
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
    methods = sorted(args.methods, key=METHODS.index)
    print(f"`python benchmarks/training_cost.py {shlex.join(argv)}`\n\n{machine_info()}\n\n"
          f"{datetime.datetime.now().isoformat(timespec='seconds')}\n", flush=True)
    rows = []
    for hidden in args.hidden:
        for dtype in args.dtypes:
            for ckpt in ckpts:
                for method in methods:
                    rows.append(spawn(argv, f"{method}:{hidden}:{dtype}:{ckpt}", args.malloc))
    print(table(rows))
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
