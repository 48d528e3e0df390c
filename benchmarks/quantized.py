"""Masked LoRA and SPP on an NF4-quantized pruned model against the same runs on fp32 and bf16 bases.

Prunes once (Wanda; ``--prepared DIR`` keeps that checkpoint for later commands), then runs each (base, method, lr)
row in a fresh process on the pruned weights, saved in fp32, loaded as fp32, bf16 or NF4 with bf16 compute (``nf4``:
embeddings and norms in bf16; ``nf4-kbit``: through ``prepare_model_for_kbit_training``, in fp32; ``nf4-fit``:
``nf4`` from the weights ``sp.fit_to_4bit`` put on NF4's grid): train, merge (NF4: into the 4-bit layers and into
dequantized bf16), measure the linear weights' bytes, peak RSS (sampled every 5 ms; ``MALLOC``), median step,
held-out ppl, and that every layer keeps exactly its zeros. ``--eval-split validation``: scored on the last 10% of
wiki.valid.tokens (training on the rest), and once on wiki.test.raw:

    python benchmarks/quantized.py --bases bf16 nf4 nf4-fit --methods masked_lora --lr 1e-3 2e-3 --eval-split validation
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import sparse_peft as sp
from sparse_peft.data import (load_model_and_tokenizer, load_text, perplexity, random_windows, text_splits, token_ids,
                              train_validation_split)
from sparse_peft.quantized import dequantized_weight, is_quantized_linear

from common import PeakMemory, append_jsonl, assets_dir, machine_info, markdown_table, spawn, timed

BASES = ("fp32", "bf16", "nf4", "nf4-kbit", "nf4-fit")
LR = {"masked_lora": 1e-3, "spp": 4e-3}  # the recovery sweep's learning rates at this budget
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # fixed, so that a freed tensor leaves the RSS: it follows what is live


def token_splits(tokenizer, args) -> dict[str, torch.Tensor]:
    """Training / calibration / held-out ids: WikiText-2 from the development assets when present
    (train and calibrate on wiki.valid.tokens, evaluate on wiki.test.raw, as the recovery sweep),
    else the bundled excerpt or ``--data``."""
    data = Path(args.data) if args.data else (assets_dir() / "data" / "wikitext-2" if assets_dir() else None)
    if data is not None and data.is_dir():
        train = token_ids(tokenizer, load_text(data / "wiki.valid.tokens"))
        test = token_ids(tokenizer, load_text(data / "wiki.test.raw"))
        train, heldout = train_validation_split(train, 0.1) if args.eval_split == "validation" else (train, test)
        return {"train": train, "calibration": train, "heldout": heldout, "test": test}
    if args.eval_split == "validation":
        raise SystemExit("--eval-split validation needs a WikiText-2 folder (--data DIR with wiki.valid.tokens)")
    return text_splits(lambda text: token_ids(tokenizer, text), args.data)


def linear_masks(model) -> dict[str, torch.Tensor]:
    """Each prunable linear's nonzero pattern (quantized ones dequantized), by its plain-model name."""
    masks = {name.replace("base_model.model.", "").replace(".base_layer", ""): dequantized_weight(module) != 0
             for name, module in model.named_modules() if is_quantized_linear(module)}
    return masks or {name: linear.weight != 0 for name, linear in sp.sparsity.named_linears(model)}


def linear_weight_bytes(model) -> int:
    """Bytes the base's prunable linear weights hold: the tensor itself, or NF4's packed codes plus
    its quantization statistics (absmax, and the nested ones' when double-quantized)."""
    size = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
    quantized = [m for m in model.modules() if is_quantized_linear(m)]
    if not quantized:
        return sum(size(linear.weight) for _, linear in sp.sparsity.named_linears(model))
    states = [getattr(m.weight, "quant_state", None) for m in quantized]
    states += [getattr(state, "state2", None) for state in states]
    stats = sum(size(state.absmax) + size(state.code) for state in states if state is not None)
    return sum(size(m.weight) for m in quantized) + stats


def load_base(path: str, base: str):
    """One of ``BASES``: ``nf4`` keeps embeddings and norms in bf16, ``nf4-kbit`` in fp32 (peft's preparation)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if base.startswith("nf4"):
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map="cpu",
                                                     dtype=torch.bfloat16)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False) if base == "nf4-kbit" else model
    return AutoModelForCausalLM.from_pretrained(path, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[base])


def train(peft_model, batches, lr: float) -> list[float]:
    """AdamW + cosine without warm-up over ``batches`` (as the recovery sweep); the step times."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=len(batches))
    def step(batch):
        peft_model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    peft_model.train()
    times = [timed(lambda: step(batch))[1] for batch in batches]
    peft_model.eval()
    return times


def run_row(args) -> dict:
    """One (base, method) row, in this process."""
    from peft import get_peft_model
    from transformers import AutoTokenizer

    torch.manual_seed(args.seed)
    model = load_base(Path(args.pruned, "fit4bit") if args.base == "nf4-fit" else args.pruned, args.base)
    tokenizer = AutoTokenizer.from_pretrained(args.pruned)
    ids = token_splits(tokenizer, args)
    batches = random_windows(ids["train"], n=args.steps, seq_len=args.seq_len, seed=args.seed + 1,
                             batch_size=args.batch_size)
    n_eval = min(args.eval_windows, ids["heldout"].numel() // args.eval_seq_len)

    def ppl(m, text="heldout"):
        return perplexity(m, ids[text], n_windows=n_eval, seq_len=args.eval_seq_len, show_progress=False)

    masks = linear_masks(model)
    row = dict(base=args.base, method=args.method, steps=args.steps, lr=args.lr, eval_split=args.eval_split,
               linear_weight_mb=linear_weight_bytes(model) / 2**20, ppl_pruned=ppl(model))
    config = (sp.MaskedLoraConfig(r=8, lora_alpha=16) if args.method == "masked_lora" else sp.SPPConfig(r=16, alpha=1.0))
    memory = PeakMemory()
    memory.start()
    peft_model = get_peft_model(model, config)
    times = train(peft_model, batches, args.lr)
    memory.stop()
    row.update(rss_before_mb=memory.base / 2**20, peak_training_rss_mb=memory.peak / 2**20,
               step_time_s=statistics.median(times))
    if args.base.startswith("nf4"):
        with warnings.catch_warnings():  # the re-quantization's rounded-to-0 count is reported below
            warnings.simplefilter("ignore")
            peft_model.merge_adapter()
        row["rounded_to_zero_at_merge"] = sum(getattr(m, "rounded_to_zero", 0) for m in peft_model.modules())
        row["ppl_merged_nf4"] = ppl(peft_model)
        now = linear_masks(peft_model)  # re-quantization may round kept weights to 0, never the reverse
        row["zeros_kept_nf4"] = all(not bool((now[name] & ~mask).any()) for name, mask in masks.items())
        peft_model.unmerge_adapter()
        merged, _ = sp.merge_and_unload_dequantized(peft_model, torch.bfloat16)
    else:
        merged = peft_model.merge_and_unload()
    row["ppl_merged"] = ppl(merged)
    if args.eval_split == "validation":  # the test text, scored once, for the row the validation split chooses
        row["ppl_merged_test"] = ppl(merged, "test")
    now = linear_masks(merged)  # every layer holds exactly the zeros it had before training
    row["zeros_kept"] = now.keys() == masks.keys() and all(torch.equal(now[n], m) for n, m in masks.items())
    row["sparsity"] = sp.sparsity_report(merged).global_sparsity
    return row


def prepare(args, directory: Path) -> dict:
    """Prune once and save the checkpoint every row starts from (reused from ``--prepared`` if made alike)."""
    settings = {k: getattr(args, k) for k in ("model", "data", "sparsity", "calib_samples", "calib_seq_len",
                                              "eval_windows", "eval_seq_len", "seed", "eval_split")}
    done = json.loads((directory / "before.json").read_text()) if (directory / "before.json").exists() else {}
    if done.get("settings") == settings and ("nf4-fit" not in args.bases or (directory / "fit4bit").exists()):
        return done
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model)
    ids = token_splits(tokenizer, args)
    n_eval = min(args.eval_windows, ids["heldout"].numel() // args.eval_seq_len)
    dense = perplexity(model, ids["heldout"], n_windows=n_eval, seq_len=args.eval_seq_len, show_progress=False)
    calibration = random_windows(ids["calibration"], n=args.calib_samples, seq_len=args.calib_seq_len, seed=args.seed)
    sp.prune(model, method="wanda", sparsity=args.sparsity, calibration=calibration, show_progress=False)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if "nf4-fit" in args.bases:  # weights on bf16 NF4's grid, rounded on the calibration data
        sp.fit_to_4bit(model.to(torch.bfloat16), calibration, show_progress=False)  # saved in fp32 (exact), so
        model.float().save_pretrained(directory / "fit4bit")  # that every base loads and casts alike
    (directory / "before.json").write_text(json.dumps(dict(ppl_dense=dense, eval_windows=n_eval, settings=settings)))
    return json.loads((directory / "before.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id, local dir or .gguf (default: SmolLM2-135M GGUF)")
    parser.add_argument("--data", default=None, help="a WikiText-2 folder or a text file (default: the "
                        "development assets' WikiText-2, else the bundled excerpt)")
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=BASES)
    parser.add_argument("--methods", nargs="+", default=["masked_lora", "spp"], choices=sorted(LR))
    parser.add_argument("--sparsity", type=float, default=0.5)
    for flag, default in (("--steps", 200), ("--batch-size", 4), ("--seq-len", 128), ("--calib-samples", 128),
                          ("--calib-seq-len", 512), ("--eval-windows", 24), ("--eval-seq-len", 512), ("--seed", 0)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--lr", type=float, nargs="+", default=None, help="a row for each (default: %s)" % LR)
    parser.add_argument("--eval-split", choices=["test", "validation"], default="test", help="validation: test ppl too")
    parser.add_argument("--out", default=None, help="append one JSON line per row here")
    parser.add_argument("--prepared", default=None, help="keep the pruned checkpoint here, reuse it when present")
    parser.add_argument("--row", nargs=4, metavar=("BASE", "METHOD", "PRUNED_DIR", "LR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:  # a child process: one row, printed as JSON
        args.base, args.method, args.pruned, lr = args.row
        args.lr = float(lr)
        print(json.dumps(run_row(args)), flush=True)
        return

    with tempfile.TemporaryDirectory() as scratch:
        before = prepare(args, Path(directory := args.prepared or scratch))
        rows = []
        for method in args.methods:
            for lr, base in [(lr, base) for lr in (args.lr or [LR[method]]) for base in args.bases]:
                row = {**before, **spawn(__file__, [*sys.argv[1:], "--row", base, method, directory, repr(lr)],
                                         f"{base} {method} lr {lr:g}", env=MALLOC), "env": MALLOC}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    append_jsonl(args.out, [row])
    print(f"\n{machine_info()}; {time.strftime('%Y-%m-%d')}; ppl on {before['eval_windows']} x {args.eval_seq_len} "
          f"held-out tokens (dense {before['ppl_dense']:.2f})\n")
    test = ["test ppl merged"] if args.eval_split == "validation" else []
    header = ["method", "base", "lr", "linear weights (MB)", "peak training RSS (MB)", "step (s)", "ppl pruned",
              "ppl merged", "ppl merged into NF4", *test, "zeros kept"]
    print(markdown_table(header, "lllrrrrrr" + "r" * len(test) + "l", [
        [r["method"], r["base"], f"{r['lr']:g}", f"{r['linear_weight_mb']:.1f}", f"{r['peak_training_rss_mb']:.0f}",
         f"{r['step_time_s']:.2f}", *(f"{r[k]:.2f}" if k in r else "–" for k in (
             "ppl_pruned", "ppl_merged", "ppl_merged_nf4", *(["ppl_merged_test"] if test else []))),
         r["zeros_kept"] and r.get("zeros_kept_nf4", True)] for r in rows]))


if __name__ == "__main__":
    main()
