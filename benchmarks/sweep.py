"""Run benchmarks/recovery.py over methods x targets x losses at one budget, resumably, and render the results.

    python benchmarks/sweep.py --dry-run          # what would run, what is done, what is not applicable
    python benchmarks/sweep.py --threads 1        # run every missing row, then render
    python benchmarks/sweep.py --render-only      # markdown tables + PNG from the results file

The default plan is the recovery table: every method (masked_lora, spp, seft, spt, lora) at 50%, 70% and 2:4
with CE, SquareHead for the four sparse methods at 70% (plain LoRA is the reference they are compared
with), and the dense reference row (``--method lora --sparsity 0``). Every row gets the same tokens and
schedule (``--steps``, ``--seq-len``, ``--batch-size``, ``--seed``); only the lr differs per method.

A row is done when the results file holds a row with the same key (``row_key``): method, pruner, target,
loss (and SquareHead's lambda and teacher), steps, seq-len, batch size, lr, seed, evaluation and
calibration settings and ``--extra-args``. Rows written by recovery.py directly do not record the
evaluation and calibration settings; they count as made with recovery.py's defaults (``RECOVERY_DEFAULTS``).
The sweep adds those fields to the rows it appends, so a changed setting never matches an old row.

Each missing row runs recovery.py in its own subprocess, not in-process through ``recovery.main``:
- one crash (an OOM kill, a NaN assertion, a bad flag) fails that row only; the sweep logs the tail of its
  output and goes on, and the row is retried by the next invocation;
- ``peak_mem_mb`` is the process's peak RSS, which in one long process would only ever grow, and torch's
  global state (threads, seeds, loaded models) would leak from one row into the next.
Loading the model again per row costs seconds against the 15-35 minutes a row takes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recovery_table  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
RECOVERY_SCRIPT = Path(__file__).resolve().with_name("recovery.py")

METHODS = ("masked_lora", "spp", "seft", "spt", "lora")
SPARSE_METHODS = ("masked_lora", "spp", "seft", "spt")
# The lr each method's recovery rows use (docs/results/recovery.md: SPP's 4e-3 is the paper's; SPT trains
# only prompts and a few norms, which need a larger step).
DEFAULT_LR = {"masked_lora": 1e-3, "spp": 4e-3, "seft": 1e-3, "spt": 1e-2, "lora": 1e-3}
DENSE = "dense"
# recovery.py's defaults for the settings its rows do not record.
RECOVERY_DEFAULTS = dict(eval_windows=24, eval_seq_len=512, calib_samples=128, calib_seq_len=512,
                         squarehead_lambda=1.0, teacher="dense (untuned)")
LOSS_LABELS = recovery_table.LOSS_LABELS
DEFAULT_SQUAREHEAD_TARGET = "0.7"  # SquareHead for every method at 70%


class RowKey(NamedTuple):
    """What makes two recovery rows the same experiment (``threads``, timings and paths do not)."""

    method: str
    pruner: Optional[str]  # None for the dense row: nothing is pruned
    target: str  # "0.5", "0.7", "2:4" or "dense"
    loss: str
    squarehead: Optional[tuple]  # (lambda, teacher) for SquareHead rows
    steps: int
    seq_len: int
    batch_size: int
    lr: str  # formatted to 6 significant digits: recovery.py rounds the floats it writes to 4 decimals
    seed: int
    eval_windows: int
    eval_seq_len: int
    calibration: Optional[tuple]  # (samples, seq_len) when something is pruned
    extra_args: str


def target_of(row: dict) -> str:
    if row.get("pattern"):
        return row["pattern"]
    sparsity = float(row.get("sparsity") or 0.0)
    return f"{sparsity:g}" if sparsity > 0 else DENSE


def row_key(row: dict) -> RowKey:
    """The key of a results row, or of a planned job written as the row it will produce (``Job.as_row``)."""
    defaults = RECOVERY_DEFAULTS
    target = target_of(row)
    loss = row.get("loss") or "ce"  # rows from before --loss existed are CE
    return RowKey(
        method=row["method"],
        pruner=None if target == DENSE else row["pruner"],
        target=target,
        loss=loss,
        squarehead=((float(row.get("squarehead_lambda", defaults["squarehead_lambda"])),
                     row.get("teacher") or defaults["teacher"]) if loss == "squarehead" else None),
        steps=int(row["steps"]),
        seq_len=int(row["seq_len"]),
        batch_size=int(row["batch_size"]),
        lr=f"{float(row['lr']):.6g}",
        seed=int(row.get("seed", 0)),
        eval_windows=int(row.get("eval_windows", defaults["eval_windows"])),
        eval_seq_len=int(row.get("eval_seq_len", defaults["eval_seq_len"])),
        calibration=(None if target == DENSE else
                     (int(row.get("calib_samples", defaults["calib_samples"])),
                      int(row.get("calib_seq_len", defaults["calib_seq_len"])))),
        extra_args=without_evaluation_only_flags(row.get("extra_args") or ""),
    )


EVALUATION_ONLY_FLAGS = ("--arc-easy", "--arc-dir")  # extra measurements: they change no ppl, no training


def without_flags(extra_args: str, names: Sequence[str]) -> str:
    """``extra_args`` minus the flags ``names`` with their values (``--flag value`` or ``--flag=value``)."""
    words, kept = shlex.split(extra_args), []
    i = 0
    while i < len(words):
        if words[i].split("=", 1)[0] in names:
            i += 1 if "=" in words[i] else 2
            continue
        kept.append(words[i])
        i += 1
    return shlex.join(kept)


def without_evaluation_only_flags(extra_args: str) -> str:
    """``extra_args`` minus the flags that only add measurements (``--arc-easy 500``, ``--arc-easy=500``):
    a row run with ``--extra-args=--arc-easy=500`` is the same experiment as one run with ``--arc-easy 500``."""
    return without_flags(extra_args, EVALUATION_ONLY_FLAGS)


def has_arc(row: dict, questions: int) -> bool:
    """The row holds ARC-Easy before and after on ``questions`` questions (any number when negative: all)."""
    if row.get("arc_easy_acc_before") is None or row.get("arc_easy_acc_after") is None:
        return False
    return questions < 0 or row.get("arc_easy_questions") == questions


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
        if self.loss == "squarehead":
            return f"{LOSS_LABELS[self.loss]} λ={self.squarehead_lambda:g}"
        return LOSS_LABELS[self.loss]

    @property
    def label(self) -> str:
        target = "dense reference" if self.target == DENSE else target_label(self.target)
        return f"{self.method} {target} {self.loss_label} lr={self.lr:g}"

    def as_row(self, settings) -> dict:
        """The fields of the row this job will produce that ``row_key`` reads, plus what the sweep adds."""
        sparsity = 0.0 if self.target == DENSE else (0.5 if ":" in self.target else float(self.target))
        return dict(method=self.method, pruner=settings.pruner, sparsity=sparsity,
                    pattern=self.target if ":" in self.target else None, loss=self.loss,
                    squarehead_lambda=(self.squarehead_lambda if self.squarehead_lambda is not None
                                       else RECOVERY_DEFAULTS["squarehead_lambda"]),
                    teacher=settings.teacher or RECOVERY_DEFAULTS["teacher"],
                    steps=settings.steps, seq_len=settings.seq_len, batch_size=settings.batch_size, lr=self.lr,
                    seed=settings.seed, eval_windows=settings.eval_windows, eval_seq_len=settings.eval_seq_len,
                    calib_samples=settings.calib_samples, calib_seq_len=settings.calib_seq_len,
                    extra_args=settings.extra_args)

    def recovery_argv(self, settings) -> list[str]:
        argv = ["--method", self.method, "--pruner", settings.pruner]
        if self.target == DENSE:
            argv += ["--sparsity", "0"]
        elif ":" in self.target:
            argv += ["--pattern", self.target]
        else:
            argv += ["--sparsity", self.target]
        argv += ["--loss", self.loss, "--lr", f"{self.lr:g}", "--steps", str(settings.steps),
                 "--seq-len", str(settings.seq_len), "--batch-size", str(settings.batch_size),
                 "--seed", str(settings.seed), "--eval-windows", str(settings.eval_windows),
                 "--eval-seq-len", str(settings.eval_seq_len), "--calib-samples", str(settings.calib_samples),
                 "--calib-seq-len", str(settings.calib_seq_len)]
        if self.loss == "squarehead":
            argv += ["--squarehead-lambda", f"{self.squarehead_lambda:g}"]
            if settings.teacher:
                argv += ["--teacher", settings.teacher]
        for flag, value in (("--model", settings.model), ("--data", settings.data),
                            ("--cache-dir", settings.cache_dir), ("--threads", settings.threads)):
            if value is not None:
                argv += [flag, str(value)]
        if settings.arc_easy:
            argv += ["--arc-easy", str(settings.arc_easy)]
        return argv + shlex.split(settings.extra_args)


def target_label(target: str) -> str:
    return target if ":" in target or target == DENSE else f"{float(target):.0%}"


def target_sparsity(target: str) -> float:
    if target == DENSE:
        return 0.0
    if ":" in target:
        n, m = (int(x) for x in target.split(":"))
        return n / m
    return float(target)


def not_applicable(method: str, target: str, pruner: str) -> Optional[str]:
    """Why recovery.py cannot run ``method`` at ``target`` with ``pruner``, or None."""
    if method == "spt" and pruner == "sparsegpt" and target != DENSE:
        return "SPT's gradual pruning uses wanda or magnitude, not sparsegpt"
    return None


def parse_target(text: str) -> str:
    text = text.strip()
    if ":" in text:
        n, m = text.split(":")
        if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
            raise argparse.ArgumentTypeError(f"N:M pattern expected, got {text!r}")
        return f"{int(n)}:{int(m)}"
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"sparsity must be in (0, 1) or an N:M pattern, got {text!r} "
                                         f"(the dense reference row is on unless --no-dense)")
    return f"{value:g}"


def comma_list(choices=None, convert=str):
    def parse(text: str) -> list:
        values = [convert(v) for v in text.split(",") if v.strip()]
        bad = [v for v in values if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return values

    return parse


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
    g.add_argument("--methods", type=comma_list(METHODS), default=list(METHODS))
    g.add_argument("--targets", type=comma_list(convert=parse_target), default=["0.5", "0.7", "2:4"],
                   help="sparsities (0.5 or 50%%) and N:M patterns, comma-separated")
    g.add_argument("--losses", type=comma_list(tuple(LOSS_LABELS)), default=None,
                   help="comma-separated (default: ce,squarehead)")
    g.add_argument("--squarehead-targets", default=None,
                   help="targets of the SquareHead rows, comma-separated and among --targets, or 'all' for every "
                        f"--targets (default: {DEFAULT_SQUAREHEAD_TARGET} when it is among --targets)")
    g.add_argument("--squarehead-methods", type=comma_list(METHODS), default=list(SPARSE_METHODS),
                   help="methods with SquareHead rows (intersected with --methods)")
    g.add_argument("--no-dense", dest="dense", action="store_false",
                   help="leave out the dense reference row (--method lora --sparsity 0, CE)")
    g.add_argument("--lr", type=parse_lr, action="append", default=[],
                   help="per-method lr, e.g. --lr spp=3e-3,lora=2e-4 (defaults: "
                        + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    b = p.add_argument_group("budget and settings (passed to recovery.py; part of a row's key)")
    b.add_argument("--pruner", default="wanda", choices=["wanda", "sparsegpt", "magnitude"])
    b.add_argument("--steps", type=int, default=200)
    b.add_argument("--seq-len", type=int, default=128)
    b.add_argument("--batch-size", type=int, default=4)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--eval-windows", type=int, default=RECOVERY_DEFAULTS["eval_windows"])
    b.add_argument("--eval-seq-len", type=int, default=RECOVERY_DEFAULTS["eval_seq_len"])
    b.add_argument("--calib-samples", type=int, default=RECOVERY_DEFAULTS["calib_samples"])
    b.add_argument("--calib-seq-len", type=int, default=RECOVERY_DEFAULTS["calib_seq_len"])
    b.add_argument("--squarehead-lambda", dest="squarehead_lambdas", type=comma_list(convert=float),
                   default=[RECOVERY_DEFAULTS["squarehead_lambda"]],
                   help="SquareHead's λ; comma-separated for one row per value, e.g. 1,0.1")
    b.add_argument("--teacher", default=None, help="SquareHead teacher model (default: the dense model, untuned)")
    b.add_argument("--extra-args", default="",
                   help="more recovery.py flags for every row, one string, e.g. \"--spp-r 32\"")
    r = p.add_argument_group("passed to recovery.py, not part of the key")
    r.add_argument("--arc-easy", type=int, default=0,
                   help="zero-shot ARC-Easy before and after on this many questions (-1: all). Not part of the "
                        "key, but a finished row without these ARC figures is run again")
    r.add_argument("--model", default=None)
    r.add_argument("--data", default=None)
    r.add_argument("--cache-dir", default=None)
    r.add_argument("--threads", type=int, default=None)
    o = p.add_argument_group("files and modes")
    o.add_argument("--results", default=str(REPO_ROOT / "benchmarks" / "results" / "recovery.jsonl"),
                   help="JSON lines read to skip finished rows, and appended to")
    o.add_argument("--log-dir", default=str(REPO_ROOT / "runs" / "sweep-logs"),
                   help="one log (stdout and stderr) per recovery.py run")
    o.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    o.add_argument("--render-only", action="store_true", help="render from --results, run nothing")
    o.add_argument("--no-render", dest="render", action="store_false", help="do not render after running")
    o.add_argument("--markdown-out", default=str(REPO_ROOT / "docs" / "results" / "sweep_results.md"))
    o.add_argument("--png-out", default=str(REPO_ROOT / "docs" / "results" / "sweep.png"))
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.lrs = dict(DEFAULT_LR)
    for override in args.lr:
        args.lrs.update(override)
    losses_given = args.losses is not None
    if not losses_given:
        args.losses = list(LOSS_LABELS)
    if args.squarehead_targets is None:  # the recovery table's SquareHead rows are at 70%, when the sweep has it
        args.squarehead_targets = [t for t in (DEFAULT_SQUAREHEAD_TARGET,) if t in args.targets]
    elif args.squarehead_targets.strip() == "all":
        args.squarehead_targets = list(args.targets)
    else:
        try:
            args.squarehead_targets = comma_list(convert=parse_target)(args.squarehead_targets)
        except (argparse.ArgumentTypeError, ValueError) as e:
            p.error(f"--squarehead-targets: {e}")
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
    """The jobs of the sweep in running order (dense reference, CE by target, SquareHead), and the
    combinations left out as not applicable, each with its reason."""
    candidates = []
    if args.dense:
        candidates.append(Job("lora", DENSE, "ce", args.lrs["lora"]))
    if "ce" in args.losses:
        candidates += [Job(m, t, "ce", args.lrs[m]) for t in args.targets for m in args.methods]
    if "squarehead" in args.losses:
        candidates += [Job(m, t, "squarehead", args.lrs[m], lam) for lam in args.squarehead_lambdas
                       for t in args.squarehead_targets for m in args.methods if m in args.squarehead_methods]
    jobs, skipped, seen = [], [], set()
    for job in candidates:
        if job in seen:
            continue
        seen.add(job)
        reason = not_applicable(job.method, job.target, args.pruner)
        if reason:
            skipped.append((job, reason))
        else:
            jobs.append(job)
    return jobs, skipped


def read_rows(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:  # e.g. a line cut short by a full disk: report it, keep the rest
            print(f"warning: {path}:{number} is not JSON ({e}); ignored", file=sys.stderr)
    return rows


def latest_rows_by_key(rows: list[dict]) -> dict[RowKey, dict]:
    """Later rows replace earlier ones with the same key (a rerun after a fix)."""
    out = {}
    for row in rows:
        try:
            out[row_key(row)] = row
        except (KeyError, TypeError, ValueError) as e:
            print(f"warning: results row without the fields of a key ({e!r}); ignored: {row}", file=sys.stderr)
    return out


class RecoveryFailed(RuntimeError):
    pass


def run_recovery(argv: list[str], log_path: Path) -> dict:
    """Run recovery.py with ``argv`` in a subprocess, its output going to ``log_path``; return its row.

    Raises RecoveryFailed, with the tail of the log, when it exits non-zero or writes no row."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("TQDM_MININTERVAL", "30")  # a bar update every 30 s, not a log line per step
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.jsonl"
        with open(log_path, "w") as log:
            log.write("$ " + shlex.join([sys.executable, str(RECOVERY_SCRIPT), *argv]) + "\n")
            log.flush()
            # cwd: the repo root, so recovery.py's relative defaults (runs/cache) are the usual ones
            proc = subprocess.run([sys.executable, str(RECOVERY_SCRIPT), *argv, "--out", str(out)],
                                  cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        lines = out.read_text().splitlines() if out.exists() else []
    if proc.returncode != 0 or not lines:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        what = f"exit status {proc.returncode}" if proc.returncode else "no row written"
        raise RecoveryFailed(f"recovery.py failed ({what}); log: {log_path}\n{tail}")
    return json.loads(lines[-1])


def record(row: dict, job: Job, args) -> dict:
    """Add what the sweep knows and recovery.py's row does not say, then append it to --results."""
    row = dict(row)
    known = job.as_row(args)
    for field in ("eval_windows", "eval_seq_len", "calib_samples", "calib_seq_len"):
        row[field] = known[field]
    row["lr"] = job.lr  # exact: recovery.py rounds floats to 4 decimals (5e-5 would read 0.0001)
    if args.extra_args:
        row["extra_args"] = args.extra_args
    if row_key(row) != row_key(known):  # would run again on every invocation: a bug to see, not to loop on
        raise RecoveryFailed(f"row key {row_key(row)} does not match the job's {row_key(known)}; "
                             f"the row, not recorded: {json.dumps(row)}")
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def log_name(job: Job, args) -> str:
    """One log per row: the pruner and the flags are part of the name, so a row with ``--extra-args``
    (or another pruner) does not overwrite the log of the row without them."""
    loss = job.loss if job.loss != "squarehead" else f"squarehead{job.squarehead_lambda:g}"
    flags = re.sub(r"[^A-Za-z0-9.]+", "_", without_evaluation_only_flags(args.extra_args)).strip("_")
    return (f"{job.method}-{job.target.replace(':', '_')}-{args.pruner}-{loss}-lr{job.lr:g}"
            + (f"-{flags}" if flags else "") + ".log")


def run_sweep(args) -> int:
    jobs, skipped = plan(args)
    done = latest_rows_by_key(read_rows(args.results))
    found = {job: done.get(row_key(job.as_row(args))) for job in jobs}
    missing = [job for job in jobs if found[job] is None or (args.arc_easy and not has_arc(found[job], args.arc_easy))]
    print(f"{len(jobs)} rows planned: {len(jobs) - len(missing)} done in {args.results}, {len(missing)} to run; "
          f"{len(skipped)} not applicable")
    for job, reason in skipped:
        print(f"  not applicable: {job.method} at {target_label(job.target)} ({job.loss_label}): {reason}")
    if args.dry_run:
        for job in jobs:
            state = "run " if job in missing else "done"
            print(f"  {state} {job.label}")
            if job in missing:
                print("       " + shlex.join(["python", "benchmarks/recovery.py", *job.recovery_argv(args)]))
        return 0
    failed = []
    for i, job in enumerate(missing, 1):
        print(f"[{i}/{len(missing)}] {job.label} ...", flush=True)
        t0 = time.time()
        try:
            row = record(run_recovery(job.recovery_argv(args), Path(args.log_dir) / log_name(job, args)), job, args)
        except RecoveryFailed as e:
            failed.append(job)
            print(f"[{i}/{len(missing)}] FAILED {job.label}: {e}", file=sys.stderr, flush=True)
            continue
        print(f"[{i}/{len(missing)}] done in {(time.time() - t0) / 60:.1f} min: ppl after merge "
              f"{row.get('ppl_after')}, sparsity after merge {row.get('sparsity_after_merge')}", flush=True)
    if failed:
        print(f"{len(failed)} rows failed (rerun to retry): " + "; ".join(job.label for job in failed),
              file=sys.stderr)
    if args.render:
        render_outputs(args)
    return 1 if failed else 0


# --- rendering -----------------------------------------------------------------------------------

def fmt_acc(value) -> str:
    # accuracies are fractions in sp.evaluate; a value above 1 is taken as already a percentage
    return "–" if value is None else f"{value * 100 if value <= 1 else value:.1f}"


def extra_columns(rows: list[dict]) -> list:
    columns = []
    for prefix, name in (("arc_easy", "ARC-E"), ("arc_challenge", "ARC-C")):
        for measure in ("acc", "acc_norm"):  # acc_norm: lm-eval-harness's length-normalised accuracy
            for when in ("before", "after"):
                key = f"{prefix}_{measure}_{when}"
                if any(key in r for r in rows):
                    columns.append((f"{name} {measure} {when} (%)", "---:", lambda r, key=key: fmt_acc(r.get(key))))
    columns.append(("wall (min)", "---:",
                    lambda r: "–" if r.get("wall_s") is None else f"{r['wall_s'] / 60:.0f}"))
    return columns


def render_table(rows: list[dict]) -> str:
    return recovery_table.render(rows, extra_columns=extra_columns(rows))


def is_exact(row: dict, target: str) -> bool:
    """Exactly the target's sparsity after merge (rows hold it rounded to 4 decimals); for N:M also the
    unchanged mask, since the fraction alone does not say the groups are kept."""
    at_target = abs(row["sparsity_after_merge"] - target_sparsity(target)) < 1e-4
    return at_target and (":" not in target or row.get("mask_identical") is True)


def render_markdown(args) -> str:
    jobs, skipped = plan(args)
    done = latest_rows_by_key(read_rows(args.results))
    found = {job: done.get(row_key(job.as_row(args))) for job in jobs}
    tokens = args.steps * args.batch_size * args.seq_len
    results = Path(args.results).resolve()
    shown = results.relative_to(REPO_ROOT) if results.is_relative_to(REPO_ROOT) else results
    out = [
        "## Recovery sweep",
        "",
        f"Made by `python benchmarks/sweep.py` (rows: `{shown}`). Every row: {args.steps} steps of "
        f"{args.batch_size} x {args.seq_len} tokens ({tokens:,} tokens), AdamW, cosine schedule without warm-up, "
        f"seed {args.seed}; pruner {args.pruner} with {args.calib_samples} calibration windows of "
        f"{args.calib_seq_len} tokens; ppl on {args.eval_windows} windows of {args.eval_seq_len} tokens of "
        f"wiki.test.raw. lr per method: " + ", ".join(f"{m} {args.lrs[m]:g}" for m in args.methods)
        + (f". SquareHead: λ={', '.join(f'{lam:g}' for lam in args.squarehead_lambdas)}, teacher "
           f"{args.teacher or RECOVERY_DEFAULTS['teacher']}"
           if "squarehead" in args.losses else "")
        + (f". Extra recovery.py flags: `{args.extra_args}`" if args.extra_args else "")
        + (f". ARC-Easy: zero-shot, {'all' if args.arc_easy < 0 else f'the first {args.arc_easy}'} questions of "
           "the test set, before (one-shot pruned) and after (merged), acc_norm = lm-eval-harness's "
           "length-normalised accuracy" if args.arc_easy else "") + ".",
    ]
    dense = [found[j] for j in jobs if j.target == DENSE and found[j]]
    if dense:
        out += ["", "### Dense reference (plain LoRA, nothing pruned)", "", render_table(dense)]
    others = other_rows(args, jobs, done)
    for target in args.targets:
        rows = [found[j] for j in jobs if j.target == target and found[j]]
        if not rows:
            continue
        out += ["", f"### {target_label(target)}", "", render_table(rows)]
        out += best_recipe_lines(rows, target, [r for r in others if target_of(r) == target])
    comparison = squarehead_vs_ce(jobs, found)
    if comparison:
        out += ["", "### SquareHead vs CE (ppl after merge, same tokens)", "", *comparison]
    if others:
        out += ["", "### Other recipes at the same budget", "",
                "Rows of the results file with the same tokens, schedule, seed and evaluation that this plan does "
                "not name: another pruner, lr, SquareHead λ or recovery.py flags (in the notes). They count for the "
                "best-recipe lines above."]
        planned_targets = list(args.targets)
        extra_targets = sorted({target_of(r) for r in others} - set(planned_targets))
        for target in planned_targets + extra_targets:
            rows = sorted((r for r in others if target_of(r) == target), key=lambda r: (r["pruner"], r["method"]))
            if rows:
                out += ["", f"#### {target_label(target)}", "", render_table(rows)]
        comparison = other_squarehead_vs_ce(others, [row for row in found.values() if row])
        if comparison:
            out += ["", "SquareHead rows among them against their CE row (same method, target, pruner, lr and "
                        "flags):", "", *comparison]
    if skipped:
        out += ["", "### Not applicable", ""]
        out += [f"- {job.method} at {target_label(job.target)} ({job.loss_label}): {reason}"
                for job, reason in skipped]
    missing = [job for job in jobs if found[job] is None]
    if missing:
        out += ["", "### Not run yet", ""] + [f"- {job.label}" for job in missing]
    no_arc = [job for job in jobs if args.arc_easy and found[job] is not None and not has_arc(found[job], args.arc_easy)]
    if no_arc:
        out += ["", "### ARC-Easy not measured yet (rows from before the ARC pass; the next sweep reruns them)", ""]
        out += [f"- {job.label}" for job in no_arc]
    return "\n".join(out) + "\n"


def recipe_label(row: dict, in_plan: bool = True) -> str:
    """``method (loss)``; a row from outside the plan also names its pruner, lr and recovery.py flags."""
    label = f"{row['method']} ({recovery_table.loss_label(row)}"
    if not in_plan:
        flags = without_evaluation_only_flags(row.get("extra_args") or "")
        label += f"; {row['pruner']}, lr {float(row['lr']):g}" + (f", `{flags}`" if flags else "")
    return label + ")"


def best_recipe_lines(rows: list[dict], target: str, others: Sequence[dict] = ()) -> list[str]:
    """The best sparse method that is exactly at the target after merge, against plain LoRA re-masked.

    ``rows``: the plan's rows at ``target`` (the reference is its plain LoRA CE row); ``others``: rows
    at the same target and budget from outside the plan (another pruner, lr or flags), also candidates.
    A best recipe from outside the plan is also set against plain LoRA re-masked on its own pruned
    model (same pruner, lr and flags) when that row exists: the pruner's share of the gain is then
    visible apart from the method's."""
    candidates = [r for r in (*rows, *others) if r["method"] != "lora" and r.get("ppl_after") is not None
                  and is_exact(r, target)]
    if not candidates:
        return []
    best = min(candidates, key=lambda r: r["ppl_after"])
    in_plan = any(best is r for r in rows)
    line = (f"- Best recipe exactly at {target_label(target)} after merge: {recipe_label(best, in_plan)}, "
            f"ppl {best['ppl_after']:.1f}")
    lora = [r for r in rows if r["method"] == "lora" and (r.get("loss") or "ce") == "ce"]
    if lora and lora[0].get("ppl_after"):
        line += (f" = {best['ppl_after'] / lora[0]['ppl_after']:.2f}x plain LoRA merged-then-re-masked "
                 f"({lora[0]['ppl_after']:.1f})")
    if not in_plan:
        same_model = [r for r in others if r["method"] == "lora" and (r.get("loss") or "ce") == "ce"
                      and r.get("ppl_after") and r["pruner"] == best["pruner"] and float(r["lr"]) == float(best["lr"])
                      and without_evaluation_only_flags(r.get("extra_args") or "")
                      == without_evaluation_only_flags(best.get("extra_args") or "")]
        if same_model:
            ref = same_model[0]["ppl_after"]
            line += f"; {best['ppl_after'] / ref:.2f}x plain LoRA re-masked on the same pruned model and lr ({ref:.1f})"
    return ["", line + "."]


def other_rows(args, jobs: list[Job], done: dict[RowKey, dict]) -> list[dict]:
    """Rows of the results file at this sweep's budget (tokens, schedule, seed, evaluation) that its plan
    does not name: another pruner, lr, SquareHead λ or recovery.py flags, e.g. recipes tried by hand."""
    planned = {row_key(job.as_row(args)) for job in jobs}
    budget = (args.steps, args.seq_len, args.batch_size, args.seed, args.eval_windows, args.eval_seq_len)
    return [row for key, row in done.items() if key not in planned
            and (key.steps, key.seq_len, key.batch_size, key.seed, key.eval_windows, key.eval_seq_len) == budget]


def without_logit_flag(extra_args: str) -> str:
    """``extra_args`` minus ``--logit-lambda X`` (and the evaluation-only flags): a SquareHead row with the
    logit term is compared with the CE row that has the rest of its flags."""
    return without_flags(extra_args, (*EVALUATION_ONLY_FLAGS, "--logit-lambda"))


def other_squarehead_vs_ce(others: list[dict], planned_rows: list[dict]) -> list[str]:
    """For each SquareHead row from outside the plan, the CE row with the same method, target, pruner,
    lr and flags (the logit term's flag aside), from the plan or not."""
    lines = []
    pool = [*planned_rows, *others]
    for sh in others:
        if (sh.get("loss") or "ce") != "squarehead" or sh.get("ppl_after") is None:
            continue
        flags = without_logit_flag(sh.get("extra_args") or "")
        ce = next((r for r in pool if (r.get("loss") or "ce") == "ce" and r.get("ppl_after") is not None
                   and (r["method"], target_of(r), r["pruner"], float(r["lr"])) ==
                   (sh["method"], target_of(sh), sh["pruner"], float(sh["lr"]))
                   and without_logit_flag(r.get("extra_args") or "") == flags), None)
        if ce is None:
            continue
        lines.append(f"| {sh['method']} | {target_label(target_of(sh))} | {sh['pruner']} | {float(sh['lr']):g} "
                     f"| {recovery_table.loss_label(sh)}{f', `{flags}`' if flags else ''} | {ce['ppl_after']:.1f} "
                     f"| {sh['ppl_after']:.1f} | {sh['ppl_after'] / ce['ppl_after']:.2f} |")
    if not lines:
        return []
    return ["| method | target | pruner | lr | SquareHead recipe | CE | SquareHead | SquareHead / CE |",
            "|---|---|---|---:|---|---:|---:|---:|", *lines]


def squarehead_vs_ce(jobs: list[Job], found: dict) -> list[str]:
    lines = []
    for job in jobs:
        if job.loss != "squarehead" or found[job] is None:
            continue
        ce = next((found[j] for j in jobs if j.loss == "ce" and (j.method, j.target) == (job.method, job.target)
                   and found[j] is not None), None)
        if ce is None:
            continue
        sh = found[job]
        lines.append(f"| {job.method} | {target_label(job.target)} | {job.squarehead_lambda:g} | {ce['ppl_after']:.1f} "
                     f"| {sh['ppl_after']:.1f} | {sh['ppl_after'] / ce['ppl_after']:.2f} |")
    if not lines:
        return []
    return ["| method | target | λ | CE | SquareHead | SquareHead / CE |", "|---|---|---:|---:|---:|---:|", *lines]


def render_png(args, path) -> Optional[Path]:
    """Two panels: ppl after merge per target and method (log y), trainable parameters per method.
    Returns the path, or None (with a message) when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: skipped the PNG "
              "(pip install 'sparse-peft[bench]' or pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    jobs, _ = plan(args)
    done = latest_rows_by_key(read_rows(args.results))
    found = {job: done[row_key(job.as_row(args))] for job in jobs if row_key(job.as_row(args)) in done}
    if not found:
        print("no sweep rows in the results file yet: skipped the PNG", file=sys.stderr)
        return None
    # x: the unstructured targets in order of sparsity, joined by lines, then the N:M patterns as lone
    # markers (a line from 50% through 2:4 to 70% would read as a trend through one axis)
    unstructured = sorted((t for t in args.targets if ":" not in t), key=float)
    targets = unstructured + [t for t in args.targets if ":" in t]
    fig, (ax_ppl, ax_params) = plt.subplots(1, 2, figsize=(14, 4.5), width_ratios=(1.6, 1))
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for method in args.methods:
        variants = [("ce", None, "-", "o")] + [("squarehead", lam, linestyle, marker) for lam, linestyle, marker
                                               in zip(args.squarehead_lambdas, ("--", "-.", ":"), ("s", "^", "v"))]
        for loss, lam, linestyle, marker in variants:
            points = {t: found[j]["ppl_after"] for j in found for t in targets
                      if (j.method, j.target, j.loss, j.squarehead_lambda) == (method, t, loss, lam)}
            if not points:
                continue
            label = (method + (" re-masked" if method == "lora" else "")
                     + ("" if loss == "ce" else f" SquareHead λ={lam:g}"))
            line = [(i, points[t]) for i, t in enumerate(targets) if t in points and ":" not in t]
            lone = [(i, points[t]) for i, t in enumerate(targets) if t in points and ":" in t]
            if line:
                ax_ppl.plot(*zip(*line), linestyle=linestyle, marker=marker, color=colors[method], label=label)
            if lone:
                ax_ppl.plot(*zip(*lone), linestyle="none", marker=marker, color=colors[method],
                            label=None if line else label)
    dense = [row for job, row in found.items() if job.target == DENSE]
    if dense:
        ax_ppl.axhline(dense[0]["ppl_after"], color="gray", linestyle=":", label="dense LoRA reference")
        ax_ppl.axhline(dense[0]["ppl_dense"], color="black", linestyle=":", linewidth=0.8, label="dense, untuned")
    ax_ppl.set_xticks(range(len(targets)), [target_label(t) for t in targets])
    ax_ppl.set_yscale("log")
    ax_ppl.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 60, not 6 x 10^1
    ax_ppl.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax_ppl.set_xlabel("sparsity")
    ax_ppl.set_ylabel("wikitext ppl after merge (log)")
    ax_ppl.set_title(f"ppl after merge ({args.steps} steps x {args.batch_size} x {args.seq_len} tokens)")
    # beside the axes, not on them: inside, it covered the low-ppl lines and the reference lines
    ax_ppl.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    # one bar per method: its CE row at the first target it has (the count barely moves with the target)
    params = {}
    for job, row in found.items():
        if job.loss == "ce" and job.target != DENSE and job.method not in params:
            params[job.method] = row["trainable_params"]
    methods = [m for m in args.methods if m in params]
    bars = ax_params.bar(methods, [params[m] for m in methods], color=[colors[m] for m in methods])
    ax_params.bar_label(bars, labels=[f"{params[m]:,}" for m in methods], fontsize=7)
    ax_params.set_yscale("log")  # SPT's prompts are thousands of parameters, the others millions
    ax_params.set_ylabel("trainable parameters (log)")
    ax_params.set_title("trainable parameters per method")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render_outputs(args) -> None:
    markdown = Path(args.markdown_out)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render_markdown(args))
    print(f"wrote {markdown}")
    png = render_png(args, args.png_out)
    if png is not None:
        print(f"wrote {png}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render_only:
        render_outputs(args)
        return 0
    return run_sweep(args)


if __name__ == "__main__":
    sys.exit(main())
