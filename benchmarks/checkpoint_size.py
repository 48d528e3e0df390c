"""Compressed sparse checkpoint size and exactness on a real model.

Prunes SmolLM2-135M (default; ``--model`` for any other) with magnitude pruning at each sparsity,
casts to bf16, writes ``save_sparse``, loads it back with ``load_sparse``, checks every tensor is
bit-identical, and prints a markdown table of the linear-weight bytes on disk against dense bf16
and the bound ``(2 (1 - s) + 1/8) / 2`` of dense bf16:

    python benchmarks/checkpoint_size.py --sparsities 0.5 0.7
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import sparse_peft as sp
from sparse_peft.data import load_model_and_tokenizer
from sparse_peft.io import checkpoint_bytes

MB = 1024 * 1024


def bit_identical(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    if set(sa) != set(sb):
        return False
    for name, ta in sa.items():
        tb = sb[name]
        if ta.dtype != tb.dtype or ta.shape != tb.shape:
            return False
        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[ta.element_size()]
        if not torch.equal(ta.view(as_int), tb.view(as_int)):
            return False
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id, local dir or .gguf (default: SmolLM2-135M GGUF)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    args = parser.parse_args(argv)

    rows = []
    for sparsity in args.sparsities:
        model, _ = load_model_and_tokenizer(args.model)
        sp.prune(model, method="magnitude", sparsity=sparsity)
        model = model.to(torch.bfloat16)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            sp.save_sparse(model, tmp)
            save_s = time.perf_counter() - start
            start = time.perf_counter()
            loaded = sp.load_sparse(tmp)
            load_s = time.perf_counter() - start
            exact = bit_identical(model, loaded)
            sizes = checkpoint_bytes(tmp)
        dense = sizes["dense_bf16_linears"]
        on_disk = sizes["file"] - sizes["other_tensors"]  # packed linears plus the file header
        header = sizes["file"] - sizes["other_tensors"] - sizes["packed_linears"]
        bound = (2 * (1 - sparsity) + 1 / 8) / 2
        rows.append((sparsity, dense, sizes["packed_linears"], header, on_disk / dense, bound, exact, save_s, load_s))
        if not exact:
            raise SystemExit(f"round trip at sparsity {sparsity} is NOT bit-identical")

    print("| sparsity | dense bf16 linears (MiB) | packed linears (MiB) | + file header (KiB) | ratio with header "
          "| bound | bit-exact | save s | load s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for sparsity, dense, packed, header, ratio, bound, exact, save_s, load_s in rows:
        print(f"| {sparsity:.0%} | {dense / MB:.2f} | {packed / MB:.2f} ({packed / dense:.2%}) | {header / 1024:.1f} "
              f"| {ratio:.3%} | {bound:.2%} | {'yes' if exact else 'NO'} | {save_s:.1f} | {load_s:.1f} |")


if __name__ == "__main__":
    main()
