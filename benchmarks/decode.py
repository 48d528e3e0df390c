"""Greedy decoding speed and memory of a sparse checkpoint: dense and packed.

    python benchmarks/decode.py                                   # SmolLM2-135M, 50% and 70%, CPU, 1 thread
    python benchmarks/decode.py --variants dense,packed,packed-nocache --repeats 3
    python benchmarks/decode.py --device cuda                     # Llama-shaped random layers, bf16
    python benchmarks/decode.py --model random --hidden 64 --intermediate 128 --layers 2   # a tiny smoke run

Each variant (docs/results/checkpoints.md) loads each sparsity's magnitude-pruned checkpoint in a fresh process, so
its memory is its own. tokens/s: ``--new-tokens`` greedy tokens over the median of ``--repeats`` ``generate()`` calls
after a warm-up. ``RSS``: the resident set after decoding (after ``malloc_trim``); ``Δ RSS``: minus the RSS before
loading; ``peak RSS``: the process's largest; ``weights``: ``get_memory_footprint()`` (parameters and buffers) plus
any decode cache; on CUDA the peak of allocated memory.

Every packed variant must decode the dense tokens, or the script exits with status 1 after the table; on CUDA (another
summation order than cuBLAS) a first difference at a near-tie of the dense run's two best logits is reported, not
failed (2:4 through PyTorch's sparse GEMM: ``kernel_timings.py --ops 2:4``). The prompt: the start of ``wiki.test.raw`` in
``--data`` (a fixed sentence without it; random ids for 'random').
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MIB, TORCH_DTYPES, append, arg_parser, comma_list, command_line, machine_info, markdown_table,
    max_rss_bytes, random_llama, rss_bytes, spawn, timed, trim_heap)

import sparse_peft as sp  # noqa: E402
from sparse_peft.data import load_model_and_tokenizer, load_text  # noqa: E402

VARIANTS = ("dense", "packed", "packed-nocache")
TIE_TOLERANCE = 0.05  # CUDA: the largest top-2 logit gap of dense at which another token is a near-tie
FALLBACK_PROMPT = "The history of the city begins in the first century, when a small fort was built on the river"


def parse_args(argv=None) -> argparse.Namespace:
    p = arg_parser(__doc__, threads=1, data="dir with wiki.test.raw (the prompt)",
                   model="hub id, local dir, .gguf, or 'random' (Llama-shaped random layers); default: SmolLM2-135M "
                   "GGUF on the CPU, 'random' on CUDA")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    for flag, default, what in (("--hidden", 4096, "hidden size"), ("--intermediate", 11008, "MLP size"),
                                ("--layers", 4, "decoder layers"), ("--vocab", 32000, "vocabulary")):
        p.add_argument(flag, type=int, default=default, help=f"random model: {what}")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--variants", type=comma_list(str.strip, VARIANTS),
                   help="comma-separated, with dense; default dense,packed")
    p.add_argument("--dtype", choices=sorted(TORCH_DTYPES), help="default float32 on CPU, bfloat16 on CUDA")
    for flag, default in (("--new-tokens", 32), ("--prompt-tokens", 32), ("--repeats", 5)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--markdown", type=Path, help="also append the table (with command, hardware, date) here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one variant (a JSON job)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.model = args.model or ("random" if cuda else None)
    args.dtype = TORCH_DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    args.tie_tolerance = TIE_TOLERANCE if cuda else 0.0
    args.variants = args.variants or ["dense", "packed"]
    if "dense" not in args.variants:
        p.error(f"--variants must include dense; got {','.join(args.variants)}")
    if not all(0 < s < 1 for s in args.sparsities):
        p.error(f"--sparsities must lie in (0, 1), got {args.sparsities}")
    if min(args.new_tokens, args.prompt_tokens, args.repeats, args.threads) < 1:
        p.error("--new-tokens, --prompt-tokens, --repeats and --threads must be at least 1")
    return args


# --- the model and its checkpoints (parent process) ---------------------------------------------------


def write_checkpoint(args, directory: Path, sparsity: float) -> list[int]:
    """Prune a fresh copy of the model, save it with ``save_sparse``; returns the prompt ids."""
    if args.model == "random":  # LLaMA-2-7B's shapes by default; built, and pruned, on the GPU: seconds
        with torch.device(args.device):
            model = random_llama(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                                 vocab=args.vocab, heads=max(1, args.hidden // 128),
                                 max_position_embeddings=args.prompt_tokens + args.new_tokens + 8).eval()
        generator = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, args.vocab, (args.prompt_tokens,), generator=generator).tolist()
    else:
        model, tokenizer = load_model_and_tokenizer(args.model)
        text_file = Path(args.data) / "wiki.test.raw"
        text = load_text(text_file) if text_file.is_file() else FALLBACK_PROMPT
        prompt = tokenizer(text[: 20 * args.prompt_tokens], add_special_tokens=False)["input_ids"][: args.prompt_tokens]
    sp.prune(model, method="magnitude", sparsity=sparsity, show_progress=False)
    sp.save_sparse(model.to(args.dtype), directory, show_progress=False)
    return prompt


# --- one variant in its own process (worker) -----------------------------------------------------------


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
    device, variant, new_tokens = torch.device(job["device"]), job["variant"], job["new_tokens"]
    cuda = device.type == "cuda"
    trim_heap()  # freed heap back to the OS: the loader's transient copies would count as held otherwise
    rss_before = rss_bytes() / MIB
    model = sp.load_sparse(job["checkpoint"], packed=variant.startswith("packed"), device=device,
                           decode_cache=variant != "packed-nocache", show_progress=False)
    ids = torch.tensor([job["prompt"]], device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tokens, gaps = greedy(model, ids, new_tokens)  # warm-up: also builds the CPU decode cache
    times = [timed(lambda: greedy(model, ids, new_tokens), cuda)[1] for _ in range(job["repeats"])]
    trim_heap()
    rss_after, rss_peak = rss_bytes() / MIB, max_rss_bytes() / MIB
    return {
        "variant": variant, "tokens": tokens, "gaps": gaps,
        "tok_s": new_tokens / statistics.median(times), "times": times,
        "rss_mib": rss_after, "rss_delta_mib": rss_after - rss_before, "rss_peak_mib": rss_peak,
        "cache_mib": sp.decode_cache_bytes(model) / MIB,
        "weights_mib": (model.get_memory_footprint() + sp.decode_cache_bytes(model)) / MIB,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / MIB if cuda else float("nan"),
    }


def run_worker(job: dict) -> dict:
    """``measure(job)`` in a fresh interpreter, so that its RSS is the variant's alone."""
    return spawn(__file__, ["--worker", json.dumps(job)], label=job["variant"])


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
    header = ["sparsity", "variant", "tokens/s", "x dense", "RSS MiB", "Δ RSS MiB", "peak RSS MiB", "weights MiB",
              "decode cache MiB", *(["GPU peak MiB"] if cuda else []), "same tokens as dense"]
    lines = [[f"{r['sparsity']:.0%}", r["variant"], f"{r['tok_s']:.2f}", f"{r['x_dense']:.2f}",
              *(f"{r[key]:.0f}" for key in ("rss_mib", "rss_delta_mib", "rss_peak_mib")),
              f"{r['weights_mib']:.1f}", f"{r['cache_mib']:.1f}", *([f"{r['cuda_peak_mib']:.0f}"] if cuda else []),
              r["same"]] for r in rows]
    return markdown_table(header, "rl" + "r" * (len(header) - 3) + "l", lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda needs a CUDA GPU; none is visible here, so nothing was measured", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in args.sparsities:
            checkpoint = Path(tmp) / f"magnitude-{sparsity}"
            job = {"device": args.device, "new_tokens": args.new_tokens, "repeats": args.repeats,
                   "threads": args.threads, "checkpoint": str(checkpoint),
                   "prompt": write_checkpoint(args, checkpoint, sparsity)}
            dense = run_worker({**job, "variant": "dense"})
            for variant in args.variants:
                result = dense if variant == "dense" else run_worker({**job, "variant": variant})
                ok, same = same_tokens(dense, result, args.tie_tolerance)
                if not ok:
                    failures.append(f"{variant} at {sparsity:.0%}: {same}")
                rows.append({**result, "sparsity": sparsity, "same": same, "x_dense": result["tok_s"] / dense["tok_s"]})
                print(table(rows[-1:], args.device == "cuda").splitlines()[-1], flush=True)
    text = report(args, argv, rows)
    print("\n" + text)
    if args.markdown:
        append(args.markdown, "\n" + text)
    if failures:
        print("FAILED: packed tokens differ from dense: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


def report(args, argv, rows: list[dict]) -> str:
    """The command, hardware, settings and table, one markdown paragraph each."""
    hardware = machine_info() if args.device == "cpu" else f"{torch.cuda.get_device_name(0)}; {machine_info()}"
    model = "Llama-shaped random layers" if args.model == "random" else (args.model or "SmolLM2-135M (GGUF)")
    return (f"Command: `{command_line(__file__, argv)}`\n\nHardware: {hardware}\n\n"
            f"Date: {datetime.date.today().isoformat()}; model {model}, {str(args.dtype).removeprefix('torch.')}, "
            f"magnitude pruning, greedy, {args.prompt_tokens} prompt + {args.new_tokens} new tokens, "
            f"median of {args.repeats}\n\n" + table(rows, args.device == "cuda") + "\n")


if __name__ == "__main__":
    sys.exit(main())
