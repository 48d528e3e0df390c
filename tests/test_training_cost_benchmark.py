"""benchmarks/training_cost.py end to end at its --tiny size: each row runs in its own worker process,
the table compares with the LoRA row, and a worker whose checks fail makes the script fail. No timing
is asserted (the numbers depend on the machine)."""

import json
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


def test_a_failed_check_in_a_worker_fails_the_script():
    proc = run("--methods", "masked_lora", "--inject-fault")
    assert proc.returncode != 0
    assert "FAILED" in proc.stdout
    assert "changed their zeros" in proc.stderr
