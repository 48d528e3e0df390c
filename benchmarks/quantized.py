"""Masked LoRA on an NF4-quantized pruned model against the same on the float pruned model.

Prunes SmolLM2-135M (default; ``--model`` for any other) with Wanda, trains masked LoRA for a short
budget on the float pruned model and, from the same pruned weights loaded with bitsandbytes NF4, on
the quantized one; prints the held-out perplexity of each stage, the kept weights NF4 rounded to 0
(at loading and at the merge) and checks every pruned weight is exactly 0 after each merge:

    python benchmarks/quantized.py --steps 20
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import sparse_peft as sp
from sparse_peft.data import load_model_and_tokenizer, perplexity, random_windows, text_splits, token_ids
from sparse_peft.quantized import dequantized_weight, is_quantized_linear


def masks_of(model) -> dict[str, torch.Tensor]:
    """Each prunable linear's mask, float or quantized (dequantized), by its name in the plain model."""
    masks = {}
    for name, module in model.named_modules():
        name = name.replace("base_model.model.", "").replace(".base_layer", "")
        if is_quantized_linear(module):
            masks[name] = dequantized_weight(module) != 0
    if not masks:
        masks = {name: linear.weight != 0 for name, linear in sp.sparsity.named_linears(model)}
    return masks


def pruned_zero(model, masks: dict[str, torch.Tensor]) -> bool:
    now = masks_of(model)
    return all(not bool((now[name] & ~mask).any()) for name, mask in masks.items())


def train(peft_model, batches, lr: float) -> float:
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    start = time.time()
    for batch in batches:
        peft_model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id, local dir or .gguf (default: SmolLM2-135M GGUF)")
    parser.add_argument("--data", default=None, help="a text file (default: the bundled WikiText-2 excerpt)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    model, tokenizer = load_model_and_tokenizer(args.model)
    ids = text_splits(lambda text: token_ids(tokenizer, text), args.data)
    n_eval = min(args.eval_windows, ids["heldout"].numel() // args.seq_len)

    def ppl(m):
        return perplexity(m, ids["heldout"], n_windows=n_eval, seq_len=args.seq_len, show_progress=False)

    rows = [("dense fp32", ppl(model), "")]
    calibration = random_windows(ids["calibration"], n=16, seq_len=args.seq_len, seed=args.seed)
    sp.prune(model, method="wanda", sparsity=args.sparsity, calibration=calibration, show_progress=False)
    float_masks = masks_of(model)
    rows.append((f"Wanda {args.sparsity:.0%} fp32", ppl(model), ""))
    batches = random_windows(ids["train"], n=args.steps, seq_len=args.seq_len, seed=args.seed + 1, batch_size=4)
    config = dict(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear")

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        quantized = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=bnb, device_map="cpu")
    nf4_masks = masks_of(quantized)
    kept = sum(int(m.sum()) for m in float_masks.values())
    lost_at_load = kept - sum(int(m.sum()) for m in nf4_masks.values())
    rows.append((f"Wanda {args.sparsity:.0%} NF4", ppl(quantized),
                 f"NF4 rounded {lost_at_load} of {kept} kept weights to 0"))

    peft_model = get_peft_model(model, sp.MaskedLoraConfig(**config))
    seconds = train(peft_model, batches, args.lr)
    merged = peft_model.merge_and_unload()
    rows.append((f"+ masked LoRA {args.steps} steps, merged fp32", ppl(merged),
                 f"train {seconds:.0f}s; pruned weights 0: {pruned_zero(merged, float_masks)}"))

    quantized = prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False)
    peft_model = get_peft_model(quantized, sp.MaskedLoraConfig(**config))
    seconds = train(peft_model, batches, args.lr)
    rows.append((f"+ masked LoRA {args.steps} steps on NF4, unmerged", ppl(peft_model), f"train {seconds:.0f}s"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.merge_adapter()
    rounded = sum(m.rounded_to_zero for m in peft_model.modules() if hasattr(m, "rounded_to_zero"))
    rows.append(("  merged into NF4", ppl(peft_model),
                 f"re-quantization rounded {rounded} kept weights to 0; pruned weights 0: "
                 f"{pruned_zero(peft_model, nf4_masks)}"))
    peft_model.unmerge_adapter()
    dequantized, _ = sp.merge_and_unload_dequantized(peft_model, torch.float32)
    rows.append(("  merged into dequantized fp32", ppl(dequantized),
                 f"mask = NF4 mask: {all(torch.equal(l.weight != 0, nf4_masks[n]) for n, l in sp.sparsity.named_linears(dequantized))}"))

    print(f"\nperplexity, {n_eval} x {args.seq_len} held-out tokens\n")
    print("| model | ppl | |\n|---|---:|---|")
    for name, value, note in rows:
        print(f"| {name} | {value:.2f} | {note} |")


if __name__ == "__main__":
    main()
