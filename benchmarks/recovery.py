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
import json
import math
import resource
import statistics
import time
from pathlib import Path

import torch

import sparse_peft as sp
from sparse_peft._progress import progress
from sparse_peft.data import (
    load_model_and_tokenizer,
    load_text,
    perplexity,
    random_windows,
    token_ids,
)

from common import assets_dir


def default_data_dir() -> str | None:
    assets = assets_dir()
    return str(assets / "data" / "wikitext-2") if assets else None


def make_peft_config(method: str, args):
    from peft import LoraConfig

    if method == "lora":
        return LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", lora_dropout=0.0)
    if method == "masked_lora":
        return sp.MaskedLoraConfig(r=args.r, lora_alpha=2 * args.r)
    if method == "spp":
        return sp.SPPConfig(r=args.spp_r, alpha=args.spp_alpha)
    if method == "spt":
        # Gradual pruning from the model's state at creation (dense here) to --sparsity over the first
        # part of training, with the same pruner as the one-shot rows (wanda or magnitude).
        return sp.SPTConfig(base_prompt_length=args.spt_prompt_length,
                            target_sparsity=None if args.pattern else args.sparsity, target_pattern=args.pattern,
                            initial_sparsity=args.spt_initial_sparsity, pruner=args.pruner,
                            prune_end_step=args.spt_prune_end or max(1, args.steps // 2),
                            num_prune_steps=args.spt_prune_steps)
    if method == "seft":
        return sp.SEFTConfig(density=args.seft_density, update_interval=args.seft_interval,
                             drop_fraction=args.seft_drop_fraction, grow_window=args.seft_grow_window)
    raise ValueError(f"unknown --method {method!r}")


def prune_cache_key(args) -> str:
    """What determines the one-shot pruned weights: model, pruner, target, calibration, seed, induction."""
    key = "-".join(str(v) for v in (Path(args.model or "smollm2").name, args.pruner, args.pattern or args.sparsity,
                                     args.calib_samples, args.calib_seq_len, args.seed)).replace(":", "_")
    if args.induce:  # induction also rescales norm weights and v/up biases: cache those too
        key += f"-induce{args.induce_alpha:g}"
    return key


def before_cache_path(args) -> Path | None:
    """JSON file for the measurements taken before fine-tuning (dense ppl, one-shot ppl, ARC before).

    They depend only on the pruned weights and the evaluation settings, never on the method, so the
    rows of one sweep at one target share them (an ARC-Easy pass over 500 questions takes minutes).
    """
    if not args.cache_dir:
        return None
    pruned = prune_cache_key(args) if (args.pattern or args.sparsity > 0) else f"{Path(args.model or 'smollm2').name}-dense"
    arc_dir = Path(args.arc_dir).name if args.arc_dir else "arc"
    return Path(args.cache_dir) / (f"before-{pruned}-ppl{args.eval_windows}x{args.eval_seq_len}"
                                   f"-arc{args.arc_easy}{'' if arc_dir == 'arc' else '-' + arc_dir}.json")


def prune_cached(model, train_ids, args) -> None:
    """Prune, or load the pruned linear weights of an identical earlier run from ``--cache-dir``.

    Calibrated pruning of the 135M model takes minutes on 2 CPU threads; every method at one
    sparsity starts from the same pruned weights, so they are computed once (safetensors).
    """
    from safetensors.torch import load_file, save_file

    path = Path(args.cache_dir) / f"pruned-{prune_cache_key(args)}.safetensors" if args.cache_dir else None
    linears = dict(sp.sparsity.named_linears(model))
    induced_params = ({name: p for name, p in model.named_parameters()
                       if name.endswith("norm.weight") or name.endswith(".bias")} if args.induce else {})
    if path is not None and path.exists():
        weights = load_file(path)
        for name, lin in linears.items():
            lin.weight.data.copy_(weights[name])
        for name, param in induced_params.items():
            param.data.copy_(weights[name])
        return
    calibration = random_windows(train_ids, n=args.calib_samples, seq_len=args.calib_seq_len, seed=args.seed)
    sp.prune(model, method=args.pruner, sparsity=None if args.pattern else args.sparsity,
             pattern=args.pattern, calibration=calibration,
             induce={"alpha": args.induce_alpha} if args.induce else False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: lin.weight.detach().contiguous() for name, lin in linears.items()}
        tensors.update({name: p.detach().contiguous() for name, p in induced_params.items()})
        partial = path.with_suffix(".partial")  # two concurrent runs may prune the same key: never read half a file
        save_file(tensors, str(partial))
        partial.replace(path)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(peft_model, batches, lr: float, show_progress: bool = True, after_step=None, loss_fn=None) -> list[float]:
    """AdamW + cosine over ``batches``; ``after_step(step, optimizer)`` runs after each optimizer step
    (SEFT's topology updates, SPT's pruning); ``loss_fn(model, batch)`` replaces plain CE (SquareHead).
    Returns the step times."""
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
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


def masks_of(model) -> dict[str, torch.Tensor]:
    return {name: lin.weight != 0 for name, lin in sp.sparsity.named_linears(model)}


def same_masks(model, masks) -> bool:
    return all(torch.equal(lin.weight != 0, masks[name]) for name, lin in sp.sparsity.named_linears(model))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="hub id, local dir or .gguf (default: SmolLM2-135M GGUF)")
    p.add_argument("--data", default=default_data_dir(), help="dir with wiki.test.raw and wiki.valid.tokens")
    p.add_argument("--method", default="spp", choices=["spp", "masked_lora", "lora", "seft", "spt", "none"])
    p.add_argument("--pruner", default="wanda", choices=["wanda", "sparsegpt", "magnitude"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default=None, help="N:M instead of --sparsity, e.g. 2:4")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--r", type=int, default=8, help="LoRA / masked LoRA rank")
    p.add_argument("--spp-r", type=int, default=16)
    p.add_argument("--spp-alpha", type=float, default=1.0)
    p.add_argument("--seft-density", type=float, default=0.02, help="SEFT trainable fraction per layer")
    p.add_argument("--seft-interval", type=int, default=20, help="SEFT steps between topology updates")
    p.add_argument("--seft-drop-fraction", type=float, default=0.3)
    p.add_argument("--seft-grow-window", type=int, default=2)
    p.add_argument("--spt-prompt-length", type=int, default=8, help="SPT base prompt length p_base")
    p.add_argument("--spt-initial-sparsity", type=float, default=0.0, help="SPT schedule s_0")
    p.add_argument("--spt-prune-end", type=int, default=None, help="SPT step reaching --sparsity (default steps/2)")
    p.add_argument("--spt-prune-steps", type=int, default=10, help="SPT pruning events after the start")
    p.add_argument("--spt-calib-samples", type=int, default=0,
                   help="SPT Wanda: calibration windows per pruning event (0: running norms of training batches)")
    p.add_argument("--induce", action="store_true",
                   help="Sparsity Induction (sp.induce_sparsity) with the calibration batches before pruning")
    p.add_argument("--induce-alpha", type=float, default=1.0, help="induce_sparsity alpha")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
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
    args = p.parse_args(argv)
    if args.data is None:
        p.error("--data is required when no development assets are found ($SPARSE_PEFT_ASSETS or shared/ beside the checkout)")
    if args.logit_lambda < 0 or (args.logit_lambda and args.loss != "squarehead"):
        p.error(f"--logit-lambda {args.logit_lambda}: needs --loss squarehead (the teacher) and a value >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()

    model, tokenizer = load_model_and_tokenizer(args.model)
    data = Path(args.data)
    test_ids = token_ids(tokenizer, load_text(data / "wiki.test.raw"))
    train_ids = token_ids(tokenizer, load_text(data / "wiki.valid.tokens"))

    def ppl(m):
        return perplexity(m, test_ids, n_windows=args.eval_windows, seq_len=args.eval_seq_len)

    row = dict(method=args.method, pruner=args.pruner, sparsity=args.sparsity, pattern=args.pattern,
               steps=args.steps, tokens_seen=args.steps * args.batch_size * args.seq_len, lr=args.lr,
               seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    before_path = before_cache_path(args)
    before = json.loads(before_path.read_text()) if before_path is not None and before_path.exists() else {}
    row["ppl_dense"] = before["ppl_dense"] if "ppl_dense" in before else ppl(model)
    row["loss"] = args.loss
    loss_fn = None
    if args.loss == "squarehead":
        import copy

        from sparse_peft.training.squarehead import SquareHeadLoss, distillation_loss, teacher_outputs

        teacher = load_model_and_tokenizer(args.teacher)[0] if args.teacher else copy.deepcopy(model)
        teacher.eval().requires_grad_(False)
        squarehead = SquareHeadLoss()
        row["squarehead_lambda"], row["teacher"] = args.squarehead_lambda, args.teacher or "dense (untuned)"
        if args.logit_lambda:
            row["logit_lambda"] = args.logit_lambda

        def loss_fn(student, batch):
            outputs = student(input_ids=batch, labels=batch, output_hidden_states=True)
            teacher_out = teacher_outputs(teacher, {"input_ids": batch})
            return distillation_loss(outputs, teacher_out.hidden_states, teacher_out.logits,
                                     squarehead_lambda=args.squarehead_lambda, logit_lambda=args.logit_lambda,
                                     squarehead_loss=squarehead)[0]
    if args.induce and (args.method == "spt" or not (args.pattern or args.sparsity > 0)):
        p.error("--induce runs before one-shot pruning: it needs --sparsity > 0 or --pattern, and not --method spt")
    row["induce"] = args.induce_alpha if args.induce else None
    if args.method == "spt" and (args.pruner == "sparsegpt" or not (args.pattern or args.sparsity > 0)):
        p.error("--method spt prunes gradually to --sparsity > 0 or --pattern with --pruner wanda or magnitude")
    if args.method == "spt":  # one-shot ppl_pruned for comparison, then SPT starts again from the dense weights
        dense_weights = {name: lin.weight.detach().clone() for name, lin in sp.sparsity.named_linears(model)}
    def arc_easy(m, when):
        """Zero-shot ARC-Easy accuracy (acc and the length-normalised acc_norm) into row[arc_easy_*_{when}]."""
        if args.arc_easy == 0:
            return
        from sparse_peft.evaluation import ARC_FILES, arc_zero_shot

        arc_dir = Path(args.arc_dir) if args.arc_dir else data.parent / "arc"
        result = arc_zero_shot(m, tokenizer, arc_dir / ARC_FILES["arc_easy"],
                               limit=None if args.arc_easy < 0 else args.arc_easy)
        row[f"arc_easy_acc_{when}"], row[f"arc_easy_acc_norm_{when}"], row["arc_easy_questions"] = (
            result["acc"], result["acc_norm"], result["questions"])

    if args.pattern or args.sparsity > 0:
        prune_cached(model, train_ids, args)
        row["ppl_pruned"] = before["ppl_pruned"] if "ppl_pruned" in before else ppl(model)
    else:
        row["ppl_pruned"] = row["ppl_dense"]
    arc_keys = ("arc_easy_acc_before", "arc_easy_acc_norm_before", "arc_easy_questions")
    if all(k in before for k in arc_keys):
        row.update({k: before[k] for k in arc_keys})
    else:
        arc_easy(model, "before")  # the one-shot pruned model (dense for the dense reference)
    row["before_from_cache"] = bool(before)
    if before_path is not None:
        measured = {k: row[k] for k in ("ppl_dense", "ppl_pruned", *arc_keys) if k in row}
        before_path.parent.mkdir(parents=True, exist_ok=True)  # a dense-only run never made the prune cache
        partial = before_path.with_suffix(".partial")
        partial.write_text(json.dumps(measured, indent=1))
        partial.replace(before_path)
    if args.method == "spt":
        oneshot_masks = masks_of(model)
        with torch.no_grad():
            for name, lin in sp.sparsity.named_linears(model):
                lin.weight.copy_(dense_weights[name])
        del dense_weights
    row["sparsity_before"] = sp.sparsity_report(model).global_sparsity
    masks = masks_of(model)

    if args.method == "none":
        merged, step_times, trainable = model, [], 0
    else:
        from peft import get_peft_model

        peft_model = get_peft_model(model, make_peft_config(args.method, args))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        batches = random_windows(train_ids, n=args.steps, seq_len=args.seq_len, seed=args.seed + 1,
                                 batch_size=args.batch_size)
        after_step = None
        if args.method == "seft":
            seft_totals = dict(dropped=0, grown=0, regrown=0, pruned=0)

            def after_step(step, optimizer):
                from sparse_peft.training.seft import seft_summary

                for key, value in seft_summary(sp.seft_step(peft_model, optimizer, step, total_steps=args.steps)).items():
                    seft_totals[key] += value

            sp.seft_step(peft_model, None, 0, total_steps=args.steps)  # arm the first gradient window
        if args.method == "spt":
            spt_calibration = (random_windows(train_ids, n=args.spt_calib_samples, seq_len=args.calib_seq_len,
                                              seed=args.seed) if args.spt_calib_samples else None)

            def after_step(step, optimizer):
                sp.gradual_prune_step(peft_model, step, calibration=spt_calibration)

            after_step(0, None)  # the schedule's start (prunes only if --spt-initial-sparsity > 0)
        step_times = train(peft_model, batches, args.lr, after_step=after_step, loss_fn=loss_fn)
        if args.method == "seft":
            row.update({f"seft_{key}": value for key, value in seft_totals.items()})
        if args.method == "lora":
            row["ppl_after_unmerged"] = ppl(peft_model)
            import copy

            plain = copy.deepcopy(peft_model).merge_and_unload()
            row["sparsity_after_plain_merge"] = sp.sparsity_report(plain).global_sparsity
            del plain
            merged, cut = sp.merge_and_unload_sparse(peft_model)
            row["update_removed_by_mask"] = cut.mean_removed_fraction
        elif args.method == "spt":  # prompts never merge: evaluate with them, then report on the sparse base
            row["ppl_after"] = ppl(peft_model)
            arc_easy(peft_model, "after")
            merged = peft_model.unload()
            row["ppl_after_without_prompts"] = ppl(merged)
        else:
            merged = peft_model.merge_and_unload()
    if "ppl_after" not in row:
        row["ppl_after"] = ppl(merged)
        arc_easy(merged, "after")
    row["sparsity_after_merge"] = sp.sparsity_report(merged).global_sparsity
    if args.save_merged:  # safetensors; loadable with --teacher / --model
        merged.save_pretrained(args.save_merged)
        tokenizer.save_pretrained(args.save_merged)
    row["mask_identical"] = same_masks(merged, masks)
    if args.pattern:  # N:M is a pattern, not only a count: check every group (SEFT and SPT set the mask)
        n, m = sp.parse_pattern(args.pattern)
        row["pattern_kept"] = all(sp.sparsity.is_nm_sparse(lin.weight, n, m)
                                  for _, lin in sp.sparsity.named_linears(merged))
    if args.method == "spt":  # SPT sets the mask while it tunes: check every layer's count, compare with one-shot
        row["mask_identical"] = None
        # At N:M the target is the pattern itself (at most N nonzeros in every group of M): a group
        # may hold more zeros than M - N where the checkpoint has exact zeros, so no exact count.
        row["layers_at_target"] = row["pattern_kept"] if args.pattern else all(
            int((lin.weight == 0).sum()) == round(args.sparsity * lin.weight.numel())
            for _, lin in sp.sparsity.named_linears(merged))
        row["zeros_shared_with_oneshot"] = (sum(int((~oneshot_masks[n] & (lin.weight == 0)).sum())
                                                for n, lin in sp.sparsity.named_linears(merged))
                                            / max(1, sum(int((~m).sum()) for m in oneshot_masks.values())))
    if args.method == "seft":  # SEFT moves the mask on purpose; what it keeps is each layer's count
        row["counts_identical"] = all(int((lin.weight != 0).sum()) == int(masks[name].sum())
                                      for name, lin in sp.sparsity.named_linears(merged))
        row["positions_moved"] = sum(int((masks[name] & (lin.weight == 0)).sum())
                                     for name, lin in sp.sparsity.named_linears(merged))
    row["trainable_params"] = trainable
    row["step_time_s"] = statistics.median(step_times) if step_times else 0.0
    row["peak_mem_mb"] = peak_rss_mb()
    row["threads"] = torch.get_num_threads()
    row["wall_s"] = time.time() - t_start
    row = {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
    print(json.dumps(row))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
