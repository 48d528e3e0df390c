"""Greedy decoding speed and memory of a sparse checkpoint: dense, packed and (CUDA) 2:4.

    python benchmarks/decode.py                                   # SmolLM2-135M, 50% and 70%, CPU, 1 thread
    python benchmarks/decode.py --variants dense,packed,packed-nocache --repeats 3
    python benchmarks/decode.py --device cuda                     # Llama-shaped random layers, bf16, + 2:4
    python benchmarks/decode.py --model random --hidden 64 --intermediate 128 --layers 2   # a tiny smoke run

For each sparsity the model is magnitude-pruned (2:4 for the 2:4 variant), written with
``sp.save_sparse``, and each variant is measured in a fresh subprocess, so its resident memory is
its own:

* ``dense``: ``sp.load_sparse(dir)``, plain ``nn.Linear`` layers;
* ``packed``: ``sp.load_sparse(dir, packed=True)``: ``BitmaskLinear`` layers (the Triton decode
  kernel on CUDA; on the CPU the PyTorch path with its decode cache, the default);
* ``packed-nocache``: the same with ``decode_cache=False`` (the CPU decodes each weight per call);
* ``2:4`` (CUDA only, 50% only): the 2:4 checkpoint loaded dense, each linear weight turned into
  PyTorch's ``SparseSemiStructuredTensor`` (``sparse_peft.ops.to_semi_structured``).

Each subprocess runs ``generate()`` (greedy, a fixed prompt, exactly ``--new-tokens`` new tokens)
once to warm up, then ``--repeats`` times; tokens/s is new tokens over the median time. Memory:
``RSS`` is the process's resident set after decoding (freed heap handed back with glibc's
``malloc_trim`` first), ``Δ RSS`` that minus the RSS before loading (torch and transformers
imported), ``peak RSS`` the largest resident set of the process (loading included), ``weights``
the model's parameter + buffer bytes plus any decode cache, and on CUDA the peak of allocated GPU
memory.

Same tokens, checked in the run: every packed variant must produce the dense tokens, or the script
exits with status 1 after the table. On the CPU the packed path computes the dense layers' exact
``F.linear``, so equality is exact. On CUDA the Triton kernel sums in another order than cuBLAS, so
a run may diverge at a near-tie: a first difference at a step where the dense run's two best
logits are within ``--tie-tolerance`` (default 0.05 on CUDA, 0 on the CPU) is reported, not failed.
The 2:4 variant prunes another mask, so its tokens are compared with its own dense weights, for
information only.

The prompt is the first ``--prompt-tokens`` tokens of ``wiki.test.raw`` in ``--data`` (a fixed
sentence if that file is missing); the random model takes seeded random ids.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA_DIR, load_model_and_tokenizer, load_text, machine_info  # noqa: E402

import sparse_peft as sp  # noqa: E402

VARIANTS = ("dense", "packed", "packed-nocache", "2:4")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FALLBACK_PROMPT = "The history of the city begins in the first century, when a small fort was built on the river"
MIB = 1024 * 1024


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default=None, help="hub id, local dir, .gguf, or 'random' (Llama-shaped random "
                   "layers); default: SmolLM2-135M GGUF on the CPU, 'random' on CUDA")
    p.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="dir with wiki.test.raw (the prompt)")
    p.add_argument("--hidden", type=int, default=4096, help="random model: hidden size (LLaMA-2-7B's)")
    p.add_argument("--intermediate", type=int, default=11008, help="random model: MLP size")
    p.add_argument("--layers", type=int, default=4, help="random model: decoder layers")
    p.add_argument("--vocab", type=int, default=32000, help="random model: vocabulary")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--variants", default=None, help=f"comma-separated of {','.join(VARIANTS)}; "
                   "default dense,packed (and 2:4 on CUDA)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (intra-op)")
    p.add_argument("--tie-tolerance", type=float, default=None)
    p.add_argument("--markdown", type=Path, help="also append the table (with command, hardware, date) here")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: measure one variant
    args = p.parse_args(argv)
    args.model = args.model or ("random" if args.device == "cuda" else None)
    args.dtype = DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    if args.tie_tolerance is None:
        args.tie_tolerance = 0.05 if args.device == "cuda" else 0.0
    default = "dense,packed,2:4" if args.device == "cuda" else "dense,packed"
    args.variants = [v.strip() for v in (args.variants or default).split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or "dense" not in args.variants:
        p.error(f"--variants must include dense and name only {', '.join(VARIANTS)}; got {','.join(args.variants)}")
    if not all(0 < s < 1 for s in args.sparsities):
        p.error(f"--sparsities must lie in (0, 1), got {args.sparsities}")
    if min(args.new_tokens, args.prompt_tokens, args.repeats, args.threads) < 1:
        p.error("--new-tokens, --prompt-tokens, --repeats and --threads must be at least 1")
    return args


# --- the model and its checkpoints (parent process) ---------------------------------------------------


def random_llama(args):
    """A Llama with ``--layers`` decoder layers of LLaMA-2-7B's shapes (default) and random weights:
    decode speed depends on the shapes, not on the values."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 128),
                         max_position_embeddings=args.prompt_tokens + args.new_tokens + 8)
    torch.manual_seed(0)
    with torch.device(args.device):  # built, and then pruned, on the GPU: seconds instead of minutes
        return AutoModelForCausalLM.from_config(config).eval(), None


def prompt_ids(args, tokenizer, vocab: int) -> list[int]:
    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (args.prompt_tokens,), generator=generator).tolist()
    text_file = Path(args.data) / "wiki.test.raw"
    text = load_text(text_file) if text_file.is_file() else FALLBACK_PROMPT
    ids = tokenizer(text[: 20 * args.prompt_tokens], add_special_tokens=False)["input_ids"]
    return ids[: args.prompt_tokens]


def write_checkpoint(args, directory: Path, sparsity: float | None, pattern: str | None) -> list[int]:
    """Prune a fresh copy of the model, save it with ``save_sparse``; returns the prompt ids."""
    model, tokenizer = random_llama(args) if args.model == "random" else load_model_and_tokenizer(args.model)
    sp.prune(model, method="magnitude", sparsity=sparsity, pattern=pattern, show_progress=False)
    sp.save_sparse(model.to(args.dtype), directory, show_progress=False)
    return prompt_ids(args, tokenizer, model.config.vocab_size)


# --- one variant in its own process (worker) -----------------------------------------------------------


def rss_mib() -> tuple[float, float]:
    """The process's resident set now and its peak (VmRSS, VmHWM), MiB, after handing freed heap
    back to the OS (glibc keeps it otherwise: the loader's transient copies would count as held)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may include freed heap
        pass
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", float("nan")), fields.get("VmHWM", float("nan"))


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a 2:4 ``SparseSemiStructuredTensor`` holds its kept values and metadata."""
    parts = [getattr(tensor, name, None) for name in ("packed", "meta")]
    if any(isinstance(part, torch.Tensor) for part in parts):
        return sum(p.numel() * p.element_size() for p in parts if isinstance(p, torch.Tensor))
    return tensor.numel() * tensor.element_size()


def weight_bytes(model) -> int:
    """Parameters + buffers (tied ones once) + the packed layers' decode caches."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(tensor_bytes(t) for t in tensors.values()) + sp.decode_cache_bytes(model)


def to_two_four(model) -> int:
    """Each linear's weight as a ``SparseSemiStructuredTensor`` where PyTorch takes it; returns how many."""
    from sparse_peft.ops import to_semi_structured

    converted = 0
    for _, linear in sp.sparsity.named_linears(model):
        weight = to_semi_structured(linear.weight.detach(), measure=False)
        if weight is not linear.weight:
            linear.weight = torch.nn.Parameter(weight, requires_grad=False)
            converted += 1
    return converted


def greedy(model, ids: torch.Tensor, new_tokens: int):
    """Greedy ``generate()`` of exactly ``new_tokens`` tokens: the new ids and the per-step gap between
    the two best logits."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    top2 = torch.stack(out.logits).float().topk(2, dim=-1).values  # (steps, 1, 2)
    gaps = (top2[..., 0] - top2[..., 1]).reshape(-1).tolist()
    return out.sequences[0, ids.shape[1]:].tolist(), gaps


def measure(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    rss_before, _ = rss_mib()
    variant = job["variant"]
    model = sp.load_sparse(job["checkpoint"], packed=variant.startswith("packed"), device=device,
                           decode_cache=variant != "packed-nocache", show_progress=False)
    ids = torch.tensor([job["prompt"]], device=device)
    note = ""
    own_dense_tokens = None
    if variant == "2:4":
        own_dense_tokens, _ = greedy(model, ids, job["new_tokens"])
        note = f"{to_two_four(model)} linears semi-structured"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens, gaps = greedy(model, ids, job["new_tokens"])  # warm-up: also builds the CPU decode cache
    times = []
    for _ in range(job["repeats"]):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        greedy(model, ids, job["new_tokens"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    rss_after, rss_peak = rss_mib()
    return {
        "variant": variant, "tokens": tokens, "gaps": gaps, "own_dense_tokens": own_dense_tokens, "note": note,
        "tok_s": job["new_tokens"] / statistics.median(times), "times": times,
        "rss_mib": rss_after, "rss_delta_mib": rss_after - rss_before, "rss_peak_mib": rss_peak,
        "weights_mib": weight_bytes(model) / MIB, "cache_mib": sp.decode_cache_bytes(model) / MIB,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / MIB if device.type == "cuda" else float("nan"),
    }


def run_worker(job: dict) -> dict:
    """``measure(job)`` in a fresh interpreter, so that its RSS is the variant's alone."""
    with tempfile.TemporaryDirectory() as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps({**job, "result": str(result_file)}))
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(job_file)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0 or not result_file.is_file():
            raise RuntimeError(f"{job['variant']} worker failed (status {done.returncode}):\n{done.stdout[-4000:]}")
        return json.loads(result_file.read_text())


# --- comparing tokens and the table ----------------------------------------------------------------------


def same_tokens(dense: dict, other: dict, tie_tolerance: float) -> tuple[bool, str]:
    """Whether ``other`` decoded dense's tokens; a first difference at a dense near-tie is allowed."""
    want, got = dense["tokens"], other["tokens"]
    if want == got:
        return True, "yes"
    step = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    gap = dense["gaps"][step] if step < len(dense["gaps"]) else float("nan")
    if gap <= tie_tolerance:
        return True, f"same up to step {step}, a near-tie (top-2 gap {gap:.3g})"
    return False, f"**NO**: differ from step {step} (top-2 gap {gap:.3g})"


def table(rows: list[dict], cuda: bool) -> str:
    header = ("| sparsity | variant | tokens/s | x dense | RSS MiB | Δ RSS MiB | peak RSS MiB | weights MiB "
              "| decode cache MiB "
              + ("| GPU peak MiB " if cuda else "") + "| same tokens as dense | note |")
    lines = [header, "|---:|---|" + "---:|" * (8 if cuda else 7) + "---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['sparsity']:.0%} | {r['variant']} " + "| – " * (8 if cuda else 7)
                         + f"| – | {r['skipped']} |")
            continue
        gpu = f"| {r['cuda_peak_mib']:.0f} " if cuda else ""
        lines.append(f"| {r['sparsity']:.0%} | {r['variant']} | {r['tok_s']:.2f} | {r['x_dense']:.2f} | "
                     f"{r['rss_mib']:.0f} | {r['rss_delta_mib']:.0f} | {r['rss_peak_mib']:.0f} | {r['weights_mib']:.1f} | "
                     f"{r['cache_mib']:.1f} "
                     f"{gpu}| {r['same']} | {r['note']} |")
    return "\n".join(lines)


def ready(args) -> str | None:
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda needs a CUDA GPU; none is visible here, so nothing was measured"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        job = json.loads(args.worker.read_text())
        Path(job["result"]).write_text(json.dumps(measure(job)))
        return 0
    reason = ready(args)
    if reason is not None:
        print(reason, file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    rows, failures = [], []
    common_job = {"device": args.device, "new_tokens": args.new_tokens, "repeats": args.repeats,
                  "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in args.sparsities:
            checkpoint = Path(tmp) / f"magnitude-{sparsity}"
            prompt = write_checkpoint(args, checkpoint, sparsity, None)
            job = {**common_job, "checkpoint": str(checkpoint), "prompt": prompt}
            dense = run_worker({**job, "variant": "dense"})
            for variant in args.variants:
                if variant == "2:4":
                    rows.append(two_four_row(args, tmp, job, sparsity, dense))
                    continue
                result = dense if variant == "dense" else run_worker({**job, "variant": variant})
                ok, same = same_tokens(dense, result, args.tie_tolerance)
                if not ok:
                    failures.append(f"{variant} at {sparsity:.0%}: {same}")
                rows.append({**result, "sparsity": sparsity, "same": same, "x_dense": result["tok_s"] / dense["tok_s"]})
                print(table(rows[-1:], args.device == "cuda").splitlines()[-1], flush=True)

    command = "python benchmarks/decode.py " + " ".join(sys.argv[1:] if argv is None else argv)
    hardware = machine_info() if args.device == "cpu" else f"{torch.cuda.get_device_name(0)}; {machine_info()}"
    model = "Llama-shaped random layers" if args.model == "random" else (args.model or "SmolLM2-135M (GGUF)")
    report = (f"Command: `{command.strip()}`\n\n"  # blank lines: one markdown paragraph each
              f"Hardware: {hardware}\n\n"
              f"Date: {datetime.date.today().isoformat()}; model {model}, {str(args.dtype).removeprefix('torch.')}, "
              f"magnitude pruning, greedy, {args.prompt_tokens} prompt + {args.new_tokens} new tokens, "
              f"median of {args.repeats}\n\n" + table(rows, args.device == "cuda") + "\n")
    print("\n" + report)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + report)
    if failures:
        print("FAILED: packed tokens differ from dense: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


def two_four_row(args, tmp: str, job: dict, sparsity: float, dense: dict) -> dict:
    """The 2:4 variant beside a sparsity's rows: measured at 50% (2:4 is 50% by definition) on CUDA."""
    base = {"variant": "2:4", "sparsity": sparsity}
    if args.device != "cuda":
        return {**base, "skipped": "PyTorch's 2:4 sparse GEMM needs CUDA"}
    if abs(sparsity - 0.5) > 1e-9:
        return {**base, "skipped": "2:4 is 50% sparse: measured in the 50% rows"}
    checkpoint = Path(tmp) / "two-four"
    write_checkpoint(args, checkpoint, None, "2:4")
    result = run_worker({**job, "checkpoint": str(checkpoint), "variant": "2:4"})
    own = result["own_dense_tokens"]
    matched = sum(a == b for a, b in zip(own, result["tokens"]))
    same = f"own mask: {matched}/{len(own)} tokens as its dense weights"
    return {**result, **base, "same": same, "x_dense": result["tok_s"] / dense["tok_s"]}


if __name__ == "__main__":
    sys.exit(main())
