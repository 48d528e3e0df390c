"""GPU benchmark of the sparse ops against dense cuBLAS and against their naive PyTorch references.

    python benchmarks/kernels.py                          # LLaMA-2-7B layer shapes, bf16, the full grid
    python benchmarks/kernels.py --quick                  # one shape, one sparsity: a smoke run
    python benchmarks/kernels.py --ops decode --tokens 1 --markdown docs/benchmarks.md

Shapes (out x in) are LLaMA-2-7B's linears: 4096x4096 (q/k/v/o), 11008x4096 (gate/up), 4096x11008
(down), with random weights pruned to the target sparsity (speed does not depend on the values).
Times are ``triton.testing.do_bench`` medians in ms. Every timed call takes the next of several
copies of the layer's weights (together at least twice the GPU's L2), so small layers are not
flattered by an L2-resident weight. Columns:

* ``dense`` is the same computation with cuBLAS (``torch.nn.functional.linear`` on the dense
  weight): SPP fwd+bwd vs dense fwd+bwd with a frozen weight (the two GEMMs y and dX); sddmm vs one
  dense GEMM ``dYᵀ X``; masked_linear fwd+bwd vs dense fwd+bwd with a weight gradient (three GEMMs);
  bitmask decode and 2:4 vs the dense forward.
* ``naive`` is the op's PyTorch reference twin (``sparse_peft.ops.<op>_reference``).
* ``x dense`` / ``x naive`` are speedups (baseline ms / op ms): above 1 the op is faster.
* ``GB/s`` (decode only): bytes the kernel must read and write (values, bits, row offsets, x, y)
  per second.

Needs a CUDA GPU: on a machine without one it prints why and exits with status 2.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = [1, 16, 4096]
SPARSITIES = [0.5, 0.7, 0.9]
OPS = ["spp", "sddmm", "masked", "decode", "2:4"]
SPP_RANK = 16
DEVICE = "cuda"  # a module variable so the script logic can be smoke-tested elsewhere


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="out x in, comma separated")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    parser.add_argument("--ops", default=",".join(OPS), help=f"subset of {','.join(OPS)}")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    parser.add_argument("--quick", action="store_true", help="4096x4096, 50%%, tokens 1 and 4096")
    parser.add_argument("--markdown", type=Path, help="also append the table (with device and command) here")
    args = parser.parse_args(argv)
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    args.ops = args.ops.split(",")
    unknown = set(args.ops) - set(OPS)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; choose from {OPS}")
    if args.quick:
        args.shapes, args.tokens, args.sparsities = [(4096, 4096)], [1, 4096], [0.5]
    args.dtype = getattr(torch, args.dtype)
    return args


def pruned(shape, sparsity, dtype, generator):
    weight = torch.randn(shape, device=DEVICE, dtype=dtype, generator=generator)
    return weight * (torch.rand(shape, device=DEVICE, generator=generator) >= sparsity)


def two_four(shape, dtype, generator):
    """Keep the 2 largest of every 4 consecutive inputs."""
    weight = torch.randn(shape, device=DEVICE, dtype=dtype, generator=generator)
    groups = weight.view(shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
    return (groups * keep).view(shape)


def copies_for(bytes_each: int) -> int:
    """How many copies of a layer's weights rotate so that together they are >= 2x the L2 cache."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20) if DEVICE == "cuda" else 0
    return max(2, math.ceil(2 * l2 / max(bytes_each, 1)))


def bench(fn_of_args, arg_sets, rep: int) -> float:
    """Median ms of ``fn_of_args(*args)``, each call on the next of ``arg_sets``."""
    import triton.testing

    cycle = itertools.cycle(arg_sets)
    return triton.testing.do_bench(lambda: fn_of_args(*next(cycle)), rep=rep, return_mode="median")


def fwd_bwd(forward, inputs):
    """A closure timing forward + backward w.r.t. ``inputs`` (gradients not accumulated)."""
    def run(*args):
        y = forward(*args)
        torch.autograd.grad(y, inputs(*args), torch.ones_like(y))
    return run


def row(op, shape, sparsity, tokens, ms, dense_ms, naive_ms, gbps=None, note=""):
    return {"op": op, "shape": f"{shape[0]}x{shape[1]}", "sparsity": sparsity, "tokens": tokens, "ms": ms,
            "dense_ms": dense_ms, "naive_ms": naive_ms, "gbps": gbps, "note": note}


def bench_spp(shape, sparsity, tokens, dtype, gen, rep):
    from sparse_peft import ops

    out_f, in_f = shape
    weight_bytes = out_f * in_f * 2
    sets = []
    for _ in range(copies_for(weight_bytes)):
        weight = pruned(shape, sparsity, dtype, gen)
        A = (torch.randn(SPP_RANK, in_f, device=DEVICE, generator=gen) / in_f**0.5).requires_grad_()
        b = (torch.randn(out_f, 1, device=DEVICE, generator=gen) * 1e-2).requires_grad_()
        sets.append((weight, A, b))
    x = torch.randn(tokens, in_f, device=DEVICE, dtype=dtype, generator=gen, requires_grad=True)
    kernel = fwd_bwd(lambda w, A, b: ops.spp_linear(x, w, A, b, 1.0, backend="triton"), lambda w, A, b: (x, A, b))
    naive = fwd_bwd(lambda w, A, b: ops.spp_linear_reference(x, w, A, b, 1.0), lambda w, A, b: (x, A, b))
    dense = fwd_bwd(lambda w, A, b: F.linear(x, w), lambda w, A, b: (x,))
    return row("spp_linear fwd+bwd", shape, sparsity, tokens, bench(kernel, sets, rep), bench(dense, sets, rep),
               bench(naive, sets, rep), note="dense: y and dX GEMMs")


def bench_sddmm(shape, sparsity, tokens, dtype, gen, rep):
    from sparse_peft import ops

    out_f, in_f = shape
    sets = [(pruned(shape, sparsity, dtype, gen) != 0,) for _ in range(copies_for(out_f * in_f))]
    grad_out = torch.randn(tokens, out_f, device=DEVICE, dtype=dtype, generator=gen)
    x = torch.randn(tokens, in_f, device=DEVICE, dtype=dtype, generator=gen)
    kernel = bench(lambda m: ops.sddmm(grad_out, x, m, backend="triton"), sets, rep)
    dense = bench(lambda m: grad_out.t().matmul(x), sets, rep)
    naive = bench(lambda m: ops.sddmm_reference(grad_out, x, m), sets, rep)
    return row("sddmm (mask)", shape, sparsity, tokens, kernel, dense, naive, note="dense: one GEMM dYᵀX")


def bench_masked(shape, sparsity, tokens, dtype, gen, rep):
    from sparse_peft import ops

    sets = []
    for _ in range(copies_for(shape[0] * shape[1] * 3)):
        weight = pruned(shape, sparsity, dtype, gen)
        sets.append((weight.requires_grad_(), weight != 0))
    x = torch.randn(tokens, shape[1], device=DEVICE, dtype=dtype, generator=gen, requires_grad=True)
    kernel = fwd_bwd(lambda w, m: ops.masked_linear(x, w, m, backend="triton"), lambda w, m: (x, w))
    naive = fwd_bwd(lambda w, m: ops.masked_linear_reference(x, w, m), lambda w, m: (x, w))
    dense = fwd_bwd(lambda w, m: F.linear(x, w), lambda w, m: (x, w))
    return row("masked_linear fwd+bwd", shape, sparsity, tokens, bench(kernel, sets, rep), bench(dense, sets, rep),
               bench(naive, sets, rep), note="dense: y, dX, dW GEMMs")


def bench_decode(shape, sparsity, tokens, dtype, gen, rep):
    from sparse_peft import ops

    out_f, in_f = shape
    dense_weights = [pruned(shape, sparsity, dtype, gen) for _ in range(copies_for(out_f * in_f * 2))]
    packed = [(ops.pack_bitmask(w),) for w in dense_weights]
    x = torch.randn(tokens, in_f, device=DEVICE, dtype=dtype, generator=gen)
    with torch.no_grad():
        kernel = bench(lambda p: ops.bitmask_linear(x, p, backend="triton"), packed, rep)
        dense = bench(lambda w: F.linear(x, w), [(w,) for w in dense_weights], rep)
        naive = bench(lambda p: ops.bitmask_linear_reference(x, p), packed, rep)
    p = packed[0][0]
    moved = (p.values.numel() * p.values.element_size() + p.bits.numel() + p.row_offsets.numel() * 8
             + x.numel() * x.element_size() + tokens * out_f * x.element_size())
    return row("bitmask decode", shape, sparsity, tokens, kernel, dense, naive, gbps=moved / (kernel * 1e-3) / 1e9,
               note=f"{moved / 2**20:.1f} MiB moved")


def bench_two_four(shape, tokens, dtype, gen, rep):
    from sparse_peft import ops

    dense_weights = [two_four(shape, dtype, gen) for _ in range(copies_for(shape[0] * shape[1] * 2))]
    reason = ops.semi_structured_unsupported_reason(dense_weights[0])
    if reason is not None:
        return row("2:4 semi-structured", shape, 0.5, tokens, float("nan"), float("nan"), float("nan"),
                   note=f"not run: {reason}")
    sparse = [(ops.to_semi_structured(w, probe_tokens=max(tokens, 16), measure=False),) for w in dense_weights]
    if sparse[0][0] is dense_weights[0]:
        return row("2:4 semi-structured", shape, 0.5, tokens, float("nan"), float("nan"), float("nan"),
                   note="not run: torch refused this shape")
    x = torch.randn(tokens, shape[1], device=DEVICE, dtype=dtype, generator=gen)
    with torch.no_grad():
        kernel = bench(lambda w: ops.semi_structured_linear(x, w, backend="triton"), sparse, rep)
        dense = bench(lambda w: F.linear(x, w), [(w,) for w in dense_weights], rep)
    return row("2:4 semi-structured", shape, 0.5, tokens, kernel, dense, dense, note="naive = dense")


def markdown(rows) -> str:
    lines = ["| op | shape (out x in) | sparsity | tokens | op ms | dense ms | naive ms | x dense | x naive | GB/s | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    def num(value):  # NaN (not measured) prints as a dash
        return f"{value:.4f}" if value == value else "–"

    for r in rows:
        measured = r["ms"] == r["ms"] and r["ms"] > 0
        speedup = [f"{base / r['ms']:.2f}" if measured else "–" for base in (r["dense_ms"], r["naive_ms"])]
        gbps = "" if r["gbps"] is None else f"{r['gbps']:.0f}"
        lines.append(f"| {r['op']} | {r['shape']} | {r['sparsity']:.0%} | {r['tokens']} | {num(r['ms'])} | "
                     f"{num(r['dense_ms'])} | {num(r['naive_ms'])} | {speedup[0]} | {speedup[1]} | {gbps} | {r['note']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (the Triton kernels and cuBLAS baselines are timed there); "
              "none is visible here, so nothing was measured.", file=sys.stderr)
        return 2
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows = []
    for shape in args.shapes:
        for sparsity in args.sparsities:
            for tokens in args.tokens:
                done = len(rows)
                if "spp" in args.ops:
                    rows.append(bench_spp(shape, sparsity, tokens, args.dtype, gen, args.rep))
                if "sddmm" in args.ops:
                    rows.append(bench_sddmm(shape, sparsity, tokens, args.dtype, gen, args.rep))
                if "masked" in args.ops:
                    rows.append(bench_masked(shape, sparsity, tokens, args.dtype, gen, args.rep))
                if "decode" in args.ops and tokens <= 16:
                    rows.append(bench_decode(shape, sparsity, tokens, args.dtype, gen, args.rep))
                for line in markdown(rows[done:]).splitlines()[2:]:
                    print(line, flush=True)
                torch.cuda.empty_cache()
        if "2:4" in args.ops:
            for tokens in args.tokens:
                rows.append(bench_two_four(shape, tokens, args.dtype, gen, args.rep))
    table = markdown(rows)
    device = torch.cuda.get_device_name(0)
    header = (f"Device: {device}; torch {torch.__version__}; dtype {str(args.dtype).replace('torch.', '')}\n"
              f"Command: python benchmarks/kernels.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    print("\n" + header + "\n" + table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n## Triton kernels (benchmarks/kernels.py)\n\n" + header + "\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
