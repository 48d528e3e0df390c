"""The code stays readable in pieces: no function of the library, the kernels or the benchmarks is
over 100 lines (docstring included); a longer one is a pipeline that wants named stages. The
benchmarks stay measurements, not a second library: at most 2,200 lines of Python together."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIMIT = 100
BENCHMARK_LINES = 2200


def long_functions(roots=("sparse_peft", "benchmarks")) -> list[str]:
    found = []
    for root in roots:
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > LIMIT:
                        found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_over_100_lines():
    assert not long_functions(), "\n".join(long_functions())


def test_the_check_sees_a_long_function(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def f():\n" + "    x = 1\n" * LIMIT)
    global REPO
    saved, REPO = REPO, tmp_path
    try:
        assert long_functions(("pkg",)) == [f"pkg/m.py:1 f ({LIMIT + 1} lines)"]
    finally:
        REPO = saved


def test_the_benchmarks_stay_small():
    lines = {path.name: len(path.read_text(encoding="utf-8").splitlines())
             for path in sorted((REPO / "benchmarks").glob("*.py"))}
    assert sum(lines.values()) <= BENCHMARK_LINES, (
        f"benchmarks/ holds {sum(lines.values())} lines of Python (limit {BENCHMARK_LINES}): {lines}; move what "
        "is reusable into the library or drop what no results page uses")
