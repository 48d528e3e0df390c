"""Accuracy recovery after pruning: prune, fine-tune with one method, merge, measure.

One JSON line per run (``--out``), e.g. the standard budget on the shared SmolLM2-135M:

    python benchmarks/recovery.py --method spp --pruner wanda --sparsity 0.5 --steps 200 \
        --seq-len 128 --batch-size 4 --lr 4e-3 --out runs/recovery.jsonl

``--method lora --sparsity 0`` is the dense fine-tuning reference. For plain LoRA the row holds the
unmerged ppl (``ppl_after_unmerged``), the ppl after peft's own merge (which densifies,
``sparsity_after_plain_merge``) and after merging then re-masking (``ppl_after``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import sparse_peft as sp
from sparse_peft._progress import progress
from sparse_peft.data import load_model_and_tokenizer, load_text, perplexity, random_windows, token_ids
from sparse_peft.recipes import METHODS

from common import assets_dir

# The method options: flag -> (methods it configures, their config field, type, default, help).
METHOD_OPTIONS = {
    "--r": (("lora", "masked_lora"), "r", int, 8, "LoRA / masked LoRA rank (lora_alpha 2r)"),
    "--spp-r": (("spp",), "r", int, 16, None),
    "--spp-alpha": (("spp",), "alpha", float, 1.0, None),
    "--seft-density": (("seft",), "density", float, 0.02, "SEFT trainable fraction per layer"),
    "--seft-interval": (("seft",), "update_interval", int, 20, "SEFT steps between topology updates"),
    "--seft-drop-fraction": (("seft",), "drop_fraction", float, 0.3, None),
    "--seft-grow-window": (("seft",), "grow_window", int, 2, None),
    "--spt-prompt-length": (("spt",), "base_prompt_length", int, 8, "SPT base prompt length p_base"),
    "--spt-initial-sparsity": (("spt",), "initial_sparsity", float, 0.0, "SPT schedule s_0"),
    "--spt-prune-end": (("spt",), "prune_end_step", int, None, "SPT step reaching --sparsity (default steps/2)"),
    "--spt-prune-steps": (("spt",), "num_prune_steps", int, 10, "SPT pruning events after the start"),
}
DENSE_TEACHER = "dense (untuned)"  # the teacher a SquareHead row names when --teacher is not given
ARC_BEFORE = ("arc_easy_acc_before", "arc_easy_acc_norm_before", "arc_easy_questions")


def build_parser() -> argparse.ArgumentParser:
    assets = assets_dir()
    p = argparse.ArgumentParser(prog="recovery.py", description=__doc__,  # also parses the sweep's jobs
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="hub id, local dir or .gguf (default: SmolLM2-135M GGUF)")
    p.add_argument("--data", default=str(assets / "data" / "wikitext-2") if assets else None,
                   help="dir with wiki.test.raw and wiki.valid.tokens")
    p.add_argument("--method", default="spp", choices=[*METHODS, "none"])
    p.add_argument("--pruner", default="wanda", choices=["wanda", "sparsegpt", "magnitude"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default=None, help="N:M instead of --sparsity, e.g. 2:4")
    for flag, default in (("--steps", 200), ("--seq-len", 128), ("--batch-size", 4)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--lr", type=float, default=1e-3)
    for flag, (_, _, kind, default, help_text) in METHOD_OPTIONS.items():
        p.add_argument(flag, type=kind, default=default, help=help_text)
    p.add_argument("--spt-calib-samples", type=int, default=0,
                   help="SPT Wanda: calibration windows per pruning event (0: running norms of training batches)")
    p.add_argument("--induce", action="store_true",
                   help="Sparsity Induction (sp.induce_sparsity) with the calibration batches before pruning")
    p.add_argument("--induce-alpha", type=float, default=1.0, help="induce_sparsity alpha")
    for flag, default in (("--calib-samples", 128), ("--calib-seq-len", 512), ("--eval-windows", 24),
                          ("--eval-seq-len", 512), ("--seed", 0)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--arc-easy", type=int, default=0,
                   help="zero-shot ARC-Easy (test) before and after on this many questions (0: skip, -1: all)")
    p.add_argument("--arc-dir", default=None, help="folder with arc_easy_official_test.jsonl (default: DATA/../arc)")
    p.add_argument("--loss", default="ce", choices=["ce", "squarehead"],
                   help="squarehead: CE + lambda x SquareHead distillation from the dense teacher")
    p.add_argument("--squarehead-lambda", type=float, default=1.0)
    p.add_argument("--logit-lambda", type=float, default=0.0,
                   help="with --loss squarehead: add this weight x KL(teacher || student) of the next-token "
                        "distributions (sp.logit_distillation_loss); 0 = off")
    p.add_argument("--save-merged", default=None,
                   help="save the merged model (+ tokenizer) here, e.g. the dense reference as a SquareHead teacher")
    p.add_argument("--teacher", default=None,
                   help="teacher model (default: the dense model before pruning, kept frozen in memory)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="append one JSON line here")
    p.add_argument("--cache-dir", default="runs/cache", help="reuse pruned weights across runs ('' to disable)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, checked; ``args.target`` is the one-shot target as ``sp.prune`` takes it."""
    p = build_parser()
    args = p.parse_args(argv)
    try:
        args.target = sp.parse_target(args.pattern or args.sparsity)
    except ValueError as e:
        p.error(f"--{'pattern' if args.pattern else 'sparsity'}: {e}")
    if args.pattern and "pattern" not in args.target:
        p.error(f"--pattern takes N:M (e.g. 2:4), got {args.pattern!r}")
    prunes = bool(args.pattern or args.sparsity > 0)
    if args.data is None:
        p.error("--data is required when no development assets are found ($SPARSE_PEFT_ASSETS or shared/ beside "
                "the checkout)")
    if args.logit_lambda < 0 or (args.logit_lambda and args.loss != "squarehead"):
        p.error(f"--logit-lambda {args.logit_lambda}: needs --loss squarehead (the teacher) and a value >= 0")
    if args.induce and (args.method == "spt" or not prunes):
        p.error("--induce runs before one-shot pruning: it needs --sparsity > 0 or --pattern, and not --method spt")
    if args.method == "spt" and (args.pruner == "sparsegpt" or not prunes):
        p.error("--method spt prunes gradually to --sparsity > 0 or --pattern with --pruner wanda or magnitude")
    return args


@dataclass
class Data:
    """What the measurements of one run read: the settings, the tokenizer and the two token streams."""

    args: argparse.Namespace
    tokenizer: object
    test_ids: torch.Tensor
    train_ids: torch.Tensor

    def ppl(self, model) -> float:
        return perplexity(model, self.test_ids, n_windows=self.args.eval_windows, seq_len=self.args.eval_seq_len)

    def arc_easy(self, model, when: str) -> dict:
        """Zero-shot ARC-Easy accuracy (acc and the length-normalised acc_norm) as row fields ``*_{when}``."""
        if self.args.arc_easy == 0:
            return {}
        from sparse_peft.evaluation import ARC_FILES, arc_zero_shot

        arc_dir = Path(self.args.arc_dir) if self.args.arc_dir else Path(self.args.data).parent / "arc"
        result = arc_zero_shot(model, self.tokenizer, arc_dir / ARC_FILES["arc_easy"],
                               limit=None if self.args.arc_easy < 0 else self.args.arc_easy)
        return {f"arc_easy_acc_{when}": result["acc"], f"arc_easy_acc_norm_{when}": result["acc_norm"],
                "arc_easy_questions": result["questions"]}


def load(args):
    """The model and the ``Data`` of a run: wiki.test.raw to measure, wiki.valid.tokens to calibrate and train."""
    model, tokenizer = load_model_and_tokenizer(args.model)
    test_ids, train_ids = (token_ids(tokenizer, load_text(Path(args.data) / name))
                           for name in ("wiki.test.raw", "wiki.valid.tokens"))
    return model, Data(args, tokenizer, test_ids, train_ids)


# --- the cache: pruned weights and the measurements before fine-tuning, shared by the rows of a sweep ----

def prune_cache_key(args) -> str:
    """What determines the one-shot pruned weights: model, pruner, target, calibration, seed, induction."""
    key = "-".join(str(v) for v in (Path(args.model or "smollm2").name, args.pruner, args.pattern or args.sparsity,
                                     args.calib_samples, args.calib_seq_len, args.seed)).replace(":", "_")
    return key + (f"-induce{args.induce_alpha:g}" if args.induce else "")  # induction also rescales norms, biases


def before_cache_path(args) -> Path | None:
    """JSON file for the measurements taken before fine-tuning (dense ppl, one-shot ppl, ARC before).

    They depend only on the pruned weights and the evaluation settings, never on the method, so the
    rows of one sweep at one target share them (an ARC-Easy pass over 500 questions takes minutes).
    """
    if not args.cache_dir:
        return None
    pruned = (prune_cache_key(args) if args.pattern or args.sparsity > 0
              else f"{Path(args.model or 'smollm2').name}-dense")
    arc_dir = Path(args.arc_dir).name if args.arc_dir else "arc"
    return Path(args.cache_dir) / (f"before-{pruned}-ppl{args.eval_windows}x{args.eval_seq_len}"
                                   f"-arc{args.arc_easy}{'' if arc_dir == 'arc' else '-' + arc_dir}.json")


def write_whole(path: Path, write) -> None:
    """``write(partial_path)`` then rename: two concurrent runs with one key never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    write(partial)
    partial.replace(path)


def prune_cached(model, train_ids, args) -> None:
    """Prune, or load the pruned linear weights of an identical earlier run from ``--cache-dir``.

    Calibrated pruning of the 135M model takes minutes on 2 CPU threads; every method at one
    sparsity starts from the same pruned weights, so they are computed once (safetensors).
    """
    from safetensors.torch import load_file, save_file

    def pruned_params() -> dict:  # induction also rescales norm weights and v/up biases: cache those too
        induced = [(n, p) for n, p in model.named_parameters() if n.endswith(("norm.weight", ".bias"))]
        return {**{name: lin.weight for name, lin in sp.sparsity.named_linears(model)},
                **(dict(induced) if args.induce else {})}

    path = Path(args.cache_dir) / f"pruned-{prune_cache_key(args)}.safetensors" if args.cache_dir else None
    if path is not None and path.exists():
        weights = load_file(path)
        for name, param in pruned_params().items():
            param.data.copy_(weights[name])
        return
    calibration = random_windows(train_ids, n=args.calib_samples, seq_len=args.calib_seq_len, seed=args.seed)
    sp.prune(model, method=args.pruner, **args.target, calibration=calibration,
             induce={"alpha": args.induce_alpha} if args.induce else False)
    if path is not None:
        tensors = {name: param.detach().contiguous() for name, param in pruned_params().items()}
        write_whole(path, lambda partial: save_file(tensors, str(partial)))


# --- the steps of a run -----------------------------------------------------------------------------------

def squarehead_loss(model, args):
    """``(loss_fn, row fields)``: CE + λ x SquareHead (+ the logit KL term) from the teacher; (None, {}) for CE."""
    if args.loss != "squarehead":
        return None, {}
    from sparse_peft.training.squarehead import SquareHeadLoss, distillation_loss, teacher_outputs

    teacher = load_model_and_tokenizer(args.teacher)[0] if args.teacher else copy.deepcopy(model)
    teacher.eval().requires_grad_(False)
    squarehead = SquareHeadLoss()

    def loss_fn(student, batch):
        outputs = student(input_ids=batch, labels=batch, output_hidden_states=True)
        teacher_out = teacher_outputs(teacher, {"input_ids": batch})
        return distillation_loss(outputs, teacher_out.hidden_states, teacher_out.logits,
                                 squarehead_lambda=args.squarehead_lambda, logit_lambda=args.logit_lambda,
                                 squarehead_loss=squarehead)[0]

    fields = dict(squarehead_lambda=args.squarehead_lambda, teacher=args.teacher or DENSE_TEACHER)
    return loss_fn, {**fields, **({"logit_lambda": args.logit_lambda} if args.logit_lambda else {})}


def prune_and_measure(model, data: Data, before: dict, row: dict):
    """One-shot prune and measure the pruned model (ppl, ARC before), each from the cache when it has it.

    SPT prunes while it tunes: its model goes back to the dense weights after, and the one-shot masks
    are returned to compare with (None for the other methods)."""
    args = data.args
    dense = ({name: lin.weight.detach().clone() for name, lin in sp.sparsity.named_linears(model)}
             if args.method == "spt" else None)
    row["ppl_pruned"] = row["ppl_dense"]
    if args.pattern or args.sparsity > 0:
        prune_cached(model, data.train_ids, args)
        row["ppl_pruned"] = before["ppl_pruned"] if "ppl_pruned" in before else data.ppl(model)
    cached_arc = all(k in before for k in ARC_BEFORE)
    row.update({k: before[k] for k in ARC_BEFORE} if cached_arc else data.arc_easy(model, "before"))
    row["before_from_cache"] = bool(before)
    path = before_cache_path(args)
    if path is not None:
        measured = {k: row[k] for k in ("ppl_dense", "ppl_pruned", *ARC_BEFORE) if k in row}
        write_whole(path, lambda partial: partial.write_text(json.dumps(measured, indent=1)))
    if dense is None:
        return None
    oneshot_masks = masks_of(model)
    with torch.no_grad():
        for name, lin in sp.sparsity.named_linears(model):
            lin.weight.copy_(dense[name])
    return oneshot_masks


def make_peft_config(args):
    """The method's config from its ``METHOD_OPTIONS`` flags, through ``sp.method_config``."""
    options = {field: getattr(args, flag[2:].replace("-", "_"))
               for flag, (methods, field, *_) in METHOD_OPTIONS.items() if args.method in methods}
    if args.method == "spt":
        # Gradual pruning from the model's state at creation (dense here) to the target over the first
        # part of training, with the same pruner as the one-shot rows (wanda or magnitude).
        options.update(target_sparsity=args.target.get("sparsity"), target_pattern=args.target.get("pattern"),
                       pruner=args.pruner, prune_end_step=args.spt_prune_end or max(1, args.steps // 2))
    return sp.method_config(args.method, **options)


def step_hook(peft_model, data: Data, row: dict):
    """What runs after each optimizer step: SEFT's topology updates (their totals go to ``row``), SPT's
    gradual pruning; None for the other methods."""
    args = data.args
    if args.method == "seft":
        from sparse_peft.training.seft import seft_summary

        row.update(seft_dropped=0, seft_grown=0, seft_regrown=0, seft_pruned=0)

        def after_step(step, optimizer):
            for key, value in seft_summary(sp.seft_step(peft_model, optimizer, step, total_steps=args.steps)).items():
                row[f"seft_{key}"] += value

        sp.seft_step(peft_model, None, 0, total_steps=args.steps)  # arm the first gradient window
        return after_step
    if args.method == "spt":
        calibration = (random_windows(data.train_ids, n=args.spt_calib_samples, seq_len=args.calib_seq_len,
                                      seed=args.seed) if args.spt_calib_samples else None)

        def after_step(step, optimizer):
            sp.gradual_prune_step(peft_model, step, calibration=calibration)

        after_step(0, None)  # the schedule's start (prunes only if --spt-initial-sparsity > 0)
        return after_step
    return None


def train(peft_model, batches, lr: float, show_progress: bool = True, after_step=None, loss_fn=None) -> list[float]:
    """AdamW + cosine over ``batches``; ``after_step(step, optimizer)`` runs after each optimizer step
    (SEFT's topology updates, SPT's pruning); ``loss_fn(model, batch)`` replaces plain CE (SquareHead).
    Returns the step times."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=len(batches))
    step_times = []
    peft_model.train()
    bar = progress(batches, "training", show_progress)
    for batch in bar:
        t0 = time.perf_counter()
        loss = loss_fn(peft_model, batch) if loss_fn else peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(len(step_times) + 1, optimizer)
        step_times.append(time.perf_counter() - t0)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    peft_model.eval()
    return step_times


def tune(model, data: Data, loss_fn, row: dict):
    """``(merged model, step times, trainable parameters)``: the method's adapter trained and merged."""
    from peft import get_peft_model

    args = data.args
    peft_model = get_peft_model(model, make_peft_config(args))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    batches = random_windows(data.train_ids, n=args.steps, seq_len=args.seq_len, seed=args.seed + 1,
                             batch_size=args.batch_size)
    step_times = train(peft_model, batches, args.lr, after_step=step_hook(peft_model, data, row), loss_fn=loss_fn)
    if args.method == "lora":  # unmerged, peft's own merge (densifies), merged then re-masked
        row["ppl_after_unmerged"] = data.ppl(peft_model)
        plain = copy.deepcopy(peft_model).merge_and_unload()
        row["sparsity_after_plain_merge"] = sp.sparsity_report(plain).global_sparsity
        del plain
        merged, cut = sp.merge_and_unload_sparse(peft_model)
        row["update_removed_by_mask"] = cut.mean_removed_fraction
    elif args.method == "spt":  # prompts never merge: evaluate with them, then report on the sparse base
        row["ppl_after"] = data.ppl(peft_model)
        row.update(data.arc_easy(peft_model, "after"))
        merged = peft_model.unload()
        row["ppl_after_without_prompts"] = data.ppl(merged)
    else:
        merged = peft_model.merge_and_unload()
    return merged, step_times, trainable


def masks_of(model) -> dict[str, torch.Tensor]:
    return {name: lin.weight != 0 for name, lin in sp.sparsity.named_linears(model)}


def mask_fields(merged, masks: dict, oneshot_masks, args) -> dict:
    """Whether the merged model kept the pruned model's mask, or what the method did to it."""
    linears = dict(sp.sparsity.named_linears(merged))
    out = {"mask_identical": all(torch.equal(lin.weight != 0, masks[name]) for name, lin in linears.items())}
    if args.pattern:  # N:M is a pattern, not only a count: check every group (SEFT and SPT set the mask)
        n, m = sp.parse_pattern(args.pattern)
        out["pattern_kept"] = all(sp.sparsity.is_nm_sparse(lin.weight, n, m) for lin in linears.values())
    if args.method == "spt":  # SPT sets the mask while it tunes: check every layer's count, compare with one-shot
        # At N:M the target is the pattern itself (at most N nonzeros in every group of M): a group
        # may hold more zeros than M - N where the checkpoint has exact zeros, so no exact count.
        out["mask_identical"] = None
        out["layers_at_target"] = out["pattern_kept"] if args.pattern else all(
            int((lin.weight == 0).sum()) == round(args.sparsity * lin.weight.numel()) for lin in linears.values())
        out["zeros_shared_with_oneshot"] = (sum(int((~oneshot_masks[name] & (lin.weight == 0)).sum())
                                                for name, lin in linears.items())
                                            / max(1, sum(int((~mask).sum()) for mask in oneshot_masks.values())))
    if args.method == "seft":  # SEFT moves the mask on purpose; what it keeps is each layer's count
        out["counts_identical"] = all(int((lin.weight != 0).sum()) == int(masks[name].sum())
                                      for name, lin in linears.items())
        out["positions_moved"] = sum(int((masks[name] & (lin.weight == 0)).sum()) for name, lin in linears.items())
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    model, data = load(args)
    row = dict(method=args.method, pruner=args.pruner, sparsity=args.sparsity, pattern=args.pattern,
               steps=args.steps, tokens_seen=args.steps * args.batch_size * args.seq_len, lr=args.lr,
               seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    before_path = before_cache_path(args)
    before = json.loads(before_path.read_text()) if before_path is not None and before_path.exists() else {}
    row.update(ppl_dense=before["ppl_dense"] if "ppl_dense" in before else data.ppl(model), loss=args.loss)
    loss_fn, loss_fields = squarehead_loss(model, args)
    row.update(loss_fields, induce=args.induce_alpha if args.induce else None)
    oneshot_masks = prune_and_measure(model, data, before, row)
    row["sparsity_before"] = sp.sparsity_report(model).global_sparsity
    masks = masks_of(model)
    merged, step_times, trainable = (model, [], 0) if args.method == "none" else tune(model, data, loss_fn, row)
    if "ppl_after" not in row:
        row["ppl_after"] = data.ppl(merged)
        row.update(data.arc_easy(merged, "after"))
    row["sparsity_after_merge"] = sp.sparsity_report(merged).global_sparsity
    if args.save_merged:  # safetensors; loadable with --teacher / --model
        merged.save_pretrained(args.save_merged)
        data.tokenizer.save_pretrained(args.save_merged)
    row.update(mask_fields(merged, masks, oneshot_masks, args), trainable_params=trainable,
               step_time_s=statistics.median(step_times) if step_times else 0.0,
               peak_mem_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
               threads=torch.get_num_threads(), wall_s=time.time() - t_start)
    row = {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
    print(json.dumps(row))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
