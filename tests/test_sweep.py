"""benchmarks/sweep.py: planning, resumability, key matching, dry run, failures and rendering.

Most tests replace ``sweep.run_recovery`` (one recovery.py subprocess per row) by a fake that returns a
synthetic row; one runs the real recovery.main in-process on a tiny model, so the keys the sweep
computes are checked against rows recovery.py really writes.
"""

import json
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import make_tiny_model
from test_cli import char_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import recovery  # noqa: E402
import sweep  # noqa: E402

# ppl after merge of the fake rows: per target, scaled per method and loss, so the best recipe is known
BASE_PPL = {"0.5": 40.0, "0.7": 100.0, "2:4": 60.0, "dense": 22.0}
METHOD_FACTOR = {"masked_lora": 0.9, "spp": 0.8, "seft": 0.95, "spt": 1.2, "lora": 1.0}
TRAINABLE = {"masked_lora": 2_442_240, "spp": 2_551_680, "seft": 1_000_000, "spt": 5_000, "lora": 2_442_240}


def flags(argv: list[str]) -> dict[str, str]:
    """recovery.py flags the sweep passes, all of them ``--flag value`` (or ``--flag=value``)."""
    argv = [part for word in argv for part in (word.split("=", 1) if word.startswith("--") else [word])]
    assert len(argv) % 2 == 0 and all(a.startswith("--") for a in argv[::2]), argv
    return {a[2:].replace("-", "_"): v for a, v in zip(argv[::2], argv[1::2])}


def fake_row(argv: list[str]) -> dict:
    """The fields recovery.py writes (with its 4-decimal rounding of floats) and the table reads."""
    f = flags(argv)
    method, pattern, sparsity = f["method"], f.get("pattern"), float(f.get("sparsity", 0.5))
    target = pattern or (f"{sparsity:g}" if sparsity else "dense")
    loss = f.get("loss", "ce")
    ppl = BASE_PPL[target] * METHOD_FACTOR[method] * (0.8 if loss == "squarehead" else 1.0)
    row = dict(method=method, pruner=f["pruner"], sparsity=sparsity, pattern=pattern, steps=int(f["steps"]),
               tokens_seen=int(f["steps"]) * int(f["batch_size"]) * int(f["seq_len"]), lr=round(float(f["lr"]), 4),
               seq_len=int(f["seq_len"]), batch_size=int(f["batch_size"]), seed=int(f["seed"]), ppl_dense=32.3,
               ppl_pruned=2 * BASE_PPL[target], loss=loss, sparsity_before=sweep.target_sparsity(target),
               ppl_after=ppl, sparsity_after_merge=sweep.target_sparsity(target), mask_identical=True,
               trainable_params=TRAINABLE[method], step_time_s=1.5, peak_mem_mb=1000.0, threads=1, wall_s=600.0)
    if loss == "squarehead":
        row.update(squarehead_lambda=float(f["squarehead_lambda"]), teacher=f.get("teacher", "dense (untuned)"))
    if method == "lora":
        row.update(ppl_after_unmerged=ppl * 0.98, sparsity_after_plain_merge=0.0)
    if method == "seft":
        row.update(seft_regrown=10, positions_moved=20, counts_identical=True)
    if method == "spt":
        row.update(mask_identical=None, layers_at_target=True, zeros_shared_with_oneshot=0.8,
                   ppl_after_without_prompts=ppl * 1.5)
    return row


@pytest.fixture
def fake_sweep(tmp_path, monkeypatch):
    """``run(*argv) -> (exit status, argvs run)``, with the rows going to tmp_path/results.jsonl."""
    results = tmp_path / "results.jsonl"

    def run(*argv, runner=None):
        calls = []

        def fake_run_recovery(recovery_argv, log_path):
            calls.append(recovery_argv)
            return (runner or fake_row)(recovery_argv)

        monkeypatch.setattr(sweep, "run_recovery", fake_run_recovery)
        status = sweep.main(["--results", str(results), "--log-dir", str(tmp_path / "logs"),
                             "--markdown-out", str(tmp_path / "sweep.md"),
                             "--no-render", *argv])
        return status, calls

    run.results = results
    return run


def planned(*argv) -> list[tuple]:
    jobs, _ = sweep.plan(sweep.parse_args(list(argv)))
    return [(j.method, j.target, j.loss) for j in jobs]


def test_default_plan_is_the_issue_table():
    jobs, skipped = sweep.plan(sweep.parse_args([]))
    keys = [(j.method, j.target, j.loss) for j in jobs]
    assert len(keys) == len(set(keys)) == 1 + 15 + 4
    assert keys[0] == ("lora", "dense", "ce")
    for method in sweep.METHODS:
        assert {(method, t, "ce") for t in ("0.5", "0.7")} <= set(keys)
    assert {(m, "2:4", "ce") for m in sweep.METHODS} <= set(keys)
    assert {k for k in keys if k[2] == "squarehead"} == {(m, "0.7", "squarehead") for m in sweep.SPARSE_METHODS}
    assert skipped == []  # SEFT and SPT keep N:M patterns, so every method runs at 2:4
    lrs = {j.method: j.lr for j in jobs}
    assert lrs == {"masked_lora": 1e-3, "spp": 4e-3, "seft": 1e-3, "spt": 1e-2, "lora": 1e-3}


def test_plan_options_select_and_override():
    assert planned("--methods", "spp", "--targets", "50%,2:4", "--losses", "ce", "--no-dense") == [
        ("spp", "0.5", "ce"), ("spp", "2:4", "ce")]
    assert planned("--methods", "spp,lora", "--targets", "0.5,0.7", "--losses", "squarehead",
                   "--squarehead-targets", "all", "--squarehead-methods", "spp,lora", "--no-dense") == [
        ("spp", "0.5", "squarehead"), ("lora", "0.5", "squarehead"),
        ("spp", "0.7", "squarehead"), ("lora", "0.7", "squarehead")]
    jobs, _ = sweep.plan(sweep.parse_args(["--lr", "spp=3e-3", "--lr", "lora=2e-4,spt=5e-2"]))
    assert {j.method: j.lr for j in jobs} == {"masked_lora": 1e-3, "spp": 3e-3, "seft": 1e-3, "spt": 5e-2,
                                              "lora": 2e-4}


@pytest.mark.parametrize("argv", [["--methods", "qlora"], ["--targets", "1.5"], ["--targets", "4:2"],
                                  ["--lr", "spp:1e-3"], ["--losses", "kl"], ["--squarehead-targets", "x"]])
def test_bad_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_squarehead_targets_stay_among_the_sweep_targets(capsys):
    # asked for SquareHead at 50% only: the default SquareHead target (70%) is not silently run instead
    with pytest.raises(SystemExit):
        sweep.parse_args(["--targets", "0.5", "--losses", "squarehead"])
    assert "--losses squarehead: no SquareHead target among --targets 0.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.parse_args(["--targets", "0.5", "--squarehead-targets", "0.7"])
    assert "--squarehead-targets 0.7 not among --targets 0.5" in capsys.readouterr().err
    assert planned("--methods", "spp", "--targets", "0.5", "--losses", "squarehead", "--squarehead-targets", "0.5",
                   "--no-dense") == [("spp", "0.5", "squarehead")]
    # with the default losses, a sweep without 70% simply has no SquareHead rows
    assert planned("--methods", "spp", "--targets", "2:4", "--no-dense") == [("spp", "2:4", "ce")]


def test_spt_with_sparsegpt_is_not_applicable():
    jobs, skipped = sweep.plan(sweep.parse_args(["--pruner", "sparsegpt", "--targets", "0.5"]))
    assert ("spt", "0.5") in {(j.method, j.target) for j, _ in skipped}
    assert "sparsegpt" in dict(((j.method, j.target), r) for j, r in skipped)[("spt", "0.5")]
    assert all(j.method != "spt" for j in jobs)


def test_second_invocation_runs_nothing(fake_sweep):
    argv = ["--steps", "4", "--seq-len", "16", "--batch-size", "2"]
    status, calls = fake_sweep(*argv)
    assert status == 0 and len(calls) == 20
    assert {flags(c)["method"] for c in calls if flags(c).get("pattern") == "2:4"} == set(sweep.METHODS)
    lines = fake_sweep.results.read_text().splitlines()
    assert len(lines) == 20
    status, calls = fake_sweep(*argv)
    assert status == 0 and calls == []
    assert fake_sweep.results.read_text().splitlines() == lines
    # a different budget is a different set of rows
    status, calls = fake_sweep(*argv[:-1], "4", "--methods", "spp", "--no-dense", "--losses", "ce")
    assert len(calls) == 3


def test_sweep_records_the_settings_recovery_rows_lack(fake_sweep):
    fake_sweep("--methods", "spp", "--targets", "0.5", "--losses", "ce", "--no-dense", "--lr", "spp=5e-5",
               "--eval-windows", "3", "--eval-seq-len", "32", "--calib-samples", "2", "--calib-seq-len", "16",
               "--extra-args", "--spp-r 4")
    (row,) = [json.loads(line) for line in fake_sweep.results.read_text().splitlines()]
    assert row["lr"] == 5e-5  # exact, though recovery.py rounded it to 0.0001
    assert (row["eval_windows"], row["eval_seq_len"], row["calib_samples"], row["calib_seq_len"]) == (3, 32, 2, 16)
    assert row["extra_args"] == "--spp-r 4"


def test_key_matching_against_rows_recovery_wrote_itself(fake_sweep):
    """A row from a direct recovery.py run (no loss, eval or calibration fields) counts as done with
    recovery.py's defaults; a row differing in any part of the key does not."""
    direct = dict(method="spp", pruner="wanda", sparsity=0.5, pattern=None, steps=200, lr=0.004, seq_len=128,
                  batch_size=4, seed=0, ppl_after=39.1)
    fake_sweep.results.write_text(json.dumps(direct) + "\n")
    only_spp = ["--methods", "spp", "--targets", "0.5", "--losses", "ce", "--no-dense"]
    assert fake_sweep(*only_spp) == (0, [])
    for changed in (["--steps", "100"], ["--seq-len", "64"], ["--batch-size", "8"], ["--lr", "spp=3e-3"],
                    ["--seed", "1"], ["--eval-windows", "8"], ["--eval-seq-len", "256"],
                    ["--calib-samples", "32"], ["--calib-seq-len", "128"], ["--pruner", "sparsegpt"],
                    ["--extra-args", "--spp-r 32"]):
        args = sweep.parse_args(only_spp + changed)
        (job,), _ = sweep.plan(args)
        assert sweep.row_key(job.as_row(args)) != sweep.row_key(direct), changed
    args = sweep.parse_args(only_spp)
    (job,), _ = sweep.plan(args)
    assert sweep.row_key(job.as_row(args)) == sweep.row_key(direct)


def test_key_of_squarehead_and_dense_rows():
    base = dict(method="lora", pruner="wanda", sparsity=0.0, pattern=None, steps=200, lr=1e-3, seq_len=128,
                batch_size=4, seed=0)
    # nothing is pruned in the dense row: the pruner and the calibration are irrelevant
    assert sweep.row_key(base) == sweep.row_key({**base, "pruner": "sparsegpt", "calib_samples": 8})
    assert sweep.row_key(base) != sweep.row_key({**base, "sparsity": 0.5})
    assert sweep.row_key({**base, "sparsity": 0.5}) != sweep.row_key({**base, "pattern": "2:4"})
    squarehead = {**base, "sparsity": 0.7, "loss": "squarehead", "squarehead_lambda": 1.0,
                  "teacher": "dense (untuned)"}
    assert sweep.row_key(squarehead) != sweep.row_key({**squarehead, "loss": "ce"})
    assert sweep.row_key(squarehead) != sweep.row_key({**squarehead, "squarehead_lambda": 0.5})
    assert sweep.row_key(squarehead) != sweep.row_key({**squarehead, "teacher": "runs/dense-lora"})
    # CE rows ignore SquareHead's settings; rows before --loss existed are CE
    assert sweep.row_key({**base, "squarehead_lambda": 3.0}) == sweep.row_key({**base, "loss": "ce"})


def test_dry_run_prints_commands_and_runs_nothing(fake_sweep, capsys):
    fake_sweep.results.write_text(json.dumps(fake_row(
        ["--method", "spp", "--pruner", "wanda", "--sparsity", "0.5", "--loss", "ce", "--lr", "0.004",
         "--steps", "200", "--seq-len", "128", "--batch-size", "4", "--seed", "0"])) + "\n")
    status, calls = fake_sweep("--dry-run", "--methods", "spp,spt", "--targets", "0.5,2:4", "--losses", "ce")
    out = capsys.readouterr().out
    assert status == 0 and calls == [] and not (fake_sweep.results.parent / "sweep.md").exists()
    assert "5 rows planned: 1 done" in out and "4 to run" in out and "0 not applicable" in out
    assert "done spp 50% CE" in out
    assert "python benchmarks/recovery.py --method spp --pruner wanda --pattern 2:4 --loss ce --lr 0.004" in out
    assert "--method lora --pruner wanda --sparsity 0 " in out
    assert "--method spt --pruner wanda --pattern 2:4" in out
    assert len(fake_sweep.results.read_text().splitlines()) == 1
    # not applicable combinations are listed with the reason and never reach recovery.py
    status, calls = fake_sweep("--dry-run", "--pruner", "sparsegpt", "--methods", "spt,spp", "--targets", "0.5",
                               "--losses", "ce", "--no-dense")
    out = capsys.readouterr().out
    assert status == 0 and calls == [] and "1 not applicable" in out
    assert "not applicable: spt at 50% (CE): SPT's gradual pruning uses wanda or magnitude" in out


def test_a_failed_row_is_reported_and_retried(fake_sweep, capsys):
    def crash_on_seft(argv):
        if flags(argv)["method"] == "seft":
            raise sweep.RecoveryFailed("recovery.py failed (exit status 1); log: x\nRuntimeError: out of memory")
        return fake_row(argv)

    argv = ["--methods", "seft,spp", "--targets", "0.5", "--losses", "ce", "--no-dense"]
    status, calls = fake_sweep(*argv, runner=crash_on_seft)
    err = capsys.readouterr().err
    assert status == 1 and len(calls) == 2  # spp ran after seft failed
    assert "FAILED seft 50% CE" in err and "out of memory" in err and "1 rows failed" in err
    assert [json.loads(line)["method"] for line in fake_sweep.results.read_text().splitlines()] == ["spp"]
    status, calls = fake_sweep(*argv)
    assert status == 0 and [flags(c)["method"] for c in calls] == ["seft"]


def test_subprocess_runner_returns_the_row_or_the_log_tail(tmp_path, monkeypatch):
    """run_recovery itself, with a stand-in script for recovery.py (the real one loads the 135M model)."""
    script = tmp_path / "fake_recovery.py"
    script.write_text(textwrap.dedent("""
        import json, sys
        argv = sys.argv[1:]
        if "--crash" in argv:
            print("loading model", flush=True)
            sys.exit("ValueError: SEFT cannot keep this layer's 2:4 pattern")
        if "--no-row" in argv:
            sys.exit(0)
        with open(argv[argv.index("--out") + 1], "a") as f:
            f.write(json.dumps({"method": argv[argv.index("--method") + 1], "ppl_after": 12.5}) + "\\n")
    """))
    monkeypatch.setattr(sweep, "RECOVERY_SCRIPT", script)
    log = tmp_path / "logs" / "one.log"
    assert sweep.run_recovery(["--method", "spp"], log) == {"method": "spp", "ppl_after": 12.5}
    assert "fake_recovery.py --method spp" in log.read_text()
    with pytest.raises(sweep.RecoveryFailed, match=r"(?s)exit status 1.*loading model.*cannot keep this layer"):
        sweep.run_recovery(["--method", "seft", "--crash"], log)
    with pytest.raises(sweep.RecoveryFailed, match="no row written"):
        sweep.run_recovery(["--method", "spp", "--no-row"], log)


def test_real_recovery_rows_match_their_keys(tmp_path, monkeypatch):
    """The argv the sweep builds is accepted by recovery.py, and the rows it writes match the jobs' keys
    (else every invocation would run them again): dense, SPT, SquareHead and a lr that recovery.py rounds."""
    text = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine.\n" * 60
    (tmp_path / "wiki.test.raw").write_text(text)
    (tmp_path / "wiki.valid.tokens").write_text(text)
    monkeypatch.setattr(recovery, "load_model_and_tokenizer",
                        lambda path=None: (make_tiny_model("llama"), char_tokenizer()))
    calls = []

    def in_process(argv, log_path):
        calls.append(argv)
        return recovery.main(argv + ["--spt-prompt-length", "2", "--spt-prune-steps", "2"] if "spt" in argv
                             else argv)

    monkeypatch.setattr(sweep, "run_recovery", in_process)
    argv = ["--methods", "masked_lora,spt", "--targets", "0.5", "--losses", "ce,squarehead",
            "--squarehead-targets", "0.5", "--squarehead-methods", "masked_lora", "--lr", "masked_lora=5e-5",
            "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--calib-samples", "2", "--calib-seq-len", "16",
            "--eval-windows", "2", "--eval-seq-len", "16", "--data", str(tmp_path), "--cache-dir", "",
            "--results", str(tmp_path / "rows.jsonl"), "--no-render"]
    assert sweep.main(argv) == 0
    assert [(flags(c)["method"], flags(c).get("loss")) for c in calls] == [
        ("lora", "ce"), ("masked_lora", "ce"), ("spt", "ce"), ("masked_lora", "squarehead")]
    calls.clear()
    assert sweep.main(argv) == 0 and calls == []


def rows_for(fake_sweep, *argv):
    status, _ = fake_sweep(*argv)
    assert status == 0
    return sweep.parse_args(["--results", str(fake_sweep.results), *argv])


def test_markdown_has_a_table_per_target_and_the_comparisons(fake_sweep):
    args = rows_for(fake_sweep)
    md = sweep.render_markdown(args)
    sections = [line for line in md.splitlines() if line.startswith("### ")]
    assert sections == ["### Dense reference (plain LoRA, nothing pruned)", "### 50%", "### 70%", "### 2:4"]
    assert "200 steps of 4 x 128 tokens (102,400 tokens)" in md
    seventy = md.split("### 70%")[1].split("###")[0]
    assert sum(line.startswith("|") for line in seventy.splitlines()) == 2 + 5 + 4  # header, rule, 5 CE, 4 SquareHead
    assert "| wall (min) |" in seventy and "ARC" not in md  # no ARC fields in these rows
    # best exactly-70% recipe: SPP with SquareHead, 100 x 0.8 x 0.8 = 64, against LoRA re-masked's 100
    assert ("Lowest ppl exactly at 70% after merge: spp (SquareHead λ=1), ppl 64.0 = 0.64x plain LoRA "
            "merged-then-re-masked (100.0)") in md
    assert "Not applicable" not in md and "| spt | wanda | 2:4 |" in md
    assert "Not run yet" not in md


def test_markdown_lists_missing_rows_and_skips_inexact_best(fake_sweep):
    def spp_not_exact(argv):
        row = fake_row(argv)
        if row["method"] == "spp":
            row["sparsity_after_merge"] = 0.6987  # lost zeros: not a candidate for the best recipe
        return row

    fake_sweep("--targets", "0.7", "--losses", "ce", "--no-dense", "--methods", "spp,masked_lora,lora",
               runner=spp_not_exact)
    args = sweep.parse_args(["--results", str(fake_sweep.results), "--targets", "0.7"])
    md = sweep.render_markdown(args)
    assert "Lowest ppl exactly at 70% after merge: masked_lora (CE), ppl 90.0 = 0.90x" in md
    missing = md.split("### Not run yet")[1]
    assert "- lora dense reference CE lr=0.001" in missing and "- spt 70% SquareHead λ=1 lr=0.01" in missing
    assert "spp 70% CE" not in missing


def test_markdown_adds_arc_columns_when_rows_have_them(fake_sweep):
    def with_arc(argv):
        return {**fake_row(argv), "arc_easy_acc_before": 0.43, "arc_easy_acc_after": 0.5125,
                "arc_easy_acc_norm_before": 0.41, "arc_easy_acc_norm_after": 0.47}

    fake_sweep("--targets", "0.5", "--losses", "ce", "--no-dense", "--methods", "spp", runner=with_arc)
    md = sweep.render_markdown(sweep.parse_args(["--results", str(fake_sweep.results), "--targets", "0.5",
                                                 "--methods", "spp", "--losses", "ce"]))
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    assert ("| ARC-E acc before (%) | ARC-E acc after (%) | ARC-E acc_norm before (%) | ARC-E acc_norm after (%) "
            "| wall (min) | notes |") in header
    assert "ARC-C" not in header
    assert "| 43.0 | 51.2 | 41.0 | 47.0 | 10 |" in md


def test_render_only_writes_markdown(fake_sweep, tmp_path):
    fake_sweep()
    out_md = tmp_path / "out" / "sweep.md"
    assert sweep.main(["--render-only", "--results", str(fake_sweep.results), "--markdown-out", str(out_md)]) == 0
    assert out_md.read_text().startswith("## Recovery sweep")


def test_exact_means_the_fraction_and_for_n_m_the_kept_mask():
    assert sweep.is_exact({"sparsity_after_merge": 0.7}, "0.7")
    assert not sweep.is_exact({"sparsity_after_merge": 0.6998}, "0.7")
    assert sweep.is_exact({"sparsity_after_merge": 0.5, "mask_identical": True}, "2:4")
    assert not sweep.is_exact({"sparsity_after_merge": 0.5, "mask_identical": False}, "2:4")


def with_arc_figures(argv):
    """A fake row that holds ARC-Easy figures when the sweep asked for them."""
    row, f = fake_row(argv), flags(argv)
    if "arc_easy" in f:
        row.update(arc_easy_acc_before=0.3, arc_easy_acc_after=0.35, arc_easy_questions=int(f["arc_easy"]))
    return row


def test_arc_easy_is_not_part_of_the_key_but_rows_without_it_run_again(fake_sweep):
    common = ("--targets", "0.5", "--losses", "ce", "--no-dense")
    fake_sweep("--methods", "spp,masked_lora", *common, runner=with_arc_figures)  # no ARC: the old rows
    # a row run by hand with the flag among the extra args is the same experiment as one with --arc-easy
    status, calls = fake_sweep("--methods", "seft", *common, "--extra-args=--arc-easy=8", runner=with_arc_figures)
    assert status == 0 and len(calls) == 1
    assert sweep.flags_of({"extra_args": "--spp-r 4 --arc-easy 8 --arc-dir=x"}) == "--spp-r 4"

    status, calls = fake_sweep("--methods", "spp,masked_lora,seft", *common, "--arc-easy", "8",
                               runner=with_arc_figures)
    assert status == 0
    assert sorted(flags(c)["method"] for c in calls) == ["masked_lora", "spp"]  # seft already has ARC on 8
    assert all(flags(c)["arc_easy"] == "8" for c in calls)
    status, calls = fake_sweep("--methods", "spp,masked_lora,seft", *common, "--arc-easy", "8",
                               runner=with_arc_figures)
    assert calls == []  # resumable: every row now has it
    # other question counts are other measurements: asked for, they run again
    assert len(fake_sweep("--methods", "seft", *common, "--arc-easy", "16", runner=with_arc_figures)[1]) == 1


def test_markdown_lists_rows_still_without_arc(fake_sweep):
    common = ("--targets", "0.5", "--losses", "ce", "--no-dense")
    fake_sweep("--methods", "spp", *common, runner=with_arc_figures)
    fake_sweep("--methods", "seft", *common, "--arc-easy", "8", runner=with_arc_figures)
    md = sweep.render_markdown(sweep.parse_args(["--results", str(fake_sweep.results), "--methods", "spp,seft",
                                                 *common, "--arc-easy", "8"]))
    assert "the first 8 questions" in md
    no_arc = md.split("### ARC-Easy not measured yet")[1]
    assert "- spp 50% CE" in no_arc and "seft" not in no_arc
    assert "### Not run yet" not in md  # both rows are in the table, one without its ARC columns


def test_several_squarehead_lambdas_are_separate_rows(fake_sweep):
    argv = ("--targets", "0.7", "--no-dense", "--methods", "masked_lora,spp", "--squarehead-lambda", "1,0.1")
    assert planned(*argv) == [("masked_lora", "0.7", "ce"), ("spp", "0.7", "ce")] + [
        (m, "0.7", "squarehead") for _ in range(2) for m in ("masked_lora", "spp")]
    status, calls = fake_sweep(*argv)
    assert status == 0 and sorted(flags(c).get("squarehead_lambda") for c in calls
                                  if flags(c)["loss"] == "squarehead") == ["0.1", "0.1", "1", "1"]
    assert fake_sweep(*argv)[1] == []  # both λ rows count as done
    md = sweep.render_markdown(sweep.parse_args(["--results", str(fake_sweep.results), *argv]))
    seventy = md.split("### 70%")[1].split("###")[0]
    assert seventy.count("SquareHead λ=1 |") == 2 and seventy.count("SquareHead λ=0.1 |") == 2
    assert "SquareHead: λ=1, 0.1" in md


def test_rows_outside_the_plan_at_the_same_budget_are_shown_and_compete_for_best(fake_sweep):
    def by_pruner_and_logit(argv):
        f, row = flags(argv), fake_row(argv)
        if f["pruner"] == "sparsegpt":
            row["ppl_after"] *= 0.7
        if f.get("logit_lambda"):
            row.update(ppl_after=row["ppl_after"] * 0.9, logit_lambda=float(f["logit_lambda"]))
        return row

    common = ("--targets", "0.7", "--no-dense")
    fake_sweep(*common, "--losses", "ce", "--methods", "masked_lora,lora", runner=by_pruner_and_logit)
    fake_sweep(*common, "--losses", "ce", "--methods", "masked_lora,lora", "--pruner", "sparsegpt",
               "--extra-args=--r 16", runner=by_pruner_and_logit)
    fake_sweep(*common, "--losses", "squarehead", "--methods", "masked_lora", "--squarehead-lambda", "0.1",
               "--extra-args=--logit-lambda 1", runner=by_pruner_and_logit)
    fake_sweep(*common, "--losses", "ce", "--methods", "spp", "--steps", "100", runner=by_pruner_and_logit)
    md = sweep.render_markdown(sweep.parse_args(["--results", str(fake_sweep.results), *common,
                                                 "--losses", "ce", "--methods", "masked_lora,lora"]))
    # the 70% table holds the plan's two rows, then the sparsegpt masked_lora, sparsegpt lora and logit rows
    seventy = md.split("### 70%")[1].split("###")[0]
    table = [line for line in seventy.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 2 + 3 and table[1].startswith("| masked_lora | wanda")
    assert "| spp" not in md  # 100 steps: another budget, not shown
    assert "recovery.py flags `--r 16`" in seventy and "SquareHead λ=0.1 + logit KL λ=1" in seventy
    # lowest: SparseGPT masked LoRA, 90 x 0.7 = 63, against the plan's LoRA (100)
    assert ("Lowest ppl exactly at 70% after merge: masked_lora (CE; sparsegpt, lr 0.001, `--r 16`), ppl 63.0 "
            "= 0.63x plain LoRA merged-then-re-masked (100.0).") in md


def test_log_names_differ_by_pruner_and_flags():
    names = set()
    for argv in ([], ["--pruner", "sparsegpt"], ["--extra-args=--logit-lambda 1"],
                 ["--extra-args=--induce --r 32"], ["--extra-args=--arc-easy 500"]):
        args = sweep.parse_args(["--methods", "masked_lora", "--targets", "0.7", "--losses", "ce", "--no-dense", *argv])
        jobs, _ = sweep.plan(args)
        names.add(sweep.log_name(jobs[0], args))
    # the evaluation-only flag makes the same experiment, so the same log as the plain row
    assert names == {"masked_lora-0.7-wanda-ce-lr0.001.log", "masked_lora-0.7-sparsegpt-ce-lr0.001.log",
                     "masked_lora-0.7-wanda-ce-lr0.001-logit_lambda_1.log",
                     "masked_lora-0.7-wanda-ce-lr0.001-induce_r_32.log"}
