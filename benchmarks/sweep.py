"""Run benchmarks/recovery.py over methods x targets x losses at one budget, resumably, and render the results.

    python benchmarks/sweep.py --dry-run          # what would run, what is done, what is not applicable
    python benchmarks/sweep.py --threads 1        # run every missing row, then render
    python benchmarks/sweep.py --render-only      # the markdown tables from the results file

Each missing row runs recovery.py in its own subprocess: a crash fails that row only, and ``peak_mem_mb`` is the row's
own. The default plan, the row keys, the options and the tables: docs/results/sweep.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import sparse_peft as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recovery  # noqa: E402
from common import REPO_ROOT, append_jsonl, comma_list, markdown_table  # noqa: E402

RECOVERY_SCRIPT = Path(__file__).resolve().with_name("recovery.py")
METHODS = ("masked_lora", "spp", "seft", "spt", "lora")
SPARSE_METHODS = METHODS[:4]
# docs/results/recovery.md: SPP's 4e-3 is the paper's; SPT trains only prompts and a few norms, which need a larger step
DEFAULT_LR = {"masked_lora": 1e-3, "spp": 4e-3, "seft": 1e-3, "spt": 1e-2, "lora": 1e-3}
DENSE = "dense"
DEFAULT_SQUAREHEAD_TARGET = "0.7"  # SquareHead for every method at 70%
KEY_SETTINGS = ("steps", "seq_len", "batch_size", "seed", "eval_windows", "eval_seq_len", "calib_samples",
                "calib_seq_len")  # recovery.py flags every job passes, all part of the key
# recovery.py's defaults, for the settings the rows it writes itself do not record
RECOVERY_DEFAULTS = {name: recovery.build_parser().get_default(name) for name in (*KEY_SETTINGS, "squarehead_lambda")}
RECOVERY_DEFAULTS["teacher"] = recovery.DENSE_TEACHER
EVALUATION_ONLY_FLAGS = ("--arc-easy", "--arc-dir")  # extra measurements: they change no ppl, no training
# What makes two rows the same experiment (threads, timings and paths do not): pruner and calibration
# are None for the dense row (nothing is pruned), squarehead is (λ, teacher) for SquareHead rows, and lr
# has 6 significant digits (recovery.py rounds the floats it writes to 4 decimals).
RowKey = namedtuple("RowKey", "method pruner target loss squarehead steps seq_len batch_size lr seed eval_windows "
                              "eval_seq_len calibration extra_args")


def parse_target(text: str) -> str:
    """A ``--targets`` entry as the sweep names it: ``"0.5"`` (also from ``50%``) or ``"2:4"``."""
    target = sp.parse_target(text)
    if target.get("sparsity") == 0:
        raise ValueError(f"{text!r}: sparsity 0 is the dense reference row (on unless --no-dense)")
    return target.get("pattern") or f"{target['sparsity']:g}"


def target_of(row: dict) -> str:
    sparsity = float(row.get("sparsity") or 0.0)
    return row.get("pattern") or (f"{sparsity:g}" if sparsity > 0 else DENSE)


def target_label(target: str) -> str:
    return target if ":" in target or target == DENSE else f"{float(target):.0%}"


def target_sparsity(target: str) -> float:
    if ":" not in target:
        return 0.0 if target == DENSE else sp.parse_target(target)["sparsity"]
    n, m = sp.parse_pattern(target)
    return (m - n) / m


def loss_of(row: dict) -> str:
    return row.get("loss") or "ce"  # rows from before --loss existed are CE


def flags_of(row: dict, drop=EVALUATION_ONLY_FLAGS) -> str:
    """The row's ``--extra-args`` minus the flags ``drop`` with their values (``--flag value`` or ``--flag=value``):
    a row run with ``--extra-args=--arc-easy=500`` is the same experiment as one run with ``--arc-easy 500``."""
    words, kept = shlex.split(row.get("extra_args") or ""), []
    while words:
        word = words.pop(0)
        if word.split("=", 1)[0] not in drop:
            kept.append(word)
        elif "=" not in word and words:
            words.pop(0)
    return shlex.join(kept)


def row_key(row: dict) -> RowKey:
    """The key of a results row, or of a planned job written as the row it will produce (``Job.as_row``)."""
    def get(name):
        return int(row.get(name, RECOVERY_DEFAULTS[name]))

    target, loss = target_of(row), loss_of(row)
    squarehead = (float(row.get("squarehead_lambda", RECOVERY_DEFAULTS["squarehead_lambda"])),
                  row.get("teacher") or RECOVERY_DEFAULTS["teacher"]) if loss == "squarehead" else None
    return RowKey(row["method"], None if target == DENSE else row["pruner"], target, loss, squarehead,
                  int(row["steps"]), int(row["seq_len"]), int(row["batch_size"]), f"{float(row['lr']):.6g}",
                  int(row.get("seed", 0)), get("eval_windows"), get("eval_seq_len"),
                  None if target == DENSE else (get("calib_samples"), get("calib_seq_len")), flags_of(row))


def has_arc(row: dict, questions: int) -> bool:
    """The row holds ARC-Easy before and after on ``questions`` questions (any number when negative: all)."""
    measured = row.get("arc_easy_acc_before") is not None and row.get("arc_easy_acc_after") is not None
    return measured and (questions < 0 or row.get("arc_easy_questions") == questions)


@dataclass(frozen=True)
class Job:
    """One recovery.py run of the sweep."""

    method: str
    target: str
    loss: str
    lr: float
    squarehead_lambda: Optional[float] = None  # SquareHead rows only

    @property
    def loss_label(self) -> str:
        return LOSS_LABELS[self.loss] + (f" λ={self.squarehead_lambda:g}" if self.loss == "squarehead" else "")

    @property
    def label(self) -> str:
        target = "dense reference" if self.target == DENSE else target_label(self.target)
        return f"{self.method} {target} {self.loss_label} lr={self.lr:g}"

    def as_row(self, settings) -> dict:
        """The row this job will produce as far as ``row_key`` reads it: recovery.py's flags, parsed."""
        flags = vars(recovery.build_parser().parse_args(self.recovery_argv(settings)))
        return {**flags, "lr": self.lr, "extra_args": settings.extra_args}

    def recovery_argv(self, settings) -> list[str]:
        kind, target = ("pattern" if ":" in self.target else "sparsity"), "0" if self.target == DENSE else self.target
        argv = ["--method", self.method, "--pruner", settings.pruner, f"--{kind}", target, "--loss", self.loss,
                "--lr", f"{self.lr:g}"]
        for name in KEY_SETTINGS:
            argv += ["--" + name.replace("_", "-"), str(getattr(settings, name))]
        if self.loss == "squarehead":
            argv += ["--squarehead-lambda", f"{self.squarehead_lambda:g}"] + (["--teacher", settings.teacher]
                                                                             if settings.teacher else [])
        for name in ("model", "data", "cache_dir", "threads", "arc_easy"):
            if getattr(settings, name) not in (None, 0):
                argv += ["--" + name.replace("_", "-"), str(getattr(settings, name))]
        return argv + shlex.split(settings.extra_args)


def parse_lr(text: str) -> dict[str, float]:
    out = {}
    for item in text.split(","):
        method, sep, value = item.partition("=")
        if not sep or method.strip() not in METHODS:
            raise argparse.ArgumentTypeError(f"--lr takes METHOD=LR (METHOD in {', '.join(METHODS)}), got {item!r}")
        out[method.strip()] = float(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--methods", type=comma_list(str, METHODS), default=list(METHODS))
    targets = comma_list(parse_target)
    g.add_argument("--targets", type=targets, default=["0.5", "0.7", "2:4"], help="0.5 or 50%%, N:M")
    g.add_argument("--losses", type=comma_list(str, tuple(LOSS_LABELS)), help="default: ce,squarehead")
    g.add_argument("--squarehead-targets", type=lambda s: "all" if s.strip() == "all" else targets(s),
                   help="targets of the SquareHead rows, among --targets, or 'all' (default: "
                        f"{DEFAULT_SQUAREHEAD_TARGET} when it is among --targets)")
    g.add_argument("--squarehead-methods", type=comma_list(str, METHODS), default=list(SPARSE_METHODS),
                   help="methods with SquareHead rows (intersected with --methods)")
    g.add_argument("--no-dense", dest="dense", action="store_false", help="leave out the dense reference row")
    g.add_argument("--lr", type=parse_lr, action="append", default=[],
                   help="per-method lr, e.g. spp=3e-3,lora=2e-4 (defaults: "
                        + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    b = p.add_argument_group("budget and settings (passed to recovery.py; part of a row's key)")
    b.add_argument("--pruner", default="wanda", choices=["wanda", "sparsegpt", "magnitude"])
    for name in KEY_SETTINGS:
        b.add_argument("--" + name.replace("_", "-"), type=int, default=RECOVERY_DEFAULTS[name])
    b.add_argument("--squarehead-lambda", dest="squarehead_lambdas", type=comma_list(float),
                   default=[RECOVERY_DEFAULTS["squarehead_lambda"]], help="SquareHead's λ: one row each")
    b.add_argument("--teacher", default=None, help="SquareHead teacher model (default: the dense model, untuned)")
    b.add_argument("--extra-args", default="", help="more recovery.py flags for every row, one string")
    r = p.add_argument_group("passed to recovery.py, not part of the key")
    r.add_argument("--arc-easy", type=int, default=0, help="zero-shot ARC-Easy before and after on this many "
                   "questions (-1: all); a finished row without these ARC figures is run again")
    for flag in ("--model", "--data", "--cache-dir"):
        r.add_argument(flag, default=None)
    r.add_argument("--threads", type=int, default=None)
    o = p.add_argument_group("files and modes")
    o.add_argument("--results", default=str(REPO_ROOT / "benchmarks" / "results" / "recovery.jsonl"),
                   help="JSON lines read to skip finished rows, and appended to")
    o.add_argument("--log-dir", default=str(REPO_ROOT / "runs" / "sweep-logs"), help="one log per row")
    o.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    o.add_argument("--render-only", action="store_true", help="render from --results, run nothing")
    o.add_argument("--no-render", dest="render", action="store_false", help="do not render after running")
    o.add_argument("--markdown-out", default=str(REPO_ROOT / "docs" / "results" / "sweep_results.md"))
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.lrs = {**DEFAULT_LR, **{m: lr for override in args.lr for m, lr in override.items()}}
    losses_given = args.losses is not None
    args.losses = args.losses if losses_given else list(LOSS_LABELS)
    if args.squarehead_targets is None:  # the recovery table's SquareHead rows are at 70%, when the sweep has it
        args.squarehead_targets = [t for t in (DEFAULT_SQUAREHEAD_TARGET,) if t in args.targets]
    elif args.squarehead_targets == "all":
        args.squarehead_targets = list(args.targets)
    outside = [t for t in args.squarehead_targets if t not in args.targets]
    if outside:  # a SquareHead row at a target the sweep was not asked for would run unnoticed
        p.error(f"--squarehead-targets {','.join(outside)} not among --targets {','.join(args.targets)}: "
                "add it to --targets, or name SquareHead targets among them (or 'all')")
    if losses_given and "squarehead" in args.losses and not args.squarehead_targets:
        p.error(f"--losses squarehead: no SquareHead target among --targets {','.join(args.targets)} (the default "
                f"SquareHead target is {target_label(DEFAULT_SQUAREHEAD_TARGET)}); pass --squarehead-targets "
                f"{args.targets[0]} or --squarehead-targets all")
    if args.dry_run and args.render_only:
        p.error("--dry-run and --render-only exclude each other")
    return args


def plan(args) -> tuple[list[Job], list[tuple[Job, str]]]:
    """The jobs in running order (dense reference, CE by target, SquareHead) and the combinations left out
    as not applicable, each with its reason (SPT's gradual pruning takes wanda or magnitude only)."""
    candidates = [Job("lora", DENSE, "ce", args.lrs["lora"])] if args.dense else []
    if "ce" in args.losses:
        candidates += [Job(m, t, "ce", args.lrs[m]) for t in args.targets for m in args.methods]
    if "squarehead" in args.losses:
        candidates += [Job(m, t, "squarehead", args.lrs[m], lam) for lam in args.squarehead_lambdas
                       for t in args.squarehead_targets for m in args.methods if m in args.squarehead_methods]
    unique = list(dict.fromkeys(candidates))
    reasons = {job: "SPT's gradual pruning uses wanda or magnitude, not sparsegpt" for job in unique
               if job.method == "spt" and args.pruner == "sparsegpt" and job.target != DENSE}
    return [job for job in unique if job not in reasons], list(reasons.items())


def read_rows(path) -> dict[RowKey, dict]:
    """The results file's rows by key; a later row replaces an earlier one with its key (a rerun after a fix)."""
    path, rows = Path(path), {}
    for number, line in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
        try:
            row = json.loads(line) if line.strip() else None
            rows.update({row_key(row): row} if row else {})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:  # a line cut short, a foreign row
            print(f"warning: {path}:{number} is not a results row ({e!r}); ignored", file=sys.stderr)
    return rows


def found_rows(args):
    """The plan, every row of the results file by key, and each job's row (None when not run yet)."""
    jobs, skipped = plan(args)
    done = read_rows(args.results)
    return jobs, skipped, done, {job: done.get(row_key(job.as_row(args))) for job in jobs}


class RecoveryFailed(RuntimeError):
    pass


def run_recovery(argv: list[str], log_path: Path) -> dict:
    """Run recovery.py with ``argv`` in a subprocess, its output going to ``log_path``; return its row.
    Raises RecoveryFailed, with the tail of the log, when it exits non-zero or writes no row."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {"TQDM_MININTERVAL": "30", **os.environ}  # a bar update every 30 s, not a log line per step
    with tempfile.TemporaryDirectory() as tmp:
        out, command = Path(tmp) / "row.jsonl", [sys.executable, str(RECOVERY_SCRIPT), *argv]
        with open(log_path, "w") as log:
            log.write("$ " + shlex.join(command) + "\n")
            log.flush()
            # cwd: the repo root, so recovery.py's relative defaults (runs/cache) are the usual ones
            proc = subprocess.run([*command, "--out", str(out)], cwd=REPO_ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        lines = out.read_text().splitlines() if out.exists() else []
    if proc.returncode != 0 or not lines:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        what = f"exit status {proc.returncode}" if proc.returncode else "no row written"
        raise RecoveryFailed(f"recovery.py failed ({what}); log: {log_path}\n{tail}")
    return json.loads(lines[-1])


def record(row: dict, job: Job, args) -> dict:
    """Add the settings recovery.py's row does not hold and the exact lr (it rounds floats to 4 decimals:
    5e-5 would read 0.0001), then append the row to --results."""
    known = job.as_row(args)
    row = {**row, **{name: known[name] for name in KEY_SETTINGS[4:]}, "lr": job.lr}
    row.update({"extra_args": args.extra_args} if args.extra_args else {})
    if row_key(row) != row_key(known):  # would run again on every invocation: a bug to see, not to loop on
        raise RecoveryFailed(f"row key {row_key(row)} does not match the job's {row_key(known)}; "
                             f"the row, not recorded: {json.dumps(row)}")
    append_jsonl(args.results, [row])
    return row


def log_name(job: Job, args) -> str:
    """One log per row, named by its pruner and flags too, so that rows differing only in those keep theirs."""
    loss = job.loss if job.loss != "squarehead" else f"squarehead{job.squarehead_lambda:g}"
    flags = re.sub(r"[^A-Za-z0-9.]+", "_", flags_of({"extra_args": args.extra_args})).strip("_")
    name = f"{job.method}-{job.target.replace(':', '_')}-{args.pruner}-{loss}-lr{job.lr:g}"
    return name + (f"-{flags}" if flags else "") + ".log"


def run_sweep(args) -> int:
    jobs, skipped, _, found = found_rows(args)
    missing = [job for job in jobs if found[job] is None or (args.arc_easy and not has_arc(found[job], args.arc_easy))]
    print(f"{len(jobs)} rows planned: {len(jobs) - len(missing)} done in {args.results}, {len(missing)} to run; "
          f"{len(skipped)} not applicable")
    for job, reason in skipped:
        print(f"  not applicable: {job.method} at {target_label(job.target)} ({job.loss_label}): {reason}")
    if args.dry_run:
        for job in jobs:
            print(f"  {'run ' if job in missing else 'done'} {job.label}")
            if job in missing:
                print("       " + shlex.join(["python", "benchmarks/recovery.py", *job.recovery_argv(args)]))
        return 0
    failed = []
    for i, job in enumerate(missing, 1):
        print(f"[{i}/{len(missing)}] {job.label} ...", flush=True)
        t0 = time.time()
        try:
            row = record(run_recovery(job.recovery_argv(args), Path(args.log_dir) / log_name(job, args)), job, args)
            print(f"[{i}/{len(missing)}] done in {(time.time() - t0) / 60:.1f} min: ppl after merge "
                  f"{row.get('ppl_after')}, sparsity after merge {row.get('sparsity_after_merge')}", flush=True)
        except RecoveryFailed as e:
            failed.append(job)
            print(f"[{i}/{len(missing)}] FAILED {job.label}: {e}", file=sys.stderr, flush=True)
    if failed:
        print(f"{len(failed)} rows failed (rerun to retry): " + "; ".join(job.label for job in failed), file=sys.stderr)
    if args.render:
        render_outputs(args)
    return 1 if failed else 0


# --- rendering: every table is recovery_table(rows, extra_columns) ----------------------------------------

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


MASK = {"seft": "moved (same counts)", "spt": "new (gradual)"}  # the methods that set the mask themselves
# plain LoRA's "after merge" is merge-then-re-mask; its own merge's sparsity is the next-but-one column
COLUMNS = [
    ("method", "l", lambda r: r["method"] + (" (re-masked)" if "sparsity_after_plain_merge" in r else "")),
    ("pruner", "l", lambda r: r["pruner"] if r["sparsity"] or r.get("pattern") else "–"),
    ("target", "l", lambda r: r.get("pattern") or f"{r['sparsity']:.0%}"),
    ("lr", "r", lambda r: f"{r['lr']:g}"),
    ("ppl dense", "r", lambda r: fmt(r["ppl_dense"])),
    ("ppl pruned", "r", lambda r: fmt(r["ppl_pruned"])),
    ("ppl after (unmerged)", "r", lambda r: fmt(r.get("ppl_after_unmerged"))),
    ("ppl after merge", "r", lambda r: fmt(r["ppl_after"])),
    ("sparsity after merge", "r", lambda r: f"{r['sparsity_after_merge']:.4f}"),
    ("plain merge sparsity", "r", lambda r: fmt(r.get("sparsity_after_plain_merge"), ".4f")),
    ("mask identical", "l", lambda r: str(MASK.get(r["method"], r["mask_identical"]))),
    ("trainable params", "r", lambda r: f"{r['trainable_params']:,}"),
    ("step time (s)", "r", lambda r: f"{r['step_time_s']:.2f}"),
    ("peak RSS (MB)", "r", lambda r: f"{r['peak_mem_mb']:.0f}"),
]


def recovery_table(rows: list[dict], extra_columns=()) -> str:
    """The rows under ``COLUMNS``, then ``extra_columns`` (more ``(header, "r" or "l", fn(row) -> str)``), then notes."""
    headers, aligns, cells = zip(*COLUMNS, *extra_columns, ("notes", "l", notes))
    return markdown_table(headers, "".join(aligns), [[cell(r) for cell in cells] for r in rows])



def fmt_acc(value) -> str:  # accuracies are fractions; a value above 1 is taken as already a percentage
    return "–" if value is None else f"{value * 100 if value <= 1 else value:.1f}"


def render_table(rows: list[dict]) -> str:
    """``recovery_table`` with the ARC columns the rows have (acc_norm: lm-eval-harness's
    length-normalised accuracy) and the wall time."""
    arc = [(f"{name} {measure} {when} (%)", "r", lambda r, key=f"{prefix}_{measure}_{when}": fmt_acc(r.get(key)))
           for prefix, name in (("arc_easy", "ARC-E"), ("arc_challenge", "ARC-C")) for measure in ("acc", "acc_norm")
           for when in ("before", "after") if any(f"{prefix}_{measure}_{when}" in r for r in rows)]
    wall = ("wall (min)", "r", lambda r: "–" if r.get("wall_s") is None else f"{r['wall_s'] / 60:.0f}")
    return recovery_table(rows, extra_columns=[*arc, wall])


def is_exact(row: dict, target: str) -> bool:
    """Exactly the target's sparsity after merge (rows hold it rounded to 4 decimals); for N:M also the
    unchanged mask, since the fraction alone does not say the groups are kept."""
    at_target = abs(row["sparsity_after_merge"] - target_sparsity(target)) < 1e-4
    return at_target and (":" not in target or row.get("mask_identical") is True)


def intro(args) -> str:
    """The paragraph under the title: the budget and settings every row of the plan shares."""
    results = Path(args.results).resolve()
    shown = results.relative_to(REPO_ROOT) if results.is_relative_to(REPO_ROOT) else results
    parts = [f"Made by `python benchmarks/sweep.py` (rows: `{shown}`). Every row: {args.steps} steps of "
             f"{args.batch_size} x {args.seq_len} tokens ({args.steps * args.batch_size * args.seq_len:,} tokens), "
             f"AdamW, cosine schedule without warm-up, seed {args.seed}; pruner {args.pruner} with "
             f"{args.calib_samples} calibration windows of {args.calib_seq_len} tokens; ppl on {args.eval_windows} "
             f"windows of {args.eval_seq_len} tokens of wiki.test.raw. lr per method: "
             + ", ".join(f"{m} {args.lrs[m]:g}" for m in args.methods)]
    if "squarehead" in args.losses:
        parts.append(f"SquareHead: λ={', '.join(f'{lam:g}' for lam in args.squarehead_lambdas)}, teacher "
                     f"{args.teacher or RECOVERY_DEFAULTS['teacher']}")
    parts += [f"Extra recovery.py flags: `{args.extra_args}`"] if args.extra_args else []
    if args.arc_easy:
        parts.append(f"ARC-Easy: zero-shot, {'all' if args.arc_easy < 0 else f'the first {args.arc_easy}'} questions "
                     "of the test set, before (one-shot pruned) and after (merged), acc_norm = lm-eval-harness's "
                     "length-normalised accuracy")
    parts.append("Each table holds the plan's rows, then the rows at the same budget it does not name (another "
                 "pruner, lr, SquareHead λ or recovery.py flags: the notes say which). Its last line names the lowest "
                 "ppl on these test windows: a comparison, not a selection (selection: recovery.py --eval-split "
                 "validation)")
    return ". ".join(parts) + "."


def render_markdown(args) -> str:
    jobs, skipped, done, found = found_rows(args)
    planned_keys = {row_key(job.as_row(args)) for job in jobs}
    budget = (args.steps, args.seq_len, args.batch_size, args.seed, args.eval_windows, args.eval_seq_len)
    # rows at this budget the plan does not name: another pruner, lr, SquareHead λ or flags (recipes tried by hand)
    others = [row for key, row in done.items() if key not in planned_keys
              and (key.steps, key.seq_len, key.batch_size, key.seed, key.eval_windows, key.eval_seq_len) == budget]
    blocks = ["## Recovery sweep", intro(args)]
    for target in [DENSE, *args.targets, *sorted({target_of(r) for r in others} - {DENSE, *args.targets})]:
        rows = [found[job] for job in jobs if job.target == target and found[job]]
        extra = sorted((r for r in others if target_of(r) == target), key=lambda r: (r["pruner"], r["method"]))
        if rows or extra:
            heading = "Dense reference (plain LoRA, nothing pruned)" if target == DENSE else target_label(target)
            blocks += [f"### {heading}", render_table(rows + extra)]
            blocks += best_recipe(rows, target, extra) if target != DENSE else []
    for heading, items in (
            ("Not applicable", [f"- {job.method} at {target_label(job.target)} ({job.loss_label}): {reason}"
                                for job, reason in skipped]),
            ("Not run yet", [f"- {job.label}" for job in jobs if found[job] is None]),
            ("ARC-Easy not measured yet (rows from before the ARC pass; the next sweep reruns them)",
             [f"- {job.label}" for job in jobs
              if args.arc_easy and found[job] and not has_arc(found[job], args.arc_easy)])):
        blocks += [f"### {heading}", "\n".join(items)] if items else []
    return "\n\n".join(blocks) + "\n"


def best_recipe(rows: list[dict], target: str, others: list[dict]) -> list[str]:
    """The lowest ppl exactly at the target after merge among the sparse methods' rows (``others``: the
    rows outside the plan), against the plan's plain LoRA re-masked. Chosen on the evaluation windows:
    a recipe chosen on a validation split is ``recovery.py --eval-split validation``'s (docs/results/recovery.md)."""
    candidates = [r for r in (*rows, *others) if r["method"] != "lora" and r.get("ppl_after") is not None
                  and is_exact(r, target)]
    if not candidates:
        return []
    best = min(candidates, key=lambda r: r["ppl_after"])
    flags = flags_of(best)
    recipe = loss_label(best) + ("" if any(best is r for r in rows) else
                                                f"; {best['pruner']}, lr {float(best['lr']):g}"
                                                + (f", `{flags}`" if flags else ""))
    line = (f"- Lowest ppl exactly at {target_label(target)} after merge: {best['method']} ({recipe}), "
            f"ppl {best['ppl_after']:.1f}")
    lora = [r for r in rows if r["method"] == "lora" and loss_of(r) == "ce" and r.get("ppl_after")]
    if lora:
        line += (f" = {best['ppl_after'] / lora[0]['ppl_after']:.2f}x plain LoRA merged-then-re-masked "
                 f"({lora[0]['ppl_after']:.1f})")
    return [line + "."]


def render_outputs(args) -> None:
    markdown = Path(args.markdown_out)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render_markdown(args))
    print(f"wrote {markdown}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render_only:
        render_outputs(args)
        return 0
    return run_sweep(args)


if __name__ == "__main__":
    sys.exit(main())
