"""GPU benchmark of the sparse ops against dense cuBLAS and against their naive PyTorch references.

    python benchmarks/kernel_timings.py                          # LLaMA-2-7B layer shapes, bf16, the full grid
    python benchmarks/kernel_timings.py --quick                  # one shape, one sparsity: a smoke run
    python benchmarks/kernel_timings.py --ops decode --tokens 1 --markdown docs/results/kernels.md
    python benchmarks/kernel_timings.py --device cpu --shapes 40x24 --tokens 1,20 --dtype float16   # no GPU

``x dense`` / ``x naive`` above 1: the op is faster. Each row first checks the op against its PyTorch twin in fp32
(``err op / naive``); a failed row makes the script exit with status 1 after the table. Without a GPU it exits with
status 2, unless ``--device cpu`` (Triton's interpreter, whose times measure nothing). What is timed, and the
tolerances: docs/kernels.md, section "Benchmark".
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    TORCH_DTYPES, append, append_jsonl, arg_parser, comma_list, command_line, markdown_table, table_row, timed)

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = [1, 16, 4096]
SPARSITIES = [0.5, 0.7, 0.9]
OPS = ["spp", "sddmm", "masked", "decode", "2:4"]
SPP_RANK = 16
#: An op's error may exceed twice the naive reference's only up to this: fp32 for the accumulation order
#: over K up to 11008, fp16/bf16 for the rounding of the merged SPP weight and of the outputs.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
CPU_TIMED_CALLS = 3  # the interpreter's times mean nothing: as few calls as give a median
HEADER = ["op", "shape (out x in)", "sparsity", "tokens", "op ms", "dense ms", "naive ms", "x dense", "x naive",
          "GB/s", "err op / naive", "note"]
NAN = float("nan")


def parse_shape(text: str) -> tuple[int, int]:
    sizes = text.split("x")
    if len(sizes) != 2 or not all(size.isdigit() and int(size) > 0 for size in sizes):
        raise ValueError(f"{text} is not OUTxIN with positive sizes")
    return int(sizes[0]), int(sizes[1])


def parse_args(argv=None):
    parser = arg_parser(__doc__)
    parser.add_argument("--shapes", type=comma_list(parse_shape), default=SHAPES, help="OUTxIN,OUTxIN,...")
    parser.add_argument("--tokens", type=comma_list(int), default=TOKENS)
    parser.add_argument("--sparsities", type=comma_list(float), default=SPARSITIES)
    parser.add_argument("--ops", type=comma_list(str, OPS), default=OPS, help=f"subset of {','.join(OPS)}")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(TORCH_DTYPES))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: the kernels in Triton's interpreter, to test the script (times mean nothing)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    parser.add_argument("--quick", action="store_true", help="4096x4096, 50%%, tokens 1 and 4096")
    parser.add_argument("--markdown", type=Path, help="also append the table (with device and command) here")
    parser.add_argument("--jsonl", type=Path, help="also append each row here as soon as it is measured")
    args = parser.parse_args(argv)
    if not all(0 <= sparsity < 1 for sparsity in args.sparsities):
        parser.error(f"--sparsities must lie in [0, 1), got {args.sparsities}")
    if args.quick:
        args.shapes, args.tokens, args.sparsities = [(4096, 4096)], [1, 4096], [0.5]
    args.dtype = TORCH_DTYPES[args.dtype]
    return args


@dataclass
class Grid:
    """Where and how the rows are measured: device, dtype, random stream and timer."""

    device: str
    dtype: torch.dtype
    generator: torch.Generator
    rep: int

    def randn(self, *shape, dtype=None, scale=1.0, requires_grad=False):
        values = torch.randn(shape, device=self.device, generator=self.generator) * scale
        return values.to(dtype or self.dtype).requires_grad_(requires_grad)

    def pruned(self, shape, sparsity):
        weight = self.randn(*shape)
        return weight * (torch.rand(shape, device=self.device, generator=self.generator) >= sparsity)

    def copies_for(self, bytes_each: int) -> int:
        """How many copies of a layer's weights rotate so that together they are >= 2x the L2 cache."""
        if self.device != "cuda":
            return 2
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
        return max(2, math.ceil(2 * l2 / max(bytes_each, 1)))

    def time(self, fn_of_args, arg_sets) -> float:
        """Median ms of ``fn_of_args(*args)``, each call on the next of ``arg_sets``."""
        cycle = itertools.cycle(arg_sets)
        if self.device == "cuda":
            import triton.testing

            return triton.testing.do_bench(lambda: fn_of_args(*next(cycle)), rep=self.rep, return_mode="median")
        fn_of_args(*next(cycle))  # warm-up (and, on a GPU, the autotuning)
        return statistics.median(timed(lambda: fn_of_args(*next(cycle)))[1] * 1e3 for _ in range(CPU_TIMED_CALLS))

    def times(self, arg_sets, *fns) -> list[float]:
        return [self.time(fn, arg_sets) for fn in fns]


def fwd_bwd(fn, x, wrt):
    """A closure timing ``fn(x, *weights)`` forward + backward w.r.t. the arguments at ``wrt`` (gradients
    not accumulated)."""
    def run(*weights):
        inputs = (x, *weights)
        y = fn(*inputs)
        torch.autograd.grad(y, [inputs[i] for i in wrt], torch.ones_like(y))
    return run


# --- accuracy ---------------------------------------------------------------------------------------


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``want``."""
    got, want = got.detach().float(), want.detach().float()
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / (scale if scale > 0 else 1.0)


def outputs_and_grads(fn, inputs, wrt, grad_seed=7):
    """``fn(*inputs)`` and its gradients w.r.t. ``inputs[i]`` for ``i in wrt``, under a fixed random
    output gradient (all ones could hide a wrong sign or a swapped row)."""
    leaves = [t.detach().requires_grad_(i in wrt) if isinstance(t, torch.Tensor) else t for i, t in enumerate(inputs)]
    y = fn(*leaves)
    if not wrt:
        return [y.detach()]
    gen = torch.Generator(device=y.device).manual_seed(grad_seed)
    grad_y = torch.randn(y.shape, device=y.device, generator=gen).to(y.dtype)
    return [y.detach(), *torch.autograd.grad(y, [leaves[i] for i in wrt], grad_y)]


def accuracy(op, naive, inputs, wrt=(), truth_inputs=None):
    """(op's error, naive reference's error), each the largest ``rel_err`` over the output and the
    gradients against ``naive`` computed in fp32 on the same values."""
    if truth_inputs is None:
        truth_inputs = [t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    truth = outputs_and_grads(naive, truth_inputs, wrt)
    return tuple(max(rel_err(got, want) for got, want in zip(outputs_and_grads(fn, inputs, wrt), truth))
                 for fn in (op, naive))


def row(op, shape, sparsity, tokens, ms, dense_ms, naive_ms, errors=(NAN, NAN), gbps=None, note=""):
    return {"op": op, "shape": f"{shape[0]}x{shape[1]}", "sparsity": sparsity, "tokens": tokens, "ms": ms,
            "dense_ms": dense_ms, "naive_ms": naive_ms, "err": errors[0], "naive_err": errors[1], "gbps": gbps,
            "note": note}


def failed(r, dtype) -> bool:
    """The op's error exceeds both the dtype's tolerance and twice the naive reference's (NaN: not run)."""
    return r["err"] == r["err"] and r["err"] > max(TOLERANCE[dtype], 2 * r["naive_err"])


# --- one row per op ---------------------------------------------------------------------------------


def training_row(grid, name, shape, sparsity, tokens, sets, x, op, naive, wrt, dense_wrt, note):
    """The row of a training op ``op(x, *weights)``: accuracy, and forward + backward against ``naive`` and
    ``F.linear(x, weight)`` (gradients w.r.t. the arguments at ``wrt``, for dense at ``dense_wrt``)."""
    errors = accuracy(op, naive, (x, *sets[0]), wrt=wrt)
    times = grid.times(sets, fwd_bwd(op, x, wrt), fwd_bwd(lambda x, w, *_: F.linear(x, w), x, dense_wrt),
                       fwd_bwd(naive, x, wrt))
    return row(name, shape, sparsity, tokens, *times, errors, note=note)


def bench_spp(grid, shape, sparsity, tokens):
    from sparse_peft import ops

    out_f, in_f = shape
    # A, b stay fp32 (as in the layer); b is small, as after a little training.
    sets = [(grid.pruned(shape, sparsity),
             grid.randn(SPP_RANK, in_f, dtype=torch.float32, scale=in_f**-0.5, requires_grad=True),
             grid.randn(out_f, 1, dtype=torch.float32, scale=1e-2, requires_grad=True))
            for _ in range(grid.copies_for(out_f * in_f * grid.dtype.itemsize))]
    return training_row(grid, "spp_linear fwd+bwd", shape, sparsity, tokens, sets,
                        grid.randn(tokens, in_f, requires_grad=True),
                        lambda x, w, A, b: ops.spp_linear(x, w, A, b, 1.0, backend="triton"),
                        lambda x, w, A, b: ops.spp_linear_reference(x, w, A, b, 1.0), (0, 2, 3), (0,),
                        "dense: y and dX GEMMs")


def bench_sddmm(grid, shape, sparsity, tokens):
    from sparse_peft import ops

    out_f, in_f = shape
    sets = [(grid.pruned(shape, sparsity) != 0,) for _ in range(grid.copies_for(out_f * in_f))]
    grad_out, x = grid.randn(tokens, out_f), grid.randn(tokens, in_f)
    errors = accuracy(lambda g, x, m: ops.sddmm(g, x, m, backend="triton"), ops.sddmm_reference,
                      (grad_out, x, sets[0][0]))
    times = grid.times(sets, lambda m: ops.sddmm(grad_out, x, m, backend="triton"), lambda m: grad_out.t().matmul(x),
                       lambda m: ops.sddmm_reference(grad_out, x, m))
    return row("sddmm (mask)", shape, sparsity, tokens, *times, errors, note="dense: one GEMM dYᵀX")


def bench_masked(grid, shape, sparsity, tokens):
    from sparse_peft import ops

    weights = [grid.pruned(shape, sparsity).requires_grad_()  # each copy: the weight and its bool mask
               for _ in range(grid.copies_for(shape[0] * shape[1] * (grid.dtype.itemsize + 1)))]
    return training_row(grid, "masked_linear fwd+bwd", shape, sparsity, tokens,
                        [(w, w != 0) for w in weights], grid.randn(tokens, shape[1], requires_grad=True),
                        lambda x, w, m: ops.masked_linear(x, w, m, backend="triton"),
                        ops.masked_linear_reference, (0, 1), (0, 1), "dense: y, dX, dW GEMMs")


def bench_decode(grid, shape, sparsity, tokens):
    from sparse_peft import ops

    out_f, in_f = shape
    dense_weights = [grid.pruned(shape, sparsity) for _ in range(grid.copies_for(out_f * in_f * grid.dtype.itemsize))]
    sets = [(ops.pack_bitmask(w), w) for w in dense_weights]
    p, x = sets[0][0], grid.randn(tokens, in_f)
    with torch.no_grad():
        errors = accuracy(lambda x, p: ops.bitmask_linear(x, p, backend="triton"), ops.bitmask_linear_reference,
                          (x, p), truth_inputs=(x.float(), ops.pack_bitmask(dense_weights[0].float())))
        kernel, dense, naive = grid.times(sets, lambda p, w: ops.bitmask_linear(x, p, backend="triton"),
                                          lambda p, w: F.linear(x, w),
                                          lambda p, w: ops.bitmask_linear_reference(x, p))
    moved = (p.values.numel() * p.values.element_size() + p.bits.numel() + p.row_offsets.numel() * 8
             + x.numel() * x.element_size() + tokens * out_f * x.element_size())
    return row("bitmask decode", shape, sparsity, tokens, kernel, dense, naive, errors,
               gbps=moved / (kernel * 1e-3) / 1e9, note=f"{moved / 2**20:.1f} MiB moved")


def bench_two_four(grid, shape, tokens):
    from sparse_peft import ops
    from sparse_peft.sparsity.selection import nm_keep_mask

    def not_run(reason):
        return row("2:4 semi-structured", shape, 0.5, tokens, NAN, NAN, NAN, note=f"not run: {reason}")

    if shape[1] % 4:
        return not_run(f"in = {shape[1]} is not a multiple of 4")
    dense_weights = [grid.randn(*shape) for _ in range(grid.copies_for(shape[0] * shape[1] * grid.dtype.itemsize))]
    dense_weights = [w * nm_keep_mask(w.abs(), 2, 4) for w in dense_weights]  # the 2 largest of every 4 inputs
    reason = ops.semi_structured_unsupported_reason(dense_weights[0])
    if reason is not None:
        return not_run(reason)
    sets = [(ops.to_semi_structured(w, probe_tokens=max(tokens, 16), measure=False), w)
            for w in dense_weights]
    if sets[0][0] is dense_weights[0]:
        return not_run("torch refused this shape")
    x = grid.randn(tokens, shape[1])
    with torch.no_grad():
        errors = accuracy(lambda x, w: ops.semi_structured_linear(x, w, backend="triton"),
                          ops.semi_structured_linear_reference, (x, sets[0][0]),
                          truth_inputs=(x.float(), dense_weights[0].float()))
        kernel, dense = grid.times(sets, lambda s, w: ops.semi_structured_linear(x, s, backend="triton"),
                                   lambda s, w: F.linear(x, w))
    return row("2:4 semi-structured", shape, 0.5, tokens, kernel, dense, dense, errors, note="naive = dense")


# --- output -----------------------------------------------------------------------------------------


def cells(r, dtype) -> list[str]:
    def num(value):  # NaN (not measured) prints as a dash
        return f"{value:.4f}" if value == value else "–"

    measured = r["ms"] == r["ms"] and r["ms"] > 0
    speedup = [f"{base / r['ms']:.2f}" if measured else "–" for base in (r["dense_ms"], r["naive_ms"])]
    err = "–" if r["err"] != r["err"] else f"{r['err']:.1e} / {r['naive_err']:.1e}"
    note = ("**FAILED accuracy**; " if failed(r, dtype) else "") + r["note"]
    return [r["op"], r["shape"], f"{r['sparsity']:.0%}", r["tokens"], num(r["ms"]), num(r["dense_ms"]),
            num(r["naive_ms"]), *speedup, "" if r["gbps"] is None else f"{r['gbps']:.0f}", err, note]


def markdown(rows, dtype) -> str:
    return markdown_table(HEADER, "llrrrrrrrrll", [cells(r, dtype) for r in rows])


def ready(device: str) -> str | None:
    """Why the grid cannot run on ``device`` here, or ``None``."""
    if device == "cuda":
        return None if torch.cuda.is_available() else (
            "benchmarks/kernel_timings.py needs a CUDA GPU (the Triton kernels and cuBLAS baselines are timed there); "
            "none is visible here, so nothing was measured. To run the script itself on the CPU, with the "
            "kernels in Triton's interpreter: --device cpu --shapes 40x24 --tokens 1,20 --sparsities 0.5")
    if "triton" not in sys.modules:  # the interpreter must be chosen before triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from sparse_peft.kernels import _common

    return None if _common.INTERPRET and _common.LANGUAGE_INTERPRETED else (
        "--device cpu runs the kernels in Triton's interpreter, which is off in this process "
        f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}, or set only after triton was imported); "
        "run with TRITON_INTERPRET=1")


def measure(args):
    """Every row of the grid, each yielded as soon as it is measured."""
    grid = Grid(args.device, args.dtype, torch.Generator(device=args.device).manual_seed(0), args.rep)
    benches = [(op, bench) for op, bench in (("spp", bench_spp), ("sddmm", bench_sddmm), ("masked", bench_masked),
                                             ("decode", bench_decode)) if op in args.ops]
    for shape in args.shapes:
        for sparsity in args.sparsities:
            for tokens in args.tokens:
                for op, bench in benches:
                    if op != "decode" or tokens <= 16:
                        yield bench(grid, shape, sparsity, tokens)
                if args.device == "cuda":
                    torch.cuda.empty_cache()
        if "2:4" in args.ops:
            for tokens in args.tokens:
                yield bench_two_four(grid, shape, tokens)


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = ready(args.device)
    if reason is not None:
        print(reason, file=sys.stderr)
        return 2
    print(markdown([], args.dtype), flush=True)
    rows = []
    for new_row in measure(args):
        rows.append(new_row)
        print(table_row(cells(new_row, args.dtype)), flush=True)
        if args.jsonl:
            append_jsonl(args.jsonl, [new_row])
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}), kernels in Triton's interpreter: the times show that "
        "the script runs end to end and measure nothing")
    header = (f"Device: {device}; torch {torch.__version__}; "
              f"dtype {str(args.dtype).replace('torch.', '')}\nCommand: {command_line(__file__, argv)}\n")
    text = header + "\n" + markdown(rows, args.dtype)
    print("\n" + text)
    if args.markdown:
        append(args.markdown, "\n## Triton kernels (benchmarks/kernel_timings.py)\n\n" + text + "\n")
    bad = [r for r in rows if failed(r, args.dtype)]
    if bad:
        print(f"FAILED: in {len(bad)} rows the op's error exceeds both the {args.dtype} tolerance "
              f"({TOLERANCE[args.dtype]:.0e}) and twice the naive reference's: "
              + ", ".join(f"{r['op']} {r['shape']} {r['sparsity']:.0%} t={r['tokens']}" for r in bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
