"""``sparse-peft``: prune, fine-tune, evaluate, export and inspect sparse LLMs from a shell.

    sparse-peft prune    --model M --out pruned/ --method wanda --sparsity 0.5 --data calib.txt
    sparse-peft finetune --model pruned/ --data train.txt --out tuned/ --method spp --steps 200
    sparse-peft recover  --model M --data train.txt --sparsity 0.5 --out recovered/
    sparse-peft eval     --model tuned/ --data test.txt [--arc arc_easy.jsonl]
    sparse-peft export   --model tuned/ --out dense/ --format dense
    sparse-peft report   --model tuned/ --png layers.png
    sparse-peft demo

``--model`` is a hub id, a local transformers directory, a ``.gguf`` file (or a directory holding
one), or a sparse checkpoint written by ``save_sparse``. ``--data`` is a plain text file.
Exit codes: 0 done, 1 bad input found while running (one line on stderr), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

EXIT_OK, EXIT_BAD_INPUT, EXIT_USAGE = 0, 1, 2
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
FINETUNE_METHODS = ("masked_lora", "spp", "seft")
# finetune accepts "spt" only to say why it cannot run it: its output is one merged model (what eval,
# export and report read), and SPT's prompts are extra key/value positions that no weight can hold.
SPT_REFUSED = ("--method spt: SPT cannot be merged (its prompts are extra key/value positions, not a weight "
               "change), so finetune cannot write the merged model it saves; train SPT from Python with "
               "sp.SPTConfig and sp.GradualPruningCallback (docs/spt.md)")


class CliError(Exception):
    """Bad input found while running: reported as one line, exit code 1."""


# --- loading ---------------------------------------------------------------------------------------

def load_model(path: str | None, need_tokenizer: bool = False):
    """``(model, tokenizer or None)`` from a sparse checkpoint, a GGUF, a local dir or a hub id."""
    from .data import find_gguf, load_model_and_tokenizer
    from .io import is_sparse_checkpoint, load_sparse

    if path is None:
        model, tokenizer = load_model_and_tokenizer(None)
    elif is_sparse_checkpoint(path):
        model, tokenizer = load_sparse(path), _try_tokenizer(path)
    elif find_gguf(path) is not None:
        model, tokenizer = load_model_and_tokenizer(path)
    else:
        from transformers import AutoModelForCausalLM

        if not Path(path).exists() and (path.startswith((".", "/")) or path.count("/") > 1):
            raise CliError(f"--model {path!r}: no such file or directory")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        except (OSError, ValueError) as err:
            raise CliError(f"--model {path!r}: cannot load a causal LM ({_first_line(err)})") from None
        except SafetensorError as err:  # a damaged weights file
            raise CliError(f"--model {path!r}: {_unreadable_safetensors(path, err)}") from None
        model.eval()
        tokenizer = _try_tokenizer(path)
    if need_tokenizer and tokenizer is None:
        raise CliError(f"--model {path!r}: no tokenizer found beside the model (needed to read --data)")
    return model, tokenizer


def _unreadable_safetensors(path: str, err: Exception) -> str:
    """Which weights file safetensors cannot read, and why: transformers' error names no file."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as file_err:  # safetensors raises its own error types for a damaged header
            return f"{file}: not a readable safetensors file ({_first_line(file_err)})"
    return f"a weights file is not a readable safetensors file ({_first_line(err)})"


def _try_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None


def read_text(data_path: str) -> str:
    """The text of ``--data``, or a one-line error naming it."""
    from .data import load_text

    path = Path(data_path)
    if not path.is_file():
        raise CliError(f"--data {data_path!r}: no such file")
    try:
        return load_text(path)
    except UnicodeDecodeError:
        raise CliError(f"--data {data_path!r}: not UTF-8 text") from None


def read_ids(tokenizer, data_path: str, min_tokens: int = 2) -> torch.Tensor:
    from .data import token_ids

    return _enough_tokens(token_ids(tokenizer, read_text(data_path)), data_path, min_tokens)


def _enough_tokens(ids: torch.Tensor, data_path: str, min_tokens: int) -> torch.Tensor:
    if ids.numel() < min_tokens:
        raise CliError(f"--data {data_path!r}: {ids.numel()} tokens, need at least {min_tokens}")
    return ids


def read_ids_and_labels(tokenizer, data_path: str, placeholder: str, min_tokens: int = 2, verb: str = "scored"):
    """``(ids, labels)`` of ``--data``: labels None without a placeholder, else ``placeholder_labels``'
    (``IGNORED_LABEL`` on every token that overlaps it), after one line saying what was found."""
    if not placeholder:
        return read_ids(tokenizer, data_path, min_tokens), None
    from .data import placeholder_labels

    try:
        ids, labels, count = placeholder_labels(tokenizer, read_text(data_path), placeholder)
    except ValueError as err:
        raise CliError(f"--skip-placeholder: {_first_line(err)}") from None
    _enough_tokens(ids, data_path, min_tokens)
    print(f"--skip-placeholder {placeholder!r}: {count} occurrences in {data_path}, "
          f"{int((labels != ids).sum())} tokens not {verb}", flush=True)
    return ids, labels


def save_model(model, out: str, tokenizer, fmt: str) -> None:
    from .io import export_dense, save_sparse

    if fmt == "sparse":
        save_sparse(model, out, tokenizer=tokenizer)
    else:
        export_dense(model, out, tokenizer=tokenizer)


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _check_fraction(name: str):
    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {value!r}") from None
        if not 0.0 <= x < 1.0:
            raise argparse.ArgumentTypeError(f"{name} must be in [0, 1), got {value}")
        return x
    return parse


def _target(kind: str):
    """argparse type: ``sp.parse_target`` for one kind of target (``sparsity`` or ``pattern``)."""
    def parse(value: str):
        from .sparsity import parse_target

        try:
            target = parse_target(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        if kind not in target:
            raise argparse.ArgumentTypeError(f"takes {'a fraction' if kind == 'sparsity' else 'an N:M pattern'}, "
                                             f"got {value!r} (use --{next(iter(target))} for that)")
        return target[kind]
    return parse


def _positive_int(value: str) -> int:
    try:
        x = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if x <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return x


# --- prune -----------------------------------------------------------------------------------------

def cmd_prune(args) -> None:
    import sparse_peft as sp
    from .data import random_windows

    if args.sparsity is None and args.pattern is None:
        raise CliError("prune needs --sparsity or --pattern")
    needs_calibration = args.method != "magnitude" or args.allocation == "owl" or args.fit_4bit is not None
    if needs_calibration and args.data is None:
        what = (f"--fit-4bit {args.fit_4bit}" if args.fit_4bit
                else f"--method {args.method} (allocation {args.allocation})")
        raise CliError(f"{what} needs calibration text: pass --data")
    model, tokenizer = load_model(args.model, need_tokenizer=needs_calibration)
    calibration = None
    if needs_calibration:
        ids = read_ids(tokenizer, args.data, min_tokens=args.calib_seq_len + 1)
        calibration = random_windows(ids, n=args.calib_samples, seq_len=args.calib_seq_len, seed=args.seed)
    report = sp.prune(model, method=args.method, sparsity=args.sparsity, pattern=args.pattern,
                      calibration=calibration, allocation=args.allocation)
    fitted = ""
    if args.fit_4bit:
        fit = sp.fit_to_4bit(model, calibration, quant_type=args.fit_4bit)
        report = sp.sparsity_report(model)  # kept weights the grid rounded to 0 are pruned now
        fitted = f", kept weights on the {args.fit_4bit} grid ({sum(fit.rounded_to_zero.values())} rounded to 0)"
    save_model(model, args.out, tokenizer, args.format)
    print(f"pruned with {args.method} to global sparsity {report.global_sparsity:.2%}{fitted}; "
          f"saved ({args.format}) to {args.out}")


# --- finetune --------------------------------------------------------------------------------------

class _Windows(torch.utils.data.Dataset):
    """Non-overlapping windows of ``seq_len`` tokens from one token stream (labels = inputs)."""

    def __init__(self, ids: torch.Tensor, seq_len: int):
        self.windows = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict:
        window = self.windows[i]
        return {"input_ids": window, "labels": window.clone()}


def peft_config_from_args(args):
    import sparse_peft as sp

    targets = args.target_modules if args.target_modules != ["all-linear"] else "all-linear"
    options = {"masked_lora": dict(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.dropout),
               "seft": dict(density=args.density, update_interval=args.update_interval),
               "spp": dict(r=args.r, alpha=args.spp_alpha, dropout=args.dropout)}[args.method]
    return sp.method_config(args.method, target_modules=targets, **options)


def cmd_finetune(args) -> None:
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    import sparse_peft as sp

    if args.method == "spt":
        raise CliError(SPT_REFUSED)
    out = Path(args.out)
    resume = args.resume_from_checkpoint
    if resume not in (None, True) and not Path(resume).is_dir():
        raise CliError(f"--resume-from-checkpoint {resume!r}: no such checkpoint directory")
    if resume is True and not any((out / "checkpoints").glob("checkpoint-*")):
        raise CliError(f"--resume-from-checkpoint: no checkpoint-* under {out / 'checkpoints'} to resume from")
    model, tokenizer = load_model(args.model, need_tokenizer=True)
    ids = read_ids(tokenizer, args.data, min_tokens=args.seq_len)
    dataset = _Windows(ids, args.seq_len)
    if len(dataset) == 0:
        raise CliError(f"--data {args.data!r}: {ids.numel()} tokens, fewer than --seq-len {args.seq_len}")
    if sp.sparsity_report(model).global_sparsity == 0.0:
        print("warning: the model has no zeros in its linear layers (prune it first?)", file=sys.stderr)
    before = sp.sparsity_report(model)
    try:
        peft_model = get_peft_model(model, peft_config_from_args(args))
    except ValueError as err:
        raise CliError(f"--method {args.method}: {_first_line(err)}") from None
    training_args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type=args.scheduler,
        warmup_steps=args.warmup_steps,
        weight_decay=0.0,
        logging_steps=max(1, min(10, args.steps)),
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        data_seed=args.seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=os.environ.get("TQDM_DISABLE") == "1",
    )
    # SEFT moves its topology every --update-interval steps (each layer keeps its count of zeros).
    callbacks = [sp.SEFTCallback()] if args.method == "seft" else []
    trainer = Trainer(model=peft_model, args=training_args, train_dataset=dataset, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    peft_model.save_pretrained(out / "adapter")
    merged, _ = sp.merge_and_unload_sparse(peft_model)
    after = sp.sparsity_report(merged)
    changed = [name for name in before.layers if before.layers[name].zeros != after.layers[name].zeros]
    if changed:  # no method here changes a layer's count of zeros: this would be a bug, not a user error
        raise RuntimeError(f"sparsity changed in {len(changed)} layers after merging, e.g. {changed[0]}")
    save_model(merged, str(out), tokenizer, args.format)
    print(f"fine-tuned {args.steps} steps with {args.method}; merged model ({args.format}, sparsity "
          f"{after.global_sparsity:.2%}) in {out}, adapter in {out / 'adapter'}")


# --- recover ---------------------------------------------------------------------------------------

def cmd_recover(args) -> None:
    """``sp.recover``: prune, (reconstruct,) fine-tune, merge, check; save the model and its recipe."""
    import sparse_peft as sp
    from .data import bundled_text
    from .recovery import default_recipe, default_skip_placeholder, recipe_from_flags

    target = {"pattern": args.pattern} if args.pattern is not None else {"sparsity": args.sparsity}
    if target.get("sparsity") == 0:
        raise CliError("--sparsity 0: nothing to prune or recover; give a sparsity in (0, 1) or --pattern N:M")
    if args.method == "spt":
        raise CliError(SPT_REFUSED.replace("so finetune cannot", "so recover cannot"))
    try:
        recipe = recipe_from_flags(args, default_recipe(target))
    except ValueError as err:
        raise CliError(_first_line(err)) from None
    if recipe.allocation != "uniform" and args.pattern is not None:
        raise CliError(f"--allocation {recipe.allocation} sets unstructured layer sparsities; it cannot be used "
                       f"with --pattern {args.pattern}")
    data = args.data or str(bundled_text("train"))
    if not Path(data).is_file():
        raise CliError(f"--data {data!r}: no such file")
    print("recipe: " + ", ".join(f"{k}={v}" for k, v in recipe.to_dict().items()), flush=True)
    model, tokenizer = load_model(args.model, need_tokenizer=True)
    calibrates = recipe.pruner != "magnitude" or bool(recipe.induce) or bool(recipe.reconstruct)
    longest = max([recipe.seq_len] * (recipe.method is not None) + [recipe.calib_seq_len] * calibrates, default=1)
    placeholder = default_skip_placeholder(target) if args.skip_placeholder is None else args.skip_placeholder
    ids, labels = read_ids_and_labels(tokenizer, data, placeholder, longest + 1, "trained on")
    teacher = load_model(args.teacher)[0] if args.teacher and recipe.loss == "squarehead" else None
    merged, report = sp.recover(model, ids, **target, recipe=recipe, teacher=teacher, train_labels=labels)
    save_model(merged, args.out, tokenizer, args.format)
    record = {"model": args.model, "data": data, "teacher": args.teacher if teacher is not None else None,
              "skip_placeholder": placeholder or None, **report.to_dict()}
    (Path(args.out) / "recipe.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(report.to_markdown())
    checked = "the target" if recipe.allocation == "uniform" else "its OWL count, all together at the target"
    print(f"recovered to {target.get('pattern') or format(target['sparsity'], '.0%')}: every layer checked at "
          f"{checked}, global sparsity {report.global_sparsity:.2%}, masks unchanged: {report.mask_unchanged}; merged "
          f"model ({args.format}) in {args.out}, its recipe and stages in {Path(args.out) / 'recipe.json'}")


# --- eval ------------------------------------------------------------------------------------------

def arc_zero_shot(model, tokenizer, jsonl_path: str, limit: int | None = None, show_progress: bool = True) -> dict:
    """``sparse_peft.evaluation.arc_zero_shot`` with its errors as one-line CLI errors."""
    from .evaluation import arc_zero_shot as evaluate_arc

    try:
        return evaluate_arc(model, tokenizer, jsonl_path, limit=limit, show_progress=show_progress)
    except ValueError as error:
        raise CliError(f"--arc: {error}") from None


def cmd_eval(args) -> None:
    from .data import perplexity

    if args.data is None and args.arc is None:
        raise CliError("eval needs --data (perplexity) and/or --arc (zero-shot)")
    model, tokenizer = load_model(args.model, need_tokenizer=True)
    results: dict = {"model": args.model}
    if args.data is not None:
        ids, labels = read_ids_and_labels(tokenizer, args.data, args.skip_placeholder)
        n_available = ids.numel() // args.seq_len
        if n_available < 1:
            raise CliError(f"--data {args.data!r}: {ids.numel()} tokens, fewer than --seq-len {args.seq_len}")
        windows = args.windows if args.windows is not None else min(24, n_available)
        if windows > n_available:
            raise CliError(f"--data {args.data!r}: only {n_available} windows of {args.seq_len} tokens, "
                           f"--windows asks for {windows}")
        results["perplexity"] = perplexity(model, ids, n_windows=windows, seq_len=args.seq_len, labels=labels)
        results["windows"], results["seq_len"] = windows, args.seq_len
        results.update({"skip_placeholder": args.skip_placeholder} if args.skip_placeholder else {})
        print(f"perplexity: {results['perplexity']:.4f} ({windows} x {args.seq_len} tokens)")
    if args.arc is not None:
        results["zero_shot"] = arc_zero_shot(model, tokenizer, args.arc, limit=args.limit)
        zs = results["zero_shot"]
        print(f"zero-shot ({zs['questions']} questions): acc {zs['acc']:.4f}, acc_norm {zs['acc_norm']:.4f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


# --- export / report / demo ------------------------------------------------------------------------

def cmd_export(args) -> None:
    model, tokenizer = load_model(args.model)
    save_model(model, args.out, tokenizer, args.format)
    print(f"exported ({args.format}) to {args.out}")


def cmd_report(args) -> None:
    import sparse_peft as sp

    model, _ = load_model(args.model)
    report = sp.sparsity_report(model)
    if not report.layers:
        raise CliError(f"--model {args.model!r}: no linear layers to report")
    markdown = report.to_markdown()
    print(markdown)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(markdown + "\n", encoding="utf-8")
    if args.png:
        try:
            report.plot(args.png)
        except ImportError:
            print("note: matplotlib is not installed; skipping the PNG (pip install matplotlib)", file=sys.stderr)
        else:
            print(f"per-layer plot: {args.png}")


def demo_texts(data: str | None, out: Path) -> dict[str, str]:
    """Disjoint calibration, training and held-out text files for the demo.

    Without ``--data``: the WikiText-2 excerpt that ships with the package. With it: the file cut at
    the first white space after 80% and after 90% of its characters (training, calibration, held-out
    from the end), written under ``out/text``.
    """
    from .data import BUNDLED_TEXT_PARTS, bundled_text

    if data is None:
        return {part: str(bundled_text(part)) for part in BUNDLED_TEXT_PARTS}
    text = read_text(data)
    cuts = [next((i for i in range(len(text) * tenths // 10, len(text)) if text[i].isspace()), len(text))
            for tenths in (8, 9)]
    parts = {"train": text[: cuts[0]], "calibration": text[cuts[0]: cuts[1]], "heldout": text[cuts[1]:]}
    empty = [part for part, part_text in parts.items() if not part_text.strip()]
    if empty:
        raise CliError(f"--data {data!r}: {len(text)} characters, too short to cut into training, calibration "
                       f"and held-out text (the {empty[0]} part is empty)")
    (out / "text").mkdir(parents=True, exist_ok=True)
    for part, part_text in parts.items():
        (out / "text" / f"{part}.txt").write_text(part_text, encoding="utf-8")
    return {part: str(out / "text" / f"{part}.txt") for part in parts}


def _masks_of(model) -> dict[str, torch.Tensor]:
    from .sparsity import named_linears

    return {name: (layer.weight != 0) for name, layer in named_linears(model)}


def cmd_demo(args) -> None:
    """The whole flow on one model: measure, prune, measure, fine-tune briefly, merge, measure; a short summary."""
    import tempfile
    import time

    import sparse_peft as sp

    start = time.time()
    out = Path(args.out or tempfile.mkdtemp(prefix="sparse-peft-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    texts = demo_texts(args.data, out)
    pruned, tuned = str(out / "pruned"), str(out / "tuned")
    model_args = ["--model", args.model] if args.model else []

    def evaluate(model_args: list[str], name: str) -> list[str]:
        return ["eval", *model_args, "--data", texts["heldout"], "--seq-len", str(args.seq_len),
                "--windows", str(args.windows), "--json", str(out / f"eval_{name}.json")]

    steps = [
        evaluate(model_args, "dense"),
        ["prune", *model_args, "--out", pruned, "--method", args.pruner, "--sparsity", str(args.sparsity),
         "--data", texts["calibration"], "--calib-samples", str(args.calib_samples),
         "--calib-seq-len", str(args.seq_len)],
        evaluate(["--model", pruned], "pruned"),
        ["finetune", "--model", pruned, "--data", texts["train"], "--out", tuned, "--method", args.method,
         "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch-size", "4", "--save-steps",
         str(args.steps)],
        evaluate(["--model", tuned], "tuned"),
    ]
    for step in steps:
        print(f"\n$ sparse-peft {' '.join(step)}", flush=True)
        code = main(step)
        if code != EXIT_OK:
            raise CliError(f"demo step `{step[0]}` failed (exit {code})")

    ppl = {name: json.loads((out / f"eval_{name}.json").read_text())["perplexity"]
           for name in ("dense", "pruned", "tuned")}
    tuned_model = load_model(tuned)[0]
    pruned_masks, tuned_masks = _masks_of(load_model(pruned)[0]), _masks_of(tuned_model)
    same_mask = pruned_masks.keys() == tuned_masks.keys() and all(
        torch.equal(tuned_masks[name], pruned_masks[name]) for name in tuned_masks)
    report = sp.sparsity_report(tuned_model)
    (out / "report.md").write_text(report.to_markdown() + "\n", encoding="utf-8")
    print(f"\ndemo: {args.pruner} {args.sparsity:.0%}, then {args.method} for {args.steps} steps, merged")
    print(f"  perplexity ({args.windows} x {args.seq_len} held-out tokens): dense {ppl['dense']:.1f} -> "
          f"pruned {ppl['pruned']:.1f} -> fine-tuned and merged {ppl['tuned']:.1f}")
    print(f"  global sparsity after merge {report.global_sparsity:.2%} over {len(report.layers)} layers; "
          f"every layer's mask unchanged: {same_mask}")
    print(f"  {time.time() - start:.0f} s; per-layer table in {out / 'report.md'}, models in {out}")
    if args.method != "seft" and not same_mask:  # SEFT moves its mask (each layer keeps its count of zeros)
        raise RuntimeError("the merge changed a mask: this is a bug, please report it")


# --- the parser ------------------------------------------------------------------------------------

MODEL_HELP = "hub id, local dir, .gguf, or sparse checkpoint dir (default: the SmolLM2-135M GGUF)"


def _prune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--method", default="wanda", choices=PRUNE_METHODS)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--sparsity", type=_target("sparsity"), help="unstructured, in [0, 1) (or 50%%)")
    group.add_argument("--pattern", type=_target("pattern"), help="N:M semi-structured, e.g. 2:4")
    p.add_argument("--allocation", default="uniform", choices=("uniform", "owl"))
    p.add_argument("--data", help="calibration text file (needed by wanda, sparsegpt, owl)")
    p.add_argument("--calib-samples", type=_positive_int, default=128)
    p.add_argument("--calib-seq-len", type=_positive_int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit-4bit", choices=("nf4", "fp4"), default=None,
                   help="then round the kept weights onto this bitsandbytes 4-bit grid on the calibration data "
                        "(sp.fit_to_4bit), for loading with BitsAndBytesConfig(load_in_4bit=True); needs --data")
    p.add_argument("--format", default="sparse", choices=("sparse", "dense"),
                   help="sparse: compressed checkpoint (save_sparse); dense: plain transformers checkpoint")


def _finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--data", required=True, help="training text file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--method", default="spp", choices=FINETUNE_METHODS + ("spt",),
                   help="spt is refused with the reason (it cannot be merged)")
    p.add_argument("--r", type=_positive_int, default=8, help="rank (masked_lora) / rows of A (spp)")
    p.add_argument("--lora-alpha", type=float, default=None, help="masked_lora scaling numerator (default 2r)")
    p.add_argument("--spp-alpha", type=float, default=1.0, help="spp update scaling")
    p.add_argument("--density", type=_check_fraction("--density"), default=0.02,
                   help="seft: trainable fraction of each layer")
    p.add_argument("--update-interval", type=_positive_int, default=20, help="seft: steps between topology updates")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--target-modules", nargs="+", default=["all-linear"])
    p.add_argument("--steps", type=_positive_int, default=200)
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--grad-accum", type=_positive_int, default=1)
    p.add_argument("--seq-len", type=_positive_int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--scheduler", default="cosine", help="transformers lr_scheduler_type")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--save-steps", type=_positive_int, default=50)
    p.add_argument("--save-total-limit", type=_positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume-from-checkpoint", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="resume: alone, from the last checkpoint in --out/checkpoints; or from this directory")
    p.add_argument("--format", default="sparse", choices=("sparse", "dense"))


def _recover_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--data", help="training and calibration text file (default: the bundled WikiText-2 excerpt)")
    p.add_argument("--out", required=True, help="output directory")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--sparsity", type=_target("sparsity"), help="unstructured, in (0, 1) (or 50%%)")
    group.add_argument("--pattern", type=_target("pattern"), help="N:M semi-structured, e.g. 2:4")
    p.add_argument("--teacher", help="SquareHead teacher model (default: the model before pruning, kept in memory)")
    p.add_argument("--format", default="sparse", choices=("sparse", "dense"))
    p.add_argument("--skip-placeholder", metavar="TEXT", default=None,
                   help="fine-tuning takes no loss on the tokens of TEXT, e.g. '<unk>', which word-level corpora "
                        "(WikiText's .tokens files) put where rare words were; they stay in the context "
                        "(default: the target's, sp.recovery.DEFAULT_SKIP_PLACEHOLDER; '' trains on every token)")
    from .recovery import add_recipe_flags

    add_recipe_flags(p)


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--data", help="text file for perplexity")
    p.add_argument("--seq-len", type=_positive_int, default=512)
    p.add_argument("--windows", type=_positive_int, default=None, help="windows scored (default min(24, available))")
    p.add_argument("--arc", help="ARC-format .jsonl for zero-shot multiple choice (e.g. arc_easy_official_test.jsonl)")
    p.add_argument("--limit", type=_positive_int, default=None, help="score only the first N questions")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--skip-placeholder", metavar="TEXT", default="",
                   help="leave the tokens that overlap TEXT (e.g. '<unk>') out of the perplexity; they stay in "
                        "the context")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="dense", choices=("sparse", "dense"))


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--out", help="also write the markdown here")
    p.add_argument("--png", help="per-layer sparsity bar chart (needs matplotlib)")


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--data", help="a text file: the last 10%% held out, the 10%% before it for calibration, the "
                                  "rest for training, cut at white space (default: the bundled WikiText-2 excerpt)")
    p.add_argument("--out", help="output directory (default: a new temporary one)")
    p.add_argument("--pruner", default="wanda", choices=PRUNE_METHODS)
    p.add_argument("--method", default="spp", choices=FINETUNE_METHODS)
    p.add_argument("--sparsity", type=_target("sparsity"), default=0.5)
    p.add_argument("--steps", type=_positive_int, default=20)
    p.add_argument("--seq-len", type=_positive_int, default=128)
    p.add_argument("--calib-samples", type=_positive_int, default=16, help="calibration windows of --seq-len tokens")
    p.add_argument("--windows", type=_positive_int, default=16, help="held-out windows of --seq-len tokens scored")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-peft", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, help_text, func, description=None):
        p = sub.add_parser(name, help=help_text, description=description or help_text)
        p.set_defaults(func=func)
        return p

    p = add("prune", "one-shot prune a model and save it", cmd_prune)
    _prune_arguments(p)

    p = add("finetune", "fine-tune a pruned model keeping its sparsity (HF Trainer), merge, save", cmd_finetune,
            "Fine-tune with a sparse-peft method through the HF Trainer, merge the adapter (sparsity kept), "
            "save the merged model to --out and the adapter to --out/adapter. Checkpoints go to "
            "--out/checkpoints; --resume-from-checkpoint continues from the last one (or a given one). "
            "Single process only (multi-process / accelerate launch is not wired into the CLI yet). "
            "SPT (--method spt) is refused: its prompts are extra key/value positions that cannot be merged "
            "into the weights, so there is no merged model to save; train it from Python (docs/spt.md).")
    _finetune_arguments(p)

    p = add("recover", "prune, fine-tune, merge and check in one go (sp.recover), with a default recipe per target",
            cmd_recover,
            "Prune the model to --sparsity or --pattern and win back its accuracy: one-shot pruning (with "
            "Sparsity Induction when the recipe has it), optional block-wise reconstruction, fine-tuning with a "
            "sparsity-preserving method on --data, merge, and a check that every layer is exactly at the target. "
            "The recipe is sp.DEFAULT_RECIPES' for the target (provisional: the reconstruction steps and the 2:4 "
            "recipe chosen on a validation split); each flag below overrides one setting. Writes the merged model to "
            "--out (what eval, export and report read) and the recipe and each stage's settings and seconds to "
            "--out/recipe.json (docs/recover.md).")
    _recover_arguments(p)

    p = add("eval", "perplexity on a text file and/or zero-shot accuracy on ARC-format questions", cmd_eval)
    _eval_arguments(p)

    p = add("export", "write a model as a compressed sparse checkpoint or a plain dense one", cmd_export)
    _export_arguments(p)

    p = add("report", "per-layer sparsity as markdown (and a PNG if matplotlib is installed)", cmd_report)
    _report_arguments(p)

    p = add("demo", "eval -> prune -> eval -> finetune -> eval on one model, then a short summary", cmd_demo,
            "The whole flow on one model: perplexity of the dense model, prune it, perplexity, fine-tune with a "
            "sparsity-preserving method, merge, perplexity, and a summary (the per-layer table goes to "
            "OUT/report.md). Without --data it uses the WikiText-2 excerpt that ships with sparse-peft: "
            "calibration, training and held-out text are disjoint articles.")
    _demo_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the usage and the reason
        return EXIT_OK if exit_.code in (0, None) else EXIT_USAGE
    try:
        args.func(args)
    except CliError as err:
        print(f"sparse-peft {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # The library's clear errors on bad input, and a damaged file wherever no caller names it (load_model does).
    except (ValueError, FileNotFoundError, SafetensorError) as err:
        print(f"sparse-peft {args.command}: error: {_first_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"sparse-peft {args.command}: interrupted", file=sys.stderr)
        return 130
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
