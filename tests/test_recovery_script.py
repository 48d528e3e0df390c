"""benchmarks/recovery.py end to end on a tiny model: every method and loss writes a sane row."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from test_cli import char_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import recovery  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine.\n" * 60


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    (tmp_path / "wiki.test.raw").write_text(TEXT)
    (tmp_path / "wiki.valid.tokens").write_text(TEXT)
    (tmp_path / "arc").mkdir()
    question = {"question": {"stem": "abc", "choices": [{"label": "A", "text": "de"}, {"label": "B", "text": "fg"}]},
                "answerKey": "A"}
    (tmp_path / "arc" / "arc_easy_official_test.jsonl").write_text("\n".join([json.dumps(question)] * 3))
    monkeypatch.setattr(recovery, "load_model_and_tokenizer", lambda path=None: (make_tiny_model("llama"),
                                                                                 char_tokenizer()))

    def run(*extra):
        out = tmp_path / "rows.jsonl"
        argv = ["--data", str(tmp_path), "--steps", "4", "--seq-len", "16", "--batch-size", "2",
                "--calib-samples", "2", "--calib-seq-len", "16", "--eval-windows", "2", "--eval-seq-len", "16",
                "--cache-dir", "", "--out", str(out), *extra]
        row = recovery.main(argv)
        assert json.loads(out.read_text().splitlines()[-1]) == row
        return row

    return run


@pytest.mark.parametrize("method", ["masked_lora", "spp", "lora"])
def test_mask_keeping_rows(tiny_run, method):
    row = tiny_run("--method", method, "--sparsity", "0.5", "--lr", "1e-2")
    assert row["sparsity_before"] == pytest.approx(0.5, abs=1e-9)
    assert row["sparsity_after_merge"] == pytest.approx(0.5, abs=1e-9)
    assert row["mask_identical"] is True
    assert row["trainable_params"] > 0 and row["steps"] == 4 and row["tokens_seen"] == 4 * 2 * 16
    assert row["ppl_after"] > 1.0
    if method == "lora":
        assert row["sparsity_after_plain_merge"] < 0.01  # peft's own merge densifies


def test_row_records_the_method_options_it_trained_with(tiny_run):
    default, rank2, rank4 = (tiny_run("--method", "masked_lora", "--sparsity", "0.5", *flags)
                             for flags in ((), ("--r", "2"), ("--r", "4")))
    assert "method_options" not in default
    assert rank2["method_options"] == {"r": 2} and rank4["method_options"] == {"r": 4}
    assert rank4["trainable_params"] == 2 * rank2["trainable_params"]


def test_seft_row_moves_positions_keeps_counts(tiny_run):
    row = tiny_run("--method", "seft", "--sparsity", "0.5", "--lr", "1e-2", "--seft-interval", "2",
                   "--seft-density", "0.05")
    assert row["counts_identical"] is True and row["seft_grown"] > 0
    assert row["sparsity_after_merge"] == pytest.approx(0.5, abs=1e-9)


def test_seft_row_at_2_4_keeps_the_pattern(tiny_run):
    row = tiny_run("--method", "seft", "--pattern", "2:4", "--lr", "5e-2", "--seft-interval", "2",
                   "--seft-density", "0.1", "--seft-drop-fraction", "0.5")
    assert row["seft_regrown"] > 0 and row["positions_moved"] > 0  # positions moved, inside their groups
    assert row["pattern_kept"] is True and row["counts_identical"] is True


def test_spt_row_prunes_gradually_to_the_target(tiny_run):
    row = tiny_run("--method", "spt", "--sparsity", "0.5", "--lr", "1e-2", "--spt-prompt-length", "2",
                   "--spt-prune-steps", "2")
    assert row["layers_at_target"] is True
    assert row["sparsity_after_merge"] == pytest.approx(0.5, abs=1e-3)


def test_spt_row_prunes_gradually_to_2_4(tiny_run):
    row = tiny_run("--method", "spt", "--pattern", "2:4", "--lr", "1e-2", "--spt-prompt-length", "2",
                   "--spt-prune-steps", "2")
    assert row["layers_at_target"] is True and row["pattern_kept"] is True
    assert row["sparsity_after_merge"] == pytest.approx(0.5, abs=1e-3)


def test_reconstruction_row_lowers_the_one_shot_error_and_keeps_the_mask(tiny_run):
    row = tiny_run("--method", "masked_lora", "--sparsity", "0.7", "--pruner", "magnitude", "--reconstruct",
                   "--reconstruct-lr", "1e-2", "--reconstruct-epochs", "3")
    before, after = row["reconstruct_error"]  # the blocks' mean error against the dense blocks' outputs
    assert row["reconstruct"] == {"epochs": 3, "lr": 1e-2} and after < before and row["ppl_reconstructed"] > 1
    assert row["sparsity_before"] == pytest.approx(0.7, abs=1e-9) and row["mask_identical"] is True
    assert row["sparsity_after_merge"] == pytest.approx(0.7, abs=1e-9)


def test_tune_dense_row_tunes_before_pruning_on_its_share_of_the_steps(tiny_run, tmp_path):
    plain = tiny_run("--method", "masked_lora", "--sparsity", "0.5", "--lr", "1e-2")
    row = tiny_run("--method", "masked_lora", "--sparsity", "0.5", "--lr", "1e-2", "--tune-dense",
                   "--tune-dense-lr", "5e-2", "--cache-dir", str(tmp_path / "cache"))
    assert plain["tune_dense"] == {} and row["tune_dense"] == {"steps": 2, "lr": 5e-2, "r": 8}
    assert row["ppl_dense"] != plain["ppl_dense"]  # the dense model measured, pruned and distilled from is the tuned
    assert row["mask_identical"] is True and row["sparsity_after_merge"] == pytest.approx(0.5, abs=1e-9)
    assert not (tmp_path / "cache").exists()  # the tuned model depends on the training windows: never cached


def test_reconstruction_refused_without_one_shot_pruning(tiny_run):
    with pytest.raises(SystemExit):
        tiny_run("--method", "spt", "--sparsity", "0.5", "--reconstruct")


def test_arc_easy_before_and_after(tiny_run, tmp_path):
    row = tiny_run("--method", "spp", "--sparsity", "0.5", "--arc-easy", "2", "--arc-dir", str(tmp_path / "arc"))
    assert row["arc_easy_questions"] == 2
    for key in ("arc_easy_acc_before", "arc_easy_acc_after", "arc_easy_acc_norm_before", "arc_easy_acc_norm_after"):
        assert row[key] in (0.0, 0.5, 1.0)


def test_squarehead_loss_row(tiny_run):
    row = tiny_run("--method", "masked_lora", "--sparsity", "0.5", "--lr", "1e-2", "--loss", "squarehead")
    assert row["loss"] == "squarehead" and row["mask_identical"] is True
    assert "logit_lambda" not in row
    with_logits = tiny_run("--method", "masked_lora", "--sparsity", "0.5", "--lr", "1e-2", "--loss", "squarehead",
                           "--logit-lambda", "1")
    assert with_logits["logit_lambda"] == 1.0 and with_logits["mask_identical"] is True
    assert with_logits["ppl_after"] != row["ppl_after"]  # the term reached the training loss
    with pytest.raises(SystemExit):
        tiny_run("--method", "masked_lora", "--sparsity", "0.5", "--logit-lambda", "1")  # CE: no teacher


def test_dense_reference_saved_as_a_teacher(tiny_run, tmp_path):
    from safetensors.torch import load_file

    row = tiny_run("--method", "lora", "--sparsity", "0", "--lr", "1e-2", "--save-merged", str(tmp_path / "teacher"))
    assert row["sparsity_after_merge"] == 0.0
    saved = load_file(tmp_path / "teacher" / "model.safetensors")
    assert any("q_proj" in key for key in saved) and not any("lora" in key for key in saved)


def test_second_run_reuses_pruned_weights_and_before_measurements(tiny_run, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    args = ("--sparsity", "0.5", "--arc-easy", "2", "--arc-dir", str(tmp_path / "arc"), "--cache-dir", str(cache))
    first = tiny_run("--method", "masked_lora", *args)
    assert first["before_from_cache"] is False
    assert len(list(cache.glob("pruned-*.safetensors"))) == 1 and len(list(cache.glob("before-*.json"))) == 1

    import sparse_peft.evaluation as evaluation

    real_arc, calls = evaluation.arc_zero_shot, []  # recovery imports it at call time: the patch is what it runs
    monkeypatch.setattr(evaluation, "arc_zero_shot", lambda *a, **k: calls.append(1) or real_arc(*a, **k))
    second = tiny_run("--method", "spp", *args)
    assert second["before_from_cache"] is True
    assert len(calls) == 1  # only the after pass: the before pass came from the cache
    for key in ("ppl_dense", "ppl_pruned", "arc_easy_acc_before", "arc_easy_acc_norm_before"):
        assert second[key] == first[key]
    assert second["sparsity_before"] == pytest.approx(0.5, abs=1e-9) and second["mask_identical"] is True

    # another evaluation setting is another cache entry, measured afresh
    third = tiny_run("--method", "spp", *args[:-2], "--eval-windows", "1", "--cache-dir", str(cache))
    assert third["before_from_cache"] is False and len(list(cache.glob("before-*.json"))) == 2
    # another allocation is other pruned weights: another cache entry, its row checked at OWL's counts
    owl = tiny_run("--method", "masked_lora", "--allocation", "owl", *args)
    assert owl["before_from_cache"] is False and len(list(cache.glob("pruned-*.safetensors"))) == 2
    assert owl["allocation"] == "owl" and owl["at_target"] is True and owl["mask_identical"] is True
    assert owl["sparsity_after_merge"] == pytest.approx(0.5, abs=1e-4)


def test_validation_split_trains_on_the_first_90_percent_and_scores_the_rest(tiny_run, tmp_path, monkeypatch):
    from sparse_peft.data import perplexity, token_ids

    valid_text = "".join(reversed(TEXT))  # unlike wiki.test.raw, so a score on the wrong text shows
    (tmp_path / "wiki.valid.tokens").write_text(valid_text)
    seen = []
    real_fine_tune = recovery.rec.fine_tune
    monkeypatch.setattr(recovery.rec, "fine_tune", lambda model, ids, *a, **k: seen.append(ids) or real_fine_tune(
        model, ids, *a, **k))
    row = tiny_run("--method", "masked_lora", "--sparsity", "0.5", "--lr", "1e-2", "--eval-split", "validation",
                   "--also-test")
    ids = token_ids(char_tokenizer(), valid_text)
    held_out = ids[ids.numel() - ids.numel() // 10:]
    assert row["eval_split"] == "validation" and row["ppl_after_test"] > 1.0
    assert seen[0].numel() == ids.numel() - held_out.numel() and torch.equal(seen[0], ids[:seen[0].numel()])
    dense = perplexity(make_tiny_model("llama"), held_out, n_windows=2, seq_len=16, show_progress=False)
    assert row["ppl_dense"] == pytest.approx(dense, abs=1e-4)
    assert "eval_split" not in tiny_run("--method", "masked_lora", "--sparsity", "0.5")  # scored on wiki.test.raw
    with pytest.raises(SystemExit):
        tiny_run("--method", "masked_lora", "--sparsity", "0.5", "--also-test")  # needs the validation split


def test_placeholder_left_out_of_a_validation_score_and_of_training_on_request(tiny_run, tmp_path, monkeypatch):
    """Validation rows add the held-out ppl without the placeholder's tokens; --skip-placeholder hands
    fine_tune labels that ignore exactly those tokens of the training part."""
    from sparse_peft.data import IGNORED_LABEL, placeholder_labels

    valid_text = TEXT.replace("fox", "<unk>")
    (tmp_path / "wiki.valid.tokens").write_text(valid_text)
    seen = []
    real_fine_tune = recovery.rec.fine_tune
    monkeypatch.setattr(recovery.rec, "fine_tune", lambda model, ids, *a, **k: seen.append((ids, k["train_labels"]))
                        or real_fine_tune(model, ids, *a, **k))
    flags = ("--method", "masked_lora", "--sparsity", "0.5", "--eval-split", "validation", "--eval-windows", "8")
    plain = tiny_run(*flags)
    assert seen[-1][1] is None and "skip_placeholder" not in plain
    assert plain["ppl_after_without_placeholder"] != plain["ppl_after"]
    skipped = tiny_run(*flags, "--skip-placeholder")
    train_ids, train_labels = seen[-1]
    _, labels, _ = placeholder_labels(char_tokenizer(), valid_text, "<unk>")
    assert skipped["skip_placeholder"] == "<unk>" and torch.equal(train_labels, labels[:train_ids.numel()])
    assert (train_labels == IGNORED_LABEL).any()  # the training part has placeholders
    assert "ppl_after_without_placeholder" not in tiny_run("--method", "masked_lora", "--sparsity", "0.5")
