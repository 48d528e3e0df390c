"""Feature-level Sparsity Induction measured: does a short tuning stage with the spectral-norm loss
make the dense model prune better?

    python benchmarks/induction_spectral.py --lambdas 0,1 --targets 0.7 --pruner wanda --threads 1

For every λ in ``--lambdas`` the script copies the dense model, tunes its decoder blocks for
``--steps`` AdamW steps on windows of wiki.valid with ``CE + λ · SpectralNormLoss`` (the same
batches, order and schedule for every λ), measures the tuned dense model (wikitext ppl, and the
mean log stable rank of every layer's features on held-out windows of wiki.test), then prunes a
fresh copy of the tuned model with ``--pruner`` for every target (the same calibration windows)
and measures the ppl again.

λ > 0 lowers the features' stable rank (the paper's direction), λ < 0 raises it; write negative
values with ``=`` (``--lambdas=-1``) so argparse does not read them as flags. On SmolLM2 at Wanda
70% the second direction helped and the first hurt (docs/benchmarks.md).

**λ = 0 is the control, not the untuned model.** Tuning on in-domain text lowers the ppl by itself,
before and after pruning; the effect of the spectral term is the λ > 0 row against the λ = 0 row at
the same steps, lr and data. ``--untuned`` adds the rows of the model as loaded (no tuning).

What is trained: every parameter of the decoder blocks and the final norm (the features the loss
reads are their outputs); the embeddings (tied to the output head in SmolLM2) stay frozen, so the
vocabulary side is the same in every row. One JSON line per (λ, target) goes to ``--out``; a
markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA_DIR, load_model_and_tokenizer, load_text, machine_info, perplexity  # noqa: E402

import sparse_peft as sp  # noqa: E402
from sparse_peft._progress import progress  # noqa: E402
from sparse_peft.data import random_windows, token_ids  # noqa: E402
from sparse_peft.training.spectral import (  # noqa: E402
    FEATURES,
    SpectralNormLoss,
    capture_linear_inputs,
    spectral_compute_loss,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="hub id, local dir or .gguf (default: SmolLM2-135M GGUF)")
    p.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="dir with wiki.test.raw and wiki.valid.tokens")
    p.add_argument("--lambdas", default="0,1", help="spectral weights, comma-separated (0 = the CE-only control)")
    p.add_argument("--untuned", action="store_true", help="also prune the model as loaded (no tuning)")
    p.add_argument("--pruner", default="wanda", choices=["wanda", "sparsegpt", "magnitude"])
    p.add_argument("--targets", default="0.7", help="sparsities and N:M patterns, comma-separated")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--power-iterations", type=int, default=10)
    p.add_argument("--features", default="linear_inputs", choices=FEATURES,
                   help="what the term reads (docs/induction.md): the linears' inputs or the residual stream")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--rank-windows", type=int, default=8, help="held-out windows (of --seq-len) for the stable rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/induction_spectral.jsonl")
    return p.parse_args(argv)


def parse_target(target: str) -> dict:
    return {"pattern": target} if ":" in target else {"sparsity": float(target)}


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """Decoder blocks and final norm train; the (tied) embeddings stay frozen."""
    embedding_ids = {id(p) for p in model.get_input_embeddings().parameters()}
    output = model.get_output_embeddings()
    if output is not None:
        embedding_ids |= {id(p) for p in output.parameters()}
    params = []
    for p in model.parameters():
        p.requires_grad_(id(p) not in embedding_ids)
        if p.requires_grad:
            params.append(p)
    return params


def tune(model, batches, lr: float, spectral_lambda: float, spectral_loss: SpectralNormLoss) -> dict:
    """AdamW + cosine (no warmup) over ``batches``; returns the last-10-step means of both loss parts."""
    from transformers import get_cosine_schedule_with_warmup

    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=len(batches))
    parts_log, step_times = [], []
    model.train()
    bar = progress(batches, f"tuning λ={spectral_lambda:g}")
    for batch in bar:
        t0 = time.perf_counter()
        loss, _, parts = spectral_compute_loss(model, {"input_ids": batch, "labels": batch}, spectral_lambda,
                                               spectral_loss, return_parts=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"tuning λ={spectral_lambda}: loss {loss.item()} at step {len(step_times) + 1}")
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        parts_log.append(parts)
        bar.set_postfix(ce=f"{parts['ce']:.3f}", spectral=f"{parts['spectral']:.3f}")
    model.eval()
    model.requires_grad_(False)
    tail = parts_log[-10:]
    return {"train_ce_last10": statistics.fmean(p["ce"] for p in tail),
            "train_spectral_last10": statistics.fmean(p["spectral"] for p in tail),
            "train_spectral_first": parts_log[0]["spectral"],
            "step_time_s": statistics.median(step_times)}


@torch.no_grad()
def heldout_stable_rank(model, windows, iterations: int) -> dict:
    """Mean log stable rank on held-out windows, of both feature kinds (the one trained and the other),
    from one forward per window."""
    per_window = {features: [] for features in FEATURES}
    losses = {features: SpectralNormLoss(iterations=iterations, features=features) for features in FEATURES}
    for window in windows:
        with capture_linear_inputs(model) as linear_inputs:
            hidden_states = model(input_ids=window, output_hidden_states=True).hidden_states
        for features, matrices in (("hidden_states", hidden_states), ("linear_inputs", linear_inputs)):
            per_window[features].append(losses[features].per_layer(matrices))
    measured = {}
    for features, values in per_window.items():
        per_matrix = torch.stack(values).mean(dim=0)
        measured[f"heldout_log_stable_rank_{features}"] = float(per_matrix.mean())
        measured[f"heldout_log_stable_rank_{features}_max"] = float(per_matrix.max())
    return measured


def table(rows: list[dict]) -> str:
    features, pruner = (rows[0]["features"], rows[0]["pruner"]) if rows else ("", "")
    lines = [f"| tuning | λ | target | dense ppl after tuning | held-out log stable rank ({features}) | "
             f"{pruner} ppl after pruning | sparsity |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        tuning = "none" if r["lambda"] is None else ("CE" if r["lambda"] == 0 else "CE + λ·spectral")
        lam = "-" if r["lambda"] is None else f"{r['lambda']:g}"
        lines.append(f"| {tuning} | {lam} | {r['target']} | {r['ppl_tuned']:.2f} | "
                     f"{r['heldout_log_stable_rank_' + r['features']]:.3f} | {r['ppl_pruned']:.1f} | "
                     f"{100 * r['sparsity']:.2f}% |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/induction_spectral.py " + " ".join(sys.argv[1:] if argv is None else argv)
    data = Path(args.data)
    dense, tokenizer = load_model_and_tokenizer(args.model)
    dense.requires_grad_(False)
    train_ids = token_ids(tokenizer, load_text(data / "wiki.valid.tokens"))
    test_ids = token_ids(tokenizer, load_text(data / "wiki.test.raw"))
    # The same windows for every arm: training batches, calibration, held-out rank windows.
    batches = random_windows(train_ids, n=args.steps, seq_len=args.seq_len, seed=args.seed + 1,
                             batch_size=args.batch_size)
    calibration = random_windows(train_ids, n=args.calib_samples, seq_len=args.calib_seq_len, seed=args.seed)
    rank_windows = random_windows(test_ids, n=args.rank_windows, seq_len=args.seq_len, seed=args.seed)
    spectral_loss = SpectralNormLoss(iterations=args.power_iterations, features=args.features)
    targets = args.targets.split(",")
    arms = ([None] if args.untuned else []) + [float(x) for x in args.lambdas.split(",")]
    rows = []
    for spectral_lambda in arms:
        torch.manual_seed(args.seed)
        tuned = copy.deepcopy(dense)
        t0 = time.time()
        tuning = {} if spectral_lambda is None else tune(tuned, batches, args.lr, spectral_lambda, spectral_loss)
        tune_s = time.time() - t0
        measured = {"ppl_tuned": perplexity(tuned, test_ids, n_windows=args.eval_windows, seq_len=args.eval_seq_len),
                    **heldout_stable_rank(tuned, rank_windows, args.power_iterations)}
        print(json.dumps({"lambda": spectral_lambda, **tuning, **measured}), flush=True)
        for target in targets:
            pruned = copy.deepcopy(tuned)
            t1 = time.time()
            sp.prune(pruned, method=args.pruner, calibration=calibration, **parse_target(target))
            prune_s = time.time() - t1
            row = {"lambda": spectral_lambda, "pruner": args.pruner, "target": target, "features": args.features,
                   "steps": args.steps,
                   "seq_len": args.seq_len, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                   **tuning, **measured, "tune_s": tune_s, "prune_s": prune_s,
                   "ppl_pruned": perplexity(pruned, test_ids, n_windows=args.eval_windows,
                                            seq_len=args.eval_seq_len),
                   "sparsity": sp.sparsity.sparsity_report(pruned).global_sparsity,
                   "eval": f"{args.eval_windows}x{args.eval_seq_len} wiki.test.raw",
                   "calibration": f"{args.calib_samples}x{args.calib_seq_len} wiki.valid.tokens seed {args.seed}",
                   "command": command, "machine": machine_info(),
                   "time": datetime.datetime.now().isoformat(timespec="seconds")}
            rows.append(row)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("lambda", "target", "ppl_tuned", "ppl_pruned")}), flush=True)
            del pruned
        del tuned
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
