"""Render the JSON lines of benchmarks/recovery.py as a markdown table.

    python benchmarks/recovery_table.py benchmarks/results/recovery.jsonl
"""

from __future__ import annotations

import json
import sys

LOSS_LABELS = {"ce": "CE", "squarehead": "SquareHead"}


def fmt(value, spec=".1f"):
    return "–" if value is None else format(value, spec)


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
        out.append(f"pruned 0→{r.get('pattern') or format(r['sparsity'], '.0%')} while tuning; without prompts "
                   f"{fmt(r.get('ppl_after_without_prompts'))}; {r['zeros_shared_with_oneshot']:.0%} of one-shot zeros shared")
    return "; ".join(out)


def markdown_table(columns, rows) -> str:
    """``columns``: ``(header, alignment, fn(row) -> str)`` triples; one table line per row."""
    return "\n".join(["| " + " | ".join(header for header, _, _ in columns) + " |",
                      "|" + "|".join(align for _, align, _ in columns) + "|",
                      *("| " + " | ".join(fn(r) for _, _, fn in columns) + " |" for r in rows)])


# plain LoRA's "after merge" is merge-then-re-mask; its own merge's sparsity is the next-but-one column
COLUMNS = [
    ("method", "---", lambda r: r["method"] + (" (re-masked)" if "sparsity_after_plain_merge" in r else "")),
    ("pruner", "---", lambda r: r["pruner"] if r["sparsity"] or r.get("pattern") else "–"),
    ("target", "---", lambda r: r.get("pattern") or f"{r['sparsity']:.0%}"),
    ("lr", "---:", lambda r: f"{r['lr']:g}"),
    ("ppl dense", "---:", lambda r: fmt(r["ppl_dense"])),
    ("ppl pruned", "---:", lambda r: fmt(r["ppl_pruned"])),
    ("ppl after (unmerged)", "---:", lambda r: fmt(r.get("ppl_after_unmerged"))),
    ("ppl after merge", "---:", lambda r: fmt(r["ppl_after"])),
    ("sparsity after merge", "---:", lambda r: f"{r['sparsity_after_merge']:.4f}"),
    ("plain merge sparsity", "---:", lambda r: fmt(r.get("sparsity_after_plain_merge"), ".4f")),
    ("mask identical", "---",
     lambda r: str({"seft": "moved (same counts)", "spt": "new (gradual)"}.get(r["method"], r["mask_identical"]))),
    ("trainable params", "---:", lambda r: f"{r['trainable_params']:,}"),
    ("step time (s)", "---:", lambda r: f"{r['step_time_s']:.2f}"),
    ("peak RSS (MB)", "---:", lambda r: f"{r['peak_mem_mb']:.0f}"),
]


def render(rows: list[dict], extra_columns=()) -> str:
    """``extra_columns``: more ``(header, alignment, fn(row) -> str)`` triples, e.g. ``("ARC-E after", "---:", f)``,
    inserted before the notes column (benchmarks/sweep.py adds ARC accuracy and wall time this way)."""
    return markdown_table([*COLUMNS, *extra_columns, ("notes", "---", notes)], rows)


if __name__ == "__main__":
    rows = [json.loads(line) for path in sys.argv[1:] for line in open(path) if line.strip()]
    print(render(rows))
