"""Render the JSON lines of benchmarks/recovery.py as a markdown table.

    python benchmarks/recovery_table.py benchmarks/results/recovery.jsonl
"""

from __future__ import annotations

import json
import sys


def fmt(value, spec=".1f"):
    return "–" if value is None else format(value, spec)


LOSS_LABELS = {"ce": "CE", "squarehead": "SquareHead"}


def loss_label(r: dict) -> str:
    """``CE``, or ``SquareHead λ=0.1`` with `` + logit KL λ=1`` when the row had a logit term."""
    loss = r.get("loss") or "ce"
    label = LOSS_LABELS.get(loss, loss)
    if loss != "squarehead":
        return label
    logit = float(r.get("logit_lambda") or 0.0)
    return f"{label} λ={float(r.get('squarehead_lambda', 1.0)):g}" + (f" + logit KL λ={logit:g}" if logit else "")


def notes(r: dict) -> str:
    """What a method adds to its row (SEFT's moved positions, SPT's gradual pruning, the loss)."""
    out = []
    if (r.get("loss") or "ce") != "ce":
        out.append(loss_label(r))
    if r.get("extra_args"):  # the sweep's --extra-args: what else this row ran with
        out.append(f"recovery.py flags `{r['extra_args']}`")
    if r["method"] == "seft":
        out.append(f"regrown {r['seft_regrown']:,}, moved {r['positions_moved']:,}, counts kept: {r['counts_identical']}")
    if r["method"] in ("seft", "spt") and "pattern_kept" in r:  # the methods that set the mask themselves
        out.append(f"{r['pattern']} in every layer: {r['pattern_kept']}")
    if r["method"] == "spt":
        out.append(f"pruned 0→{r.get('pattern') or format(r['sparsity'], '.0%')} while tuning; without prompts {fmt(r.get('ppl_after_without_prompts'))}; "
                   f"{r['zeros_shared_with_oneshot']:.0%} of one-shot zeros shared")
    return "; ".join(out)


def render(rows: list[dict], extra_columns=()) -> str:
    """``extra_columns``: ``(header, alignment, fn(row) -> str)`` triples, e.g. ``("ARC-E after", "---:", f)``,
    inserted before the notes column (benchmarks/sweep.py adds ARC accuracy and wall time this way)."""
    extra_headers = "".join(f" {header} |" for header, _, _ in extra_columns)
    extra_rule = "".join(f"{align}|" for _, align, _ in extra_columns)
    lines = [
        "| method | pruner | target | lr | ppl dense | ppl pruned | ppl after (unmerged) | ppl after merge "
        "| sparsity after merge | plain merge sparsity | mask identical | trainable params | step time (s) "
        "| peak RSS (MB) |" + extra_headers + " notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|" + extra_rule + "---|",
    ]
    for r in rows:
        target = r.get("pattern") or f"{r['sparsity']:.0%}"
        # plain LoRA's "after merge" is merge-then-re-mask; its own merge's sparsity is the next-but-one column
        method = r["method"] + (" (re-masked)" if "sparsity_after_plain_merge" in r else "")
        mask = {"seft": "moved (same counts)", "spt": "new (gradual)"}.get(r["method"], r["mask_identical"])
        lines.append(
            f"| {method} | {r['pruner'] if r['sparsity'] or r.get('pattern') else '–'} | {target} | {r['lr']:g} "
            f"| {fmt(r['ppl_dense'])} | {fmt(r['ppl_pruned'])} | {fmt(r.get('ppl_after_unmerged'))} "
            f"| {fmt(r['ppl_after'])} | {r['sparsity_after_merge']:.4f} "
            f"| {fmt(r.get('sparsity_after_plain_merge'), '.4f')} | {mask} "
            f"| {r['trainable_params']:,} | {r['step_time_s']:.2f} | {r['peak_mem_mb']:.0f} |"
            + "".join(f" {fn(r)} |" for _, _, fn in extra_columns) + f" {notes(r)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    rows = [json.loads(line) for path in sys.argv[1:] for line in open(path) if line.strip()]
    print(render(rows))
