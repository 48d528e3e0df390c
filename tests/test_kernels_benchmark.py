"""benchmarks/kernel_timings.py end to end on the CPU, its kernels in Triton's interpreter (``--device cpu``).

The GPU timings cannot be tested here, but everything else the GPU run does can: every op's rows,
the accuracy check that runs before timing (a wrong output or a wrong gradient fails the run), the
table and the files it writes. The script is loaded under another name: ``kernels`` is the repo's
kernel package.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparse_peft import ops
from sparse_peft.kernels import _common

if not _common.INTERPRET:  # pragma: no cover - only with an explicit TRITON_INTERPRET=0
    pytest.skip("--device cpu runs the kernels in Triton's interpreter, and TRITON_INTERPRET is off",
                allow_module_level=True)

_spec = importlib.util.spec_from_file_location(
    "kernels_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_timings.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)

SMALL = ["--device", "cpu", "--shapes", "40x24", "--sparsities", "0.5", "--dtype", "float16"]


def test_the_whole_grid_runs_checks_and_writes_its_table(tmp_path, capsys):
    md, rows_file = tmp_path / "bench.md", tmp_path / "rows.jsonl"
    assert bench.main([*SMALL, "--tokens", "1,20", "--markdown", str(md), "--jsonl", str(rows_file)]) == 0
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    by_op = {}
    for r in rows:
        by_op.setdefault(r["op"], []).append(r["tokens"])
    # decode serves 1-16 tokens only; every other op runs at both token counts
    assert by_op == {"spp_linear fwd+bwd": [1, 20], "sddmm (mask)": [1, 20], "masked_linear fwd+bwd": [1, 20],
                     "bitmask decode": [1], "2:4 semi-structured": [1, 20]}
    for r in rows:
        if r["op"].startswith("2:4"):  # PyTorch's 2:4 GEMM needs CUDA: a row that says so, not a number
            assert r["note"].startswith("not run: weight is on cpu") and r["ms"] != r["ms"]
            continue
        assert r["ms"] > 0 and r["dense_ms"] > 0 and r["naive_ms"] > 0, r
        # fp16 against the fp32 reference: the kernels round like the naive references do
        assert 0 <= r["err"] < bench.TOLERANCE[torch.float16], r
        assert r["err"] <= 2 * r["naive_err"] + 1e-6, r
    assert rows[3]["gbps"] > 0
    table = md.read_text()
    assert "Device: CPU" in table and "Command: python benchmarks/kernel_timings.py --device cpu" in table
    assert table.count("| spp_linear fwd+bwd | 40x24 | 50% |") == 2 and "FAILED" not in table
    # the rows were printed as they came, then the table once more
    assert capsys.readouterr().out.count("| bitmask decode | 40x24 | 50% | 1 |") == 2


def test_a_wrong_output_fails_the_run(tmp_path, monkeypatch, capsys):
    right = ops.sddmm

    def off_by_a_percent(grad_out, x, indices, *, backend=None):
        values = right(grad_out, x, indices, backend=backend)
        return values * 1.01 if backend == "triton" else values

    monkeypatch.setattr(ops, "sddmm", off_by_a_percent)
    md = tmp_path / "bench.md"
    assert bench.main([*SMALL, "--tokens", "3", "--ops", "sddmm", "--markdown", str(md)]) == 1
    assert "FAILED: in 1 rows" in capsys.readouterr().err
    assert "**FAILED accuracy**" in md.read_text()


def test_a_wrong_gradient_fails_the_run(monkeypatch, capsys):
    right = ops.masked_linear

    def doubled_weight_grad(x, weight, mask, bias=None, *, backend=None):
        if backend != "triton":
            return right(x, weight, mask, bias, backend=backend)
        masked = weight * mask
        return F.linear(x, 2 * masked - masked.detach(), bias)  # the same output, twice the weight gradient

    monkeypatch.setattr(ops, "masked_linear", doubled_weight_grad)
    assert bench.main([*SMALL, "--tokens", "3", "--ops", "masked"]) == 1
    assert "masked_linear fwd+bwd 40x24 50% t=3" in capsys.readouterr().err


def test_two_four_rows_say_why_they_did_not_run():
    grid = bench.Grid("cpu", torch.float16, torch.Generator().manual_seed(0), rep=1)
    assert bench.bench_two_four(grid, (37, 45), 3)["note"] == "not run: in = 45 is not a multiple of 4"
    assert bench.bench_two_four(grid, (8, 16), 3)["note"].startswith("not run: weight is on cpu")


def test_without_a_gpu_the_default_run_says_so(capsys):
    if torch.cuda.is_available():  # pragma: no cover - CI has no GPU
        pytest.skip("a GPU is visible: the default run would measure")
    assert bench.main(["--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--sparsities", "1.5"], ["--shapes", "40"], ["--tokens", "one"], ["--ops", "spmm"]])
def test_bad_arguments_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(bad)
    assert bad[1] in capsys.readouterr().err
