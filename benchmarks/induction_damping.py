"""Why SparseGPT + Sparsity Induction diverged at 70% on SmolLM2: a layer-by-layer look at the damping.

SparseGPT is equivariant to the per-channel scales of ``sp.induce_sparsity`` in exact arithmetic:
with ``W' = W D`` and ``X' = D⁻¹ X`` its saliency ``w'²/[U']_jj²`` and its OBS updates map one to
one onto the unscaled ones (the Cholesky factor of ``H'⁻¹ = D H⁻¹ D`` is ``U D``). The one term
that is not equivariant is the damping ``λ I`` with ``λ = percdamp · mean(diag H')``: mapped back to
the original coordinates it is a *diagonal* damping ``λ' s_j²``. With ``α = 1`` (``s_j ∝ rms_j``)
that is ``≈ percdamp · H_jj`` per channel: quiet channels lose almost all of the damping the plain
run gives them (1% of the mean, which massive-activation channels dominate).

This script measures, for the linears of a few blocks of the dense model (inputs collected on the
calibration windows of wiki.valid and on windows of wiki.test), the relative output error of SparseGPT's pruned
weight on calibration and held-out tokens, with and without the scales, and the largest weight
magnitude it leaves. It prints one markdown table.

    python benchmarks/induction_damping.py --sparsity 0.7 --blocks 0,15,29 --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA_DIR, calibration_batches_from_text, load_model_and_tokenizer, load_text  # noqa: E402

from sparse_peft.sparsity.induction import _scales_from_rms  # noqa: E402
from sparse_peft.sparsity.sparsegpt import HessianStat, sparsegpt_prune  # noqa: E402


def collect_hessians(model, linears: dict[str, torch.nn.Linear], batches) -> dict[str, HessianStat]:
    """``X Xᵀ / tokens`` of every listed linear's input over ``batches`` (dense forward passes)."""
    stats = {name: HessianStat(lin.in_features) for name, lin in linears.items()}
    hooks = [lin.register_forward_hook(lambda mod, inp, out, name=name: stats[name].add(inp[0].detach()))
             for name, lin in linears.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def relative_output_error(delta: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||ΔW X||² / ||W X||²`` from ``H = X Xᵀ / tokens`` (no activations kept)."""
    delta, weight, hessian = delta.double(), weight.double(), hessian.double()
    return float(((delta @ hessian) * delta).sum() / ((weight @ hessian) * weight).sum())


def compare(name: str, weight: torch.Tensor, calib: HessianStat, held: HessianStat, sparsity: float,
            alpha: float, floor: float, percdamp: float, consumer: tuple | None = None) -> dict:
    """SparseGPT on ``weight`` as it is and as induction folds it, both mapped back to the original units.

    ``consumer``: ``(down_proj weight, its input Hessian)`` for an up_proj, whose rows the ``down`` fold
    divides by the down_proj input scales. Its rows then also get a downstream-weighted held-out error,
    row i weighted by how much of it reaches the block output (``||down[:, i]||² · rms(down input i)² /
    rms(up output i)²``), and the mean sparsity of the rows of the 10% most active down_proj inputs.
    """
    n_zeros = round(sparsity * weight.numel())
    keep_plain, w_plain = sparsegpt_prune(weight, calib, n_zeros=n_zeros, percdamp=percdamp)
    rms = calib.hessian().diagonal().clamp_min(0).sqrt()
    scale = _scales_from_rms(rms, alpha, False, floor).double()
    row_scale = torch.ones(weight.shape[0], dtype=torch.float64)
    if consumer is not None:
        down_rms = consumer[1].hessian().diagonal().clamp_min(0).sqrt()
        row_scale = _scales_from_rms(down_rms, alpha, False, floor).double()
    scaled = HessianStat(weight.shape[1])  # H' = D⁻¹ H D⁻¹: the statistics of the scaled inputs
    scaled.xxt, scaled.n_tokens = calib.xxt / torch.outer(scale, scale), calib.n_tokens
    folded = weight.double() * scale / row_scale[:, None]
    keep_induced, w_scaled = sparsegpt_prune(folded.float(), scaled, n_zeros=n_zeros, percdamp=percdamp)
    w_induced = (w_scaled.double() * row_scale[:, None] / scale).float()  # back to the original units
    reference = weight.float()
    row = dict(linear=name, mask_agreement=float((keep_plain == keep_induced).float().mean()))
    for label, w, keep in (("plain", w_plain, keep_plain), ("induced", w_induced, keep_induced)):
        row[f"calib_err_{label}"] = relative_output_error(w - reference, reference, calib.hessian())
        row[f"held_err_{label}"] = relative_output_error(w - reference, reference, held.hessian())
        row[f"max_w_{label}"] = float(w.abs().max() / reference.abs().max())
        if consumer is not None:
            down_weight, down_calib = consumer
            out_var = ((reference.double() @ held.hessian()) * reference.double()).sum(1).clamp_min(1e-30)
            weight_i = (down_weight.double().square().sum(0) * down_calib.hessian().diagonal()) / out_var
            delta = (w - reference).double()
            row[f"downstream_err_{label}"] = float(
                (weight_i * ((delta @ held.hessian()) * delta).sum(1)).sum()
                / (weight_i * ((reference.double() @ held.hessian()) * reference.double()).sum(1)).sum())
            active = row_scale >= torch.quantile(row_scale, 0.9)
            row[f"active_rows_sparsity_{label}"] = float((~keep[active]).float().mean())
    row["scale_spread"] = float(scale.max() / scale.min())
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--blocks", default="0,15,29")
    p.add_argument("--linears", default="self_attn.q_proj,mlp.gate_proj,mlp.up_proj,mlp.down_proj")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--held-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--floor", type=float, default=1e-4)
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--held-weights", default=None,
                   help="safetensors of linear weights (e.g. runs/cache/pruned-*.safetensors) loaded into a copy of "
                        "the model that produces the held-out inputs: what a layer sees once the blocks before it "
                        "are pruned")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    text = load_text(Path(args.data) / "wiki.valid.tokens")
    calib_batches = calibration_batches_from_text(tokenizer, text, n=args.calib_samples, seq_len=args.seq_len, seed=0)
    held_text = load_text(Path(args.data) / "wiki.test.raw")  # the evaluation text: no overlap with calibration
    held_batches = calibration_batches_from_text(tokenizer, held_text, n=args.held_samples, seq_len=args.seq_len,
                                                 seed=0)
    layers = model.model.layers
    linears = {f"{b}.{suffix}": layers[int(b)].get_submodule(suffix)
               for b in args.blocks.split(",") for suffix in args.linears.split(",")}
    calib = collect_hessians(model, linears, calib_batches)
    if args.held_weights:
        import copy

        from safetensors.torch import load_file

        held_model = copy.deepcopy(model)
        weights = load_file(args.held_weights)  # {module name: weight}, as recovery.py caches pruned models
        with torch.no_grad():
            for name, module in held_model.named_modules():
                if name in weights:
                    module.weight.copy_(weights[name])
        held_linears = {name: held_model.model.layers[int(name.split(".")[0])].get_submodule(name.split(".", 1)[1])
                        for name in linears}
        held = collect_hessians(held_model, held_linears, held_batches)
        del held_model
    else:
        held = collect_hessians(model, linears, held_batches)
    rows = []
    for name, lin in linears.items():
        consumer = None
        if name.endswith("mlp.up_proj"):  # the down fold scales its rows: needs down_proj's weight and inputs
            down = name.replace("up_proj", "down_proj")
            consumer = (linears[down].weight.detach(), calib[down])
        rows.append(compare(name, lin.weight.detach(), calib[name], held[name], args.sparsity, args.alpha,
                            args.floor, args.percdamp, consumer))
    print(f"\nSparseGPT at {args.sparsity:.0%}, percdamp {args.percdamp}, induction alpha {args.alpha}, "
          f"floor {args.floor}; relative output error ||ΔW X||²/||W X||² on {args.calib_samples} calibration "
          f"and {args.held_samples} held-out windows of {args.seq_len} tokens (held-out inputs from "
          f"{args.held_weights or 'the dense model'})\n")
    print("| linear | mask agreement | calib err plain | calib err induced | held-out err plain | "
          "held-out err induced | max abs w plain | max abs w induced | scale max/min |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "downstream_err_plain" in r:
            continue
        print(f"| {r['linear']} | {r['mask_agreement']:.3f} | {r['calib_err_plain']:.4f} | {r['calib_err_induced']:.4f}"
              f" | {r['held_err_plain']:.4f} | {r['held_err_induced']:.4f} | {r['max_w_plain']:.2f}x"
              f" | {r['max_w_induced']:.2f}x | {r['scale_spread']:.3g} |")
    up_rows = [r for r in rows if "downstream_err_plain" in r]
    if up_rows:
        print("\nup_proj (rows divided by the down_proj input scales): held-out error weighted by what reaches the "
              "block output, and the sparsity of the rows feeding the 10% most active down_proj inputs\n")
        print("| linear | mask agreement | held-out err plain | held-out err induced | downstream err plain | "
              "downstream err induced | active rows sparsity plain | active rows sparsity induced |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in up_rows:
            print(f"| {r['linear']} | {r['mask_agreement']:.3f} | {r['held_err_plain']:.4f} | {r['held_err_induced']:.4f}"
                  f" | {r['downstream_err_plain']:.4f} | {r['downstream_err_induced']:.4f}"
                  f" | {r['active_rows_sparsity_plain']:.1%} | {r['active_rows_sparsity_induced']:.1%} |")
    return rows


if __name__ == "__main__":
    main()
