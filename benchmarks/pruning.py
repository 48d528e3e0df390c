"""Perplexity of one-shot pruning: dense, then every method x sparsity on a fresh copy of the model.

    python benchmarks/pruning.py                      # SmolLM2-135M GGUF, WikiText-2, the reference grid
    python benchmarks/pruning.py --model HuggingFaceTB/SmolLM2-135M --methods wanda --sparsities 0.5
    python benchmarks/pruning.py --methods wanda,sparsegpt --sparsities 0.7,2:4 --induce   # with vs without

``--induce`` adds a "<method>+induce" row after every method: the same pruner after Sparsity Induction
(docs/induction.md); ``--induce only`` runs only those. Prints a markdown table and appends one JSON line per run to
--out; ``--markdown FILE`` appends the section (command, settings, machine, table) to FILE.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MODEL_HELP, append, append_jsonl, arg_parser, comma_list, command_line, machine_info, markdown_table)

import sparse_peft.sparsity as sps  # noqa: E402
from sparse_peft.data import (  # noqa: E402
    load_model_and_tokenizer, load_text, perplexity, random_windows, token_ids)
from sparse_peft.sparsity.prune import ALLOCATIONS  # noqa: E402

# Reference figures measured on the default model before this script existed (SmolLM2-135M-Instruct Q4_1 GGUF, 24 x 512
# tokens of wiki.test.raw): what this script should reproduce.
REFERENCE_PPL = {
    ("dense", "-"): 32.3,
    ("magnitude", "0.5"): 418.6, ("wanda", "0.5"): 72.9, ("sparsegpt", "0.5"): 65.3,
    ("magnitude", "0.7"): 28305.0, ("wanda", "0.7"): 1117.5, ("sparsegpt", "0.7"): 337.3,
    ("magnitude", "2:4"): 1581.7, ("wanda", "2:4"): 236.4, ("sparsegpt", "2:4"): 124.2,
}
SECTION_TITLE = "## Pruning (`sparse_peft.prune`) on SmolLM2-135M"  # the heading in docs/results/pruning.md
INDUCE_RUNS = {"no": (False,), "only": (True,), "both": (False, True)}  # --induce: without, with induction


def parse_args(argv=None):
    parser = arg_parser(__doc__, model=MODEL_HELP, data="dir with wiki.test.raw and wiki.valid.tokens", threads=2)
    parser.add_argument("--methods", type=comma_list(str), default=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--sparsities", type=comma_list(str), default=["0.5", "0.7", "2:4"],
                        help="comma list of fractions and N:M patterns")
    parser.add_argument("--allocation", default="uniform", choices=ALLOCATIONS)
    parser.add_argument("--induce", nargs="?", const="both", default="no", choices=["no", "only", "both"],
                        help="Sparsity Induction before pruning: rows '<method>+induce' (bare flag: both)")
    parser.add_argument("--induce-alpha", type=float, default=1.0, help="induce_sparsity alpha")
    parser.add_argument("--induce-pairs", default=None,
                        help="induce_sparsity folds, comma-separated (a subset of qkv,gate_up,vo,down); default: "
                             "prune's (all four; the column folds qkv,gate_up for unstructured sparsegpt)")
    for flag, default in (("--calib-samples", 128), ("--calib-seq-len", 512), ("--eval-windows", 24),
                          ("--eval-seq-len", 512), ("--seed", 0)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--out", default="results.jsonl", help="JSON lines appended here")
    parser.add_argument("--markdown", default=None, help="append the markdown section to this file")
    return parser.parse_args(argv)


def results_table(rows: list[dict], with_reference: bool) -> str:
    lines = []
    for row in rows:
        reference = REFERENCE_PPL.get((row["method"], row["target"])) if with_reference else None
        lines.append([row["method"], row["target"], f"{row['ppl']:,.1f}", f"{reference:,.1f}" if reference else "-",
                      f"{row['ppl'] / reference:.3f}" if reference else "-", f"{100 * row['global_sparsity']:.2f}%",
                      f"{row['prune_seconds']:.0f} s"])
    return markdown_table(["method", "target", "ppl", "reference ppl", "ratio", "global sparsity", "prune time"],
                          "llrrrrr", lines)


def markdown_section(rows: list[dict], model: str | None, fields: dict) -> str:
    allocation = fields["allocation"]
    dense = next((row for row in rows if row["method"] == "dense"), None)
    dense_note = f" (the dense model already has {100 * dense['global_sparsity']:.2f}% exact zeros)" if dense else ""
    return "\n".join([
        SECTION_TITLE if model is None else f"## Pruning (`sparse_peft.prune`) on {model}",
        "",
        f"Command: `{fields['command']}`",
        "",
        f"- calibration: {fields['calibration']}",
        f"- evaluation: perplexity on the {fields['eval']}",
        f"- allocation: {allocation}; global sparsity counts every linear but the output head{dense_note}",
        *(["- '+induce' rows: the same pruner after `sp.induce_sparsity` (docs/induction.md), same calibration"]
          if fields["induce"] != "no" else []),
        f"- machine: {fields['machine']}",
        "",
        results_table(rows, with_reference=model is None and allocation == "uniform"),
    ])


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    eval_ids = token_ids(tokenizer, load_text(Path(args.data) / "wiki.test.raw"))
    eval_ids = eval_ids[: args.eval_windows * args.eval_seq_len + 1]
    calibration = random_windows(token_ids(tokenizer, load_text(Path(args.data) / "wiki.valid.tokens")),
                                 n=args.calib_samples, seq_len=args.calib_seq_len, seed=args.seed)
    fields = settings_fields(args, command_line(__file__, argv))

    def measure(row, pruned, prune_seconds):
        """``row`` with the ppl of ``pruned``, recorded in --out."""
        start = time.time()
        ppl = perplexity(pruned, eval_ids, n_windows=args.eval_windows, seq_len=args.eval_seq_len)
        row = {**row, "ppl": ppl, "prune_seconds": prune_seconds, "eval_seconds": time.time() - start, **fields,
               "time": datetime.datetime.now().isoformat(timespec="seconds")}
        append_jsonl(args.out, [row])
        print(json.dumps({k: row[k] for k in ("method", "target", "ppl", "prune_seconds")}), flush=True)
        return row

    rows = [measure({"method": "dense", "target": "-", "global_sparsity": sps.sparsity_report(model).global_sparsity},
                    model, 0.0)]
    for target in args.sparsities:
        for method in args.methods:
            for induce in INDUCE_RUNS[args.induce]:
                pruned = copy.deepcopy(model)  # every run starts from the dense weights
                start = time.time()
                report = sps.prune(pruned, method=method, calibration=calibration, allocation=args.allocation,
                                   induce=induce_options(args) if induce else False, **sps.parse_target(target))
                rows.append(measure({"method": method + (induce_label(args) if induce else ""), "target": target,
                                     "global_sparsity": report.global_sparsity,
                                     **({"induce_alpha": args.induce_alpha, "induce_pairs": args.induce_pairs}
                                        if induce else {})}, pruned, time.time() - start))
                del pruned
    return publish(rows, args, fields)


def induce_options(args) -> dict:
    pairs = {"pairs": tuple(args.induce_pairs.split(","))} if args.induce_pairs else {}
    return {"alpha": args.induce_alpha, **pairs}


def induce_label(args) -> str:
    """'+induce' with prune's default folds, '+induce(qkv,gate_up)' with the folds named."""
    return f"+induce({args.induce_pairs})" if args.induce_pairs else "+induce"


def settings_fields(args, command: str) -> dict:
    return {
        "model": args.model or "SmolLM2-135M-Instruct.Q4_1.gguf (default)",
        "calibration": f"{args.calib_samples} x {args.calib_seq_len} tokens of wiki.valid.tokens, seed {args.seed}",
        "eval": f"first {args.eval_windows} x {args.eval_seq_len} tokens of wiki.test.raw",
        "allocation": args.allocation,
        "induce": args.induce,
        "machine": machine_info(),
        "command": command,
    }


def publish(rows: list[dict], args, fields: dict) -> list[dict]:
    print(results_table(rows, with_reference=args.model is None and args.allocation == "uniform"))
    if args.markdown:
        append(args.markdown, "\n" + markdown_section(rows, args.model, fields) + "\n")
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
