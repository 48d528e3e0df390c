"""Compressed sparse checkpoint size and exactness on a real model (docs/results/checkpoints.md).

Magnitude-prunes the model at each sparsity, casts it to bf16, writes ``save_sparse``, loads it back with
``load_sparse``, checks every tensor is bit-identical, and prints the linear-weight bytes on disk against
dense bf16 and the bound ``(2 (1 - s) + 1/8) / 2``:

    python benchmarks/checkpoint_size.py --sparsities 0.5 0.7
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import sparse_peft as sp
from sparse_peft.data import load_model_and_tokenizer
from sparse_peft.io import checkpoint_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MIB, MODEL_HELP, arg_parser, markdown_table, timed  # noqa: E402


def bit_identical(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Every tensor of the two state dicts has the same name, dtype, shape and bits."""
    sa, sb = a.state_dict(), b.state_dict()
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return set(sa) == set(sb) and all(ta.dtype == sb[n].dtype and ta.shape == sb[n].shape and torch.equal(
        ta.view(as_int[ta.element_size()]), sb[n].view(as_int[ta.element_size()])) for n, ta in sa.items())


def main(argv=None) -> None:
    parser = arg_parser(__doc__, model=MODEL_HELP)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    args = parser.parse_args(argv)

    rows = []
    for sparsity in args.sparsities:
        model, _ = load_model_and_tokenizer(args.model)
        sp.prune(model, method="magnitude", sparsity=sparsity)
        model = model.to(torch.bfloat16)
        with tempfile.TemporaryDirectory() as tmp:
            _, save_s = timed(lambda: sp.save_sparse(model, tmp))
            loaded, load_s = timed(lambda: sp.load_sparse(tmp))
            exact = bit_identical(model, loaded)
            sizes = checkpoint_bytes(tmp)
        if not exact:
            raise SystemExit(f"round trip at sparsity {sparsity} is NOT bit-identical")
        dense, packed = sizes["dense_bf16_linears"], sizes["packed_linears"]
        on_disk = sizes["file"] - sizes["other_tensors"]  # packed linears plus the file header
        rows.append([f"{sparsity:.0%}", f"{dense / MIB:.2f}", f"{packed / MIB:.2f} ({packed / dense:.2%})",
                     f"{(on_disk - packed) / 1024:.1f}", f"{on_disk / dense:.3%}",
                     f"{(2 * (1 - sparsity) + 1 / 8) / 2:.2%}", "yes", f"{save_s:.1f}", f"{load_s:.1f}"])
    print(markdown_table(["sparsity", "dense bf16 linears (MiB)", "packed linears (MiB)", "+ file header (KiB)",
                          "ratio with header", "bound", "bit-exact", "save s", "load s"], "rrrrrrlrr", rows))


if __name__ == "__main__":
    main()
