"""Accuracy recovery after pruning through the stages of ``sp.recover`` (prune, fine-tune, merge, measure), one JSON
row per run; ``--method lora --sparsity 0`` is the dense reference (with the unmerged ppl). The standard budget, e.g.:

    python benchmarks/recovery.py --method spp --sparsity 0.5 --lr 4e-3 --out runs/recovery.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import time
from pathlib import Path

import torch

import sparse_peft as sp
import sparse_peft.recovery as rec
from sparse_peft.data import (load_model_and_tokenizer, load_text, perplexity, placeholder_labels, token_ids,
                              train_validation_split)

from common import DEFAULT_DATA_DIR, append_jsonl

PLACEHOLDER = "<unk>"  # where wiki.valid.tokens had rare words; ppl_after_without_placeholder leaves it out
DENSE_TEACHER = "dense (untuned)"  # the teacher a SquareHead row names when --teacher is not given
BEFORE = ("ppl_dense", "ppl_pruned", "arc_easy_acc_before", "arc_easy_acc_norm_before", "arc_easy_questions")
# the recipe flags' defaults (sparse-peft recover's: sp.DEFAULT_RECIPES); other method options: the configs'
RECIPE_DEFAULTS = dict(sp.Recipe().to_dict(), method="spp", induce=False, induce_alpha=1.0, spt_prune_steps=10)
FLAGS = [  # flag, type (or the choices), default, help: the flags besides the recipe's
    ("--model", str, None, "hub id, local dir or .gguf (default: SmolLM2-135M GGUF)"),
    ("--data", str, str(DEFAULT_DATA_DIR), "dir of wiki.test.raw, wiki.valid.tokens"), ("--threads", int, None, None),
    ("--sparsity", float, 0.5, None), ("--eval-windows", int, 24, None), ("--eval-seq-len", int, 512, None),
    ("--pattern", str, None, "N:M instead of --sparsity, e.g. 2:4"), ("--out", str, None, "append one JSON line here"),
    ("--teacher", str, None, "SquareHead teacher model (default: the model before pruning, kept frozen)"),
    ("--eval-split", ("test", "validation"), "test", "what the ppl columns score: wiki.test.raw, or the last 10%% of "
     "wiki.valid.tokens, held out of calibration and training (to choose recipes leaving the test text unseen)"),
    ("--arc-easy", int, 0, "zero-shot ARC-Easy (test) before and after on this many questions (0: skip, -1: all)"),
    ("--arc-dir", str, None, "folder with arc_easy_official_test.jsonl (default: DATA/../arc)"),
    ("--save-merged", str, None, "save the merged model (+ tokenizer) here, e.g. as a SquareHead teacher"),
    ("--cache-dir", str, "runs/cache", "reuse pruned weights and the measurements before tuning ('' to disable)"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recovery.py", description=__doc__,  # also parses the sweep's jobs
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    rec.add_recipe_flags(p, RECIPE_DEFAULTS)
    for flag, kind, default, help_text in FLAGS:
        choices = kind if isinstance(kind, tuple) else None
        p.add_argument(flag, type=None if choices else kind, choices=choices, default=default, help=help_text)
    p.add_argument("--also-test", action="store_true", help="with --eval-split validation: ppl_after_test too")
    p.add_argument("--skip-placeholder", action="store_true", help=f"no training loss on {PLACEHOLDER}'s tokens")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, checked; ``args.target`` is the target as ``sp.prune`` takes it, ``args.recipe`` the ``sp.Recipe``."""
    p = build_parser()
    args = p.parse_args(argv)
    try:
        args.target = {"pattern": "%d:%d" % sp.parse_pattern(args.pattern)} if args.pattern else sp.parse_target(
            args.sparsity)
        args.recipe = rec.recipe_from_flags(args, sp.Recipe())
    except ValueError as e:
        p.error(str(e))
    if (args.induce or args.reconstruct or args.method == "spt") and not (args.pattern or args.sparsity > 0):
        p.error("--induce, --reconstruct and --method spt prune: they need --sparsity > 0 or --pattern")
    if args.also_test and args.eval_split != "validation":
        p.error("--also-test goes with --eval-split validation")
    return args


def cache_path(args, kind: str) -> Path | None:
    """The ``--cache-dir`` file of the pruned weights, or of the measurements before fine-tuning (``"before"``)."""
    model, arc_dir = Path(args.model or "smollm2").name, Path(args.arc_dir).name if args.arc_dir else "arc"
    key = (f"{model}-{args.pruner}-{args.pattern or args.sparsity}-{args.calib_samples}-{args.calib_seq_len}-"
           f"{args.seed}".replace(":", "_") + (f"-induce{args.induce_alpha:g}" if args.induce else "")
           if args.pattern or args.sparsity > 0 else f"{model}-dense")  # induction also rescales norms, biases
    key += ("-owl" if args.allocation == "owl" else "") + ("-val" if args.eval_split == "validation" else "")
    return None if not args.cache_dir or args.tune_dense else Path(args.cache_dir) / (  # tuned: from the windows too
        f"pruned-{key}.safetensors" if kind == "pruned" else f"before-{key}-ppl{args.eval_windows}x{args.eval_seq_len}"
        f"-arc{args.arc_easy}{'' if arc_dir == 'arc' else '-' + arc_dir}.json")


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(args.seed)
    t_start, recipe, spt = time.time(), args.recipe, args.method == "spt"
    model, tokenizer = load_model_and_tokenizer(args.model)
    test_ids = token_ids(tokenizer, load_text(Path(args.data) / "wiki.test.raw"))
    valid_ids, valid_labels, _ = placeholder_labels(tokenizer, load_text(Path(args.data) / "wiki.valid.tokens"),
                                                    PLACEHOLDER)
    validation = args.eval_split == "validation"
    train_ids, eval_ids = train_validation_split(valid_ids, 0.1) if validation else (valid_ids, test_ids)
    train_labels, eval_labels = train_validation_split(valid_labels, 0.1) if validation else (valid_labels, None)

    def ppl(model, ids=eval_ids, labels=None) -> float:
        return perplexity(model, ids, n_windows=args.eval_windows, seq_len=args.eval_seq_len, labels=labels)

    def arc_easy(model, when: str) -> dict:  # zero-shot acc and the length-normalised acc_norm, as *_{when}
        if args.arc_easy == 0:
            return {}
        path = Path(args.arc_dir or Path(args.data).parent / "arc") / "arc_easy_official_test.jsonl"
        result = sp.evaluation.arc_zero_shot(model, tokenizer, path, limit=None if args.arc_easy < 0 else args.arc_easy)
        return {**{f"arc_easy_{k}_{when}": result[k] for k in ("acc", "acc_norm")},
                "arc_easy_questions": result["questions"]}

    def after(model) -> dict:
        return {"ppl_after": ppl(model), **arc_easy(model, "after"),
                **({"ppl_after_without_placeholder": ppl(model, labels=eval_labels)} if validation else {}),
                **({"ppl_after_test": ppl(model, test_ids)} if args.also_test else {})}

    row = {**{k: getattr(args, k) for k in ("method", "pruner", "sparsity", "pattern", "steps")},
           "tokens_seen": args.steps * args.batch_size * args.seq_len,
           **{k: getattr(args, k) for k in ("lr", "seq_len", "batch_size", "seed", "allocation")},
           **({"method_options": recipe.method_options} if recipe.method_options else {}),  # --r, --spp-r, ...
           **({"eval_split": "validation"} if validation else {}),
           **({"skip_placeholder": PLACEHOLDER} if args.skip_placeholder else {})}
    before_path = cache_path(args, "before")  # the measurements before fine-tuning, shared by the methods
    before = json.loads(before_path.read_text()) if before_path is not None and before_path.exists() else {}
    if recipe.tune_dense:  # plain LoRA on the first of the budget's windows, merged before pruning
        model = rec.tune_dense_stage(model, train_ids, recipe, True, train_labels if args.skip_placeholder else None)[0]
    row.update(ppl_dense=before.get("ppl_dense") or ppl(model), loss=args.loss, tune_dense=recipe.tune_dense_options())
    teacher = None
    if args.loss == "squarehead":  # the teacher is the model before pruning unless --teacher names one
        teacher = (load_model_and_tokenizer(args.teacher)[0] if args.teacher else copy.deepcopy(model)).eval()
        row.update(squarehead_lambda=args.squarehead_lambda, teacher=args.teacher or DENSE_TEACHER,
                   **({"logit_lambda": args.logit_lambda} if args.logit_lambda else {}))
    row.update(induce=args.induce_alpha if args.induce else None, ppl_pruned=row["ppl_dense"])
    # SPT prunes while it tunes: one-shot pruned only to compare masks with, then back to the dense weights
    dense = {name: lin.weight.detach().clone() for name, lin in sp.sparsity.named_linears(model)} if spt else {}
    calibration = rec.calibration_windows(train_ids, recipe)
    dense_copy = copy.deepcopy(model) if recipe.reconstruct else None  # the reconstruction's teacher
    if args.pattern or args.sparsity > 0:
        rec.prune_stage(model, args.target, recipe, calibration, cache=cache_path(args, "pruned"))
        row["ppl_pruned"] = before.get("ppl_pruned") or ppl(model)
    row.update({k: before[k] for k in BEFORE[2:] if k in before} if before else arc_easy(model, "before"),
               before_from_cache=bool(before))
    if before_path is not None:  # written whole under this process's name, then renamed: concurrent runs never
        partial = before_path.with_suffix(f".{os.getpid()}.partial")  # read half a file or rename each other's
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({k: row[k] for k in BEFORE if k in row}))
        partial.replace(before_path)
    if recipe.reconstruct:  # after the cache of the one-shot figures: ppl_reconstructed is this row's own
        blocks = rec.reconstruct_stage(model, dense_copy, calibration, recipe).blocks
        row.update(reconstruct=recipe.reconstruct, ppl_reconstructed=ppl(model), reconstruct_error=[
            sum(b.error_before for b in blocks) / len(blocks), sum(b.final_error for b in blocks) / len(blocks)])
        dense_copy = None
    masks, merged, step_times, trainable = rec.masks_of(model), model, [], 0  # SPT: the one-shot masks
    for name, lin in sp.sparsity.named_linears(model) if spt else ():
        lin.weight.data.copy_(dense[name])
    row["sparsity_before"] = sp.sparsity_report(model).global_sparsity
    if recipe.method is not None:
        run = rec.fine_tune(model, train_ids, recipe, args.target, teacher=teacher,
                            train_labels=train_labels if args.skip_placeholder else None)
        row.update({f"seft_{key}": value for key, value in run.seft_totals.items()})
        step_times, trainable = run.step_times, run.trainable_params
        if args.method == "lora":  # unmerged, and peft's own merge (it densifies; rec.merge re-masks)
            row.update(ppl_after_unmerged=ppl(run.peft_model), sparsity_after_plain_merge=sp.sparsity_report(
                copy.deepcopy(run.peft_model).merge_and_unload()).global_sparsity)
        row.update(after(run.peft_model) if spt else {})  # SPT's prompts never merge: measured with them, then not
        merged, cut = (run.peft_model.unload(), None) if spt else rec.merge(run.peft_model, args.method)
        row.update({"ppl_after_without_prompts": ppl(merged)} if spt else {},
                   **({"update_removed_by_mask": cut.mean_removed_fraction} if cut else {}))
    row.update(after(merged) if "ppl_after" not in row else {},
               sparsity_after_merge=sp.sparsity_report(merged).global_sparsity)
    for saved in (merged, tokenizer) if args.save_merged else ():  # safetensors; loadable with --teacher / --model
        saved.save_pretrained(args.save_merged)
    allocated = rec.zero_counts(masks) if args.allocation == "owl" else None  # OWL: each layer's own count
    changes, at_target = rec.mask_changes(masks, merged), not rec.layers_off_target(merged, args.target, allocated)
    row.update(mask_identical=None if spt else changes["mask_identical"],
               **({"pattern_kept": at_target} if args.pattern else {"at_target": at_target} if allocated else {}),
               **({"layers_at_target": at_target, "zeros_shared_with_oneshot": changes["zeros_kept"]} if spt else {}),
               **({k: changes[k] for k in ("counts_identical", "positions_moved")} if args.method == "seft" else {}),
               trainable_params=trainable, step_time_s=statistics.median(step_times) if step_times else 0.0,
               peak_mem_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
               threads=torch.get_num_threads(), wall_s=time.time() - t_start)
    row = {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
    print(json.dumps(row))
    if args.out:
        append_jsonl(args.out, [row])
    return row


if __name__ == "__main__":
    main()
