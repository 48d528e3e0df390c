"""benchmarks/training_cost.py end to end at its --tiny size: each row runs in its own worker process,
the table compares with the LoRA row, and a worker whose checks fail makes the script fail. No timing
is asserted (the numbers depend on the machine)."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "training_cost.py"
QUICK = ["--tiny", "--steps", "1", "--warmup", "0", "--dtypes", "fp32", "--checkpointing", "off"]


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *QUICK, *args], capture_output=True, text=True, timeout=300)


def test_rows_for_each_method_with_ratios_to_lora(tmp_path):
    out = tmp_path / "rows.jsonl"
    proc = run("--methods", "masked_lora", "lora", "spp", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    header = "| method | hidden | dtype | checkpointing | extra memory (MB) | x LoRA | step time (s) | x LoRA |"
    assert header in proc.stdout
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in proc.stdout.splitlines() if line.startswith("| ") and "128" in line}
    assert list(rows) == ["lora", "masked_lora", "spp"]  # the script's order, whatever the order asked
    assert rows["lora"][4] == rows["lora"][6] == "1.00"
    for cells in rows.values():  # hidden, dtype, checkpointing, MB, x LoRA, seconds, x LoRA
        assert cells[:3] == ["128", "fp32", "off"]
        assert all(float(cell) > 0 for cell in cells[3:])
    raw = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in raw] == ["lora", "masked_lora", "spp"]
    assert all(r["ok"] and r["threads"] == 1 and len(r["step_times_s"]) == 1 for r in raw)


def test_rounds_interleave_the_methods_and_the_table_shows_one_line_per_method(tmp_path):
    out = tmp_path / "rows.jsonl"
    proc = run("--methods", "spp", "lora", "--rounds", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    raw = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["round"]) for r in raw] == [("lora", 0), ("spp", 0), ("lora", 1), ("spp", 1)]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "128" in line]
    assert [line.split("|")[1].strip() for line in lines] == ["lora", "spp"]
    spp = [float(c) for c in lines[1].split("|")[5:-1]]  # MB, x LoRA, seconds, x LoRA
    per_round = [raw[i + 1]["step_time_s"] / raw[i]["step_time_s"] for i in (0, 2)]
    assert abs(spp[3] - sum(per_round) / 2) < 0.006  # the median of two: their mean, as printed to 2 places
    assert abs(spp[2] - (raw[1]["step_time_s"] + raw[3]["step_time_s"]) / 2) < 0.0006


def test_rounds_below_one_are_refused():
    proc = run("--rounds", "0")
    assert proc.returncode == 2 and "--rounds must be at least 1, got 0" in proc.stderr


def test_a_failed_check_in_a_worker_fails_the_script():
    proc = run("--methods", "masked_lora", "--inject-fault")
    assert proc.returncode != 0
    assert "FAILED" in proc.stdout
    assert "changed their zeros" in proc.stderr


def test_spts_step_time_leaves_out_its_last_step_with_a_pruning_event(tmp_path):
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--steps", "3", "--warmup", "1", "--dtypes", "fp32",
                           "--checkpointing", "off", "--methods", "spt", "lora", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lora, spt = [json.loads(line) for line in out.read_text().splitlines()]
    assert spt["step_time_s"] == statistics.median(spt["step_times_s"][1:3])  # steps 2 and 3, not 4
    assert lora["step_time_s"] == statistics.median(lora["step_times_s"][1:])  # every step after the warm-up
