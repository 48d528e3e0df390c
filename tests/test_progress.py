"""Every progress bar of the package obeys TQDM_DISABLE=1 and show_progress=False.

tqdm reads its environment when it is imported, so each case runs in a fresh interpreter.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import make_tiny_model
from sparse_peft.data import perplexity
from sparse_peft.sparsity.calibration import run_blockwise
model = make_tiny_model("llama")
perplexity(model, torch.randint(0, 128, (200,)), n_windows=2, seq_len=16, show_progress={show})
class Count:
    def add(self, x):
        pass
run_blockwise(model, [torch.randint(0, 128, (1, 16))], lambda linear: Count(), lambda index, stats: None,
              desc="blocks", show_progress={show})
import copy, sparse_peft as sp
pruned = copy.deepcopy(model)
sp.prune(pruned, sparsity=0.5, show_progress=False)
sp.reconstruct(pruned, model, [torch.randint(0, 128, (1, 16))], epochs=1, lr=1e-3, show_progress={show})
"""


def stderr_of(show: bool, tqdm_disable: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    if tqdm_disable is not None:
        env["TQDM_DISABLE"] = tqdm_disable
    code = SCRIPT.format(tests=str(Path(__file__).parent), show=show)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.mark.parametrize("show, tqdm_disable, shown", [(True, None, True), (True, "1", False), (False, None, False)])
def test_bars_follow_show_progress_and_tqdm_disable(show, tqdm_disable, shown):
    stderr = stderr_of(show, tqdm_disable)
    assert ("perplexity" in stderr) is shown
    assert ("blocks" in stderr) is shown
    assert ("reconstruction" in stderr) is shown
