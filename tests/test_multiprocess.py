"""Two data-parallel CPU processes train every method to the same adapter as one process."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import norm_rel_err
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("multiprocess_script.py")
METHODS = ("masked_lora", "spp", "seft", "spt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiprocess")
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    single = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, env=env,
                            timeout=600, cwd=SCRIPT.parent)
    assert single.returncode == 0, single.stderr[-3000:]
    # accelerate's `--cpu` launcher needs mpirun for more than one process; its torchrun launcher
    # (`--multi_gpu`) with Accelerator(cpu=True) in the script gives two gloo processes on a CPU.
    launcher = shutil.which("accelerate")
    assert launcher, "the accelerate CLI comes with the accelerate dependency"
    double = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), str(out)],
                            capture_output=True, text=True, env=env, timeout=600, cwd=SCRIPT.parent)
    assert double.returncode == 0, double.stdout[-3000:] + double.stderr[-3000:]
    return {name: load_file(out / f"{name}.safetensors") for name in ("world1_rank0", "world2_rank0", "world2_rank1")}


@pytest.mark.parametrize("method", METHODS)
def test_ranks_hold_identical_adapters_and_masks(runs, method):
    rank0, rank1 = runs["world2_rank0"], runs["world2_rank1"]
    keys = [k for k in rank0 if k.startswith(method + "/")]
    assert keys and keys == [k for k in rank1 if k.startswith(method + "/")]
    for key in keys:
        assert torch.equal(rank0[key], rank1[key]), key


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one_process_with_the_same_global_batch(runs, method):
    single, double = runs["world1_rank0"], runs["world2_rank0"]
    keys = [k for k in single if k.startswith(method + "/")]
    assert keys == [k for k in double if k.startswith(method + "/")]
    moved = False
    for key in keys:
        a, b = single[key], double[key]
        if "/adapter/" in key and a.is_floating_point():
            assert norm_rel_err(b, a) < 1e-3, (key, norm_rel_err(b, a))
            moved = moved or bool(a.abs().sum() > 0)
        else:  # masks, topology and index sets: the same decisions exactly
            assert torch.equal(a, b), key
    assert moved, "nothing was trained"
