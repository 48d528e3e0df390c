"""Render the JSON lines of benchmarks/recovery.py as a markdown table:
``python benchmarks/recovery_table.py benchmarks/results/recovery.jsonl``."""

import json
import sys

LOSS_LABELS = {"ce": "CE", "squarehead": "SquareHead"}


def fmt(value, spec=".1f"):
    return "–" if value is None else format(value, spec)


def loss_label(r: dict) -> str:
    """``CE``, or ``SquareHead λ=0.1`` with `` + logit KL λ=1`` when the row had a logit term."""
    loss, logit = r.get("loss") or "ce", float(r.get("logit_lambda") or 0.0)
    return LOSS_LABELS.get(loss, loss) if loss != "squarehead" else (
        f"SquareHead λ={float(r.get('squarehead_lambda', 1.0)):g}" + (f" + logit KL λ={logit:g}" if logit else ""))


def notes(r: dict) -> str:
    """What a row adds: the loss, the sweep's --extra-args, SEFT's moved positions, SPT's gradual pruning."""
    method, out = r["method"], [loss_label(r)] if (r.get("loss") or "ce") != "ce" else []
    out += [f"recovery.py flags `{r['extra_args']}`"] if r.get("extra_args") else []
    out += [f"regrown {r['seft_regrown']:,}, moved {r['positions_moved']:,}, counts kept: {r['counts_identical']}"
            ] if method == "seft" else []
    out += [f"{r['pattern']} in every layer: {r['pattern_kept']}"] if method in MASK and "pattern_kept" in r else []
    out += [f"pruned 0→{r.get('pattern') or format(r['sparsity'], '.0%')} while tuning; without prompts "
            f"{fmt(r.get('ppl_after_without_prompts'))}; {r['zeros_shared_with_oneshot']:.0%} of one-shot zeros "
            "shared"] if method == "spt" else []
    return "; ".join(out)


def markdown_table(columns, rows) -> str:
    """``columns``: ``(header, alignment, fn(row) -> str)`` triples; one table line per row."""
    return "\n".join(["| " + " | ".join(header for header, _, _ in columns) + " |",
                      "|" + "|".join(align for _, align, _ in columns) + "|",
                      *("| " + " | ".join(fn(r) for _, _, fn in columns) + " |" for r in rows)])


MASK = {"seft": "moved (same counts)", "spt": "new (gradual)"}  # the methods that set the mask themselves
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
    ("mask identical", "---", lambda r: str(MASK.get(r["method"], r["mask_identical"]))),
    ("trainable params", "---:", lambda r: f"{r['trainable_params']:,}"),
    ("step time (s)", "---:", lambda r: f"{r['step_time_s']:.2f}"),
    ("peak RSS (MB)", "---:", lambda r: f"{r['peak_mem_mb']:.0f}"),
]


def render(rows: list[dict], extra_columns=()) -> str:
    """``extra_columns``: more ``(header, alignment, fn(row) -> str)`` before the notes (sweep.py's ARC, wall time)."""
    return markdown_table([*COLUMNS, *extra_columns, ("notes", "---", notes)], rows)


if __name__ == "__main__":
    print(render([json.loads(line) for path in sys.argv[1:] for line in open(path) if line.strip()]))
