"""sp.recover, its stages and its recipes, the validation split, and ``sparse-peft recover``, on tiny models."""

import argparse
import dataclasses
import json

import pytest
import torch
from conftest import calibration_batches, make_tiny_model
from test_cli import run, workspace  # noqa: F401  (workspace: the fixture of a tiny model on disk)

import sparse_peft as sp
import sparse_peft.recovery as rec
from sparse_peft.data import train_validation_split

IDS = torch.randint(0, 128, (3000,), generator=torch.Generator().manual_seed(0))
# every stage on a budget a tiny model runs in a second
TINY = dict(steps=3, batch_size=2, seq_len=16, calib_samples=4, calib_seq_len=16, lr=1e-2)


def recipe(**fields) -> sp.Recipe:
    return sp.Recipe(**{**TINY, **fields})


def stage_names(report) -> list[str]:
    return [stage.name for stage in report.stages]


def zero_counts(model) -> dict[str, int]:
    return {name: int((lin.weight == 0).sum()) for name, lin in sp.sparsity.named_linears(model)}


@pytest.mark.parametrize("fields, stages", [
    ({}, ["prune", "fine-tune", "merge", "check"]),
    ({"pruner": "sparsegpt", "induce": True}, ["prune", "fine-tune", "merge", "check"]),
    ({"reconstruct": {"epochs": 1, "lr": 1e-3}}, ["copy dense model", "prune", "reconstruct", "fine-tune", "merge",
                                                  "check"]),
    ({"loss": "squarehead", "squarehead_lambda": 0.1, "logit_lambda": 1.0},
     ["copy dense model", "prune", "fine-tune", "merge", "check"]),
    ({"method": None}, ["prune", "check"]),
    ({"method": "spp", "pruner": "magnitude"}, ["prune", "fine-tune", "merge", "check"]),
    ({"method": "seft", "method_options": {"density": 0.1, "update_interval": 1, "grow_window": 1}},
     ["prune", "fine-tune", "merge", "check"]),
    ({"method": "lora"}, ["prune", "fine-tune", "merge", "check"]),
    ({"tune_dense": {"steps": 2}, "steps": 4, "reconstruct": True, "loss": "squarehead"},  # 2 dense, 2 sparse
     ["tune dense", "copy dense model", "prune", "reconstruct", "fine-tune", "merge", "check"]),
    ({"tune_dense": True, "method": None}, ["tune dense", "prune", "check"]),
])
def test_each_stage_on_and_off_ends_exactly_at_the_target(fields, stages):
    merged, report = sp.recover(make_tiny_model("llama"), IDS, sparsity=0.5, recipe=recipe(**fields),
                                show_progress=False)
    assert stage_names(report) == stages
    assert rec.layers_off_target(merged, {"sparsity": 0.5}) == []
    assert report.global_sparsity == pytest.approx(0.5, abs=1e-9)
    assert all(stage.seconds >= 0 for stage in report.stages)
    assert not any("lora" in name for name, _ in merged.named_modules())  # merged, no adapter left
    # every method but SEFT keeps the pruned mask; SEFT moves positions, each layer keeping its count
    assert report.mask_unchanged is (fields.get("method") != "seft")
    json.dumps(report.to_dict())  # JSON-ready, as recipe.json is


def test_mask_is_the_pruners_and_the_weights_are_trained():
    """With Wanda and no induction, the merged mask is the one sp.prune chooses on the same calibration windows,
    and the kept weights moved (the adapter was trained and merged)."""
    r = recipe()
    pruned = make_tiny_model("llama")
    sp.prune(pruned, method="wanda", sparsity=0.5, calibration=rec.calibration_windows(IDS, r), show_progress=False)
    merged, _ = sp.recover(make_tiny_model("llama"), IDS, sparsity=0.5, recipe=r, show_progress=False)
    for name, lin in sp.sparsity.named_linears(merged):
        assert torch.equal(lin.weight != 0, pruned.get_submodule(name).weight != 0), name
    assert any(not torch.equal(lin.weight, pruned.get_submodule(name).weight)
               for name, lin in sp.sparsity.named_linears(merged))


def test_reconstruct_stage_changes_kept_weights_not_the_mask():
    without, _ = sp.recover(make_tiny_model("llama"), IDS, sparsity=0.5, recipe=recipe(method=None),
                            show_progress=False)
    with_it, report = sp.recover(make_tiny_model("llama"), IDS, sparsity=0.5, show_progress=False,
                                 recipe=recipe(method=None, reconstruct={"epochs": 2, "lr": 1e-3}))
    settings = report.stages[stage_names(report).index("reconstruct")].settings
    assert settings["mean_error_after"] <= settings["mean_error_before"]
    for name, lin in sp.sparsity.named_linears(with_it):
        assert torch.equal(lin.weight != 0, without.get_submodule(name).weight != 0), name
    assert any(not torch.equal(lin.weight, without.get_submodule(name).weight)
               for name, lin in sp.sparsity.named_linears(with_it))


def test_nm_pattern_and_given_calibration():
    merged, report = sp.recover(make_tiny_model("llama"), IDS, pattern="2:4", recipe=recipe(),
                                calibration=calibration_batches(n=3), show_progress=False)
    assert all(sp.is_nm_sparse(lin.weight, 2, 4) for _, lin in sp.sparsity.named_linears(merged))
    assert report.stages[0].settings["calibration_batches"] == 3 and report.target == {"pattern": "2:4"}


def test_default_recipes_per_target():
    assert rec.default_recipe({"sparsity": 0.5}) is sp.DEFAULT_RECIPES["0.5"]
    assert rec.default_recipe({"sparsity": 0.7}) is sp.DEFAULT_RECIPES["0.7"]
    assert rec.default_recipe({"pattern": "2:4"}) is sp.DEFAULT_RECIPES["2:4"]
    assert rec.default_recipe({"sparsity": 0.6}) is sp.DEFAULT_RECIPES["fallback"]
    assert rec.default_recipe({"pattern": "4:8"}) is sp.DEFAULT_RECIPES["fallback"]
    # no recipe: the table's, here the 2:4 one (SparseGPT with induction, reconstruction, masked LoRA),
    # on a shortened budget
    small = dataclasses.replace(sp.DEFAULT_RECIPES["2:4"], **TINY)
    merged, report = sp.recover(make_tiny_model("llama"), IDS, pattern="2:4", recipe=small, show_progress=False)
    assert report.recipe.pruner == "sparsegpt" and report.recipe.method == "masked_lora"
    assert {"prune", "reconstruct"} <= {stage.name for stage in report.stages}
    assert all(sp.is_nm_sparse(linear.weight, 2, 4) for _, linear in sp.sparsity.named_linears(merged))


def test_check_names_the_layer_off_target():
    model = make_tiny_model("llama")
    sp.prune(model, method="magnitude", sparsity=0.5, show_progress=False)
    rec.check_sparsity(model, {"sparsity": 0.5})
    name, lin = next(iter(sp.sparsity.named_linears(model)))
    with torch.no_grad():
        lin.weight[lin.weight == 0] = 1.0  # a layer made dense
    with pytest.raises(RuntimeError, match=name):
        rec.check_sparsity(model, {"sparsity": 0.5})
    with pytest.raises(RuntimeError, match="pattern 2:4"):
        rec.check_sparsity(model, {"pattern": "2:4"})


def test_owl_allocation_gives_layers_their_own_counts_and_the_global_target():
    """OWL moves zeros between blocks: the merged layers sit at different sparsities, each exactly at what
    pruning gave it (the mask unchanged), and the layers together exactly at the target."""
    merged, report = sp.recover(make_tiny_model("llama"), IDS, sparsity=0.5, recipe=recipe(allocation="owl"),
                                show_progress=False)
    counts = zero_counts(merged)
    numels = {name: lin.weight.numel() for name, lin in sp.sparsity.named_linears(merged)}
    assert len({round(counts[name] / numels[name], 3) for name in counts}) > 1  # not uniform
    assert sum(counts.values()) == round(0.5 * sum(numels.values()))
    assert report.mask_unchanged and report.stages[0].settings["allocation"] == "owl"
    assert rec.layers_off_target(merged, {"sparsity": 0.5}, counts) == []
    # the uniform check names the layers OWL moved off 50%; a wrong allocation, the layer and the global count
    assert rec.layers_off_target(merged, {"sparsity": 0.5})
    name = next(iter(counts))
    off = rec.layers_off_target(merged, {"sparsity": 0.5}, {**counts, name: counts[name] + 1})
    assert off == [f"{name}: {counts[name]} zeros of {numels[name]}, target {counts[name] + 1} (its OWL allocation)"]
    with torch.no_grad():
        weight = merged.get_submodule(name).weight
        weight.view(-1)[int((weight.view(-1) != 0).nonzero()[0])] = 0.0  # one more zero than allocated
    off = rec.layers_off_target(merged, {"sparsity": 0.5}, counts)
    assert off[0].startswith(f"{name}: {counts[name] + 1} zeros") and off[-1].startswith("global:")


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of sparsity and pattern"),
    ({"sparsity": 0.5, "pattern": "2:4"}, "exactly one"),
    ({"sparsity": 0.0}, r"in \(0, 1\)"),
    ({"sparsity": 1.5}, r"in \(0, 1\)"),
    ({"pattern": "4:2"}, "4:2"),
    ({"sparsity": 0.5, "recipe": "wanda"}, "sp.Recipe"),
    ({"sparsity": 0.5, "recipe": sp.Recipe(method="spt")}, "cannot be merged"),
    ({"sparsity": 0.5, "recipe": sp.Recipe(method_options={"rank": 4})}, "'rank'"),
    ({"sparsity": 0.5, "train_ids": IDS[:100]}, "100 tokens"),
    ({"sparsity": 0.5, "train_ids": IDS.view(30, 100)}, "1-D"),
    ({"sparsity": 0.5, "train_labels": IDS[:-1]}, r"train_labels .* shaped like train_ids \(3000,\)"),
    ({"sparsity": 0.5, "train_labels": IDS.float()}, "integer labels"),
    ({"pattern": "2:4", "recipe": sp.Recipe(allocation="owl")}, "allocation 'owl' .* pattern '2:4'"),
])
def test_bad_input_is_refused_before_any_weight_changes(kwargs, message):
    model = make_tiny_model("llama")
    before = {name: p.clone() for name, p in model.state_dict().items()}
    train_ids = kwargs.pop("train_ids", IDS)
    with pytest.raises(ValueError, match=message):
        sp.recover(model, train_ids, show_progress=False, **kwargs)
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())


@pytest.mark.parametrize("loss", ["ce", "squarehead"])
def test_fine_tune_takes_the_labels_of_the_same_windows(loss, monkeypatch):
    """train_labels are windowed exactly as train_ids: each batch's labels are its own tokens, with
    IGNORED_LABEL where the labels stream has it (here every id divisible by 7), for CE and SquareHead."""
    from sparse_peft.data import IGNORED_LABEL

    labels = IDS.masked_fill(IDS % 7 == 0, IGNORED_LABEL)
    seen = []
    real_train = rec.train
    monkeypatch.setattr(rec, "train", lambda model, batches, *a, **k: seen.append((batches, k["label_batches"]))
                        or real_train(model, batches, *a, **k))
    fields = {"loss": "squarehead", "squarehead_lambda": 0.1} if loss == "squarehead" else {}
    model = make_tiny_model("llama")
    sp.prune(model, method="magnitude", sparsity=0.5, show_progress=False)
    teacher = make_tiny_model("llama") if loss == "squarehead" else None
    rec.fine_tune(model, IDS, recipe(**fields), teacher=teacher, train_labels=labels, show_progress=False)
    batches, label_batches = seen[0]
    assert len(label_batches) == len(batches) == TINY["steps"]
    for batch, batch_labels in zip(batches, label_batches):
        assert torch.equal(batch_labels, batch.masked_fill(batch % 7 == 0, IGNORED_LABEL))
    assert any((batch_labels == IGNORED_LABEL).any() for batch_labels in label_batches)


def test_ignored_labels_change_training_and_labels_equal_to_the_ids_do_not():
    from sparse_peft.data import IGNORED_LABEL

    def merged_weights(train_labels):
        torch.manual_seed(0)
        merged, report = sp.recover(make_tiny_model("llama"), IDS, sparsity=0.5, recipe=recipe(),
                                    train_labels=train_labels, show_progress=False)
        return report, {name: lin.weight.clone() for name, lin in sp.sparsity.named_linears(merged)}

    _, plain = merged_weights(None)
    _, same = merged_weights(IDS.clone())
    report, skipped = merged_weights(IDS.masked_fill(IDS % 3 == 0, IGNORED_LABEL))
    assert all(torch.equal(plain[name], same[name]) for name in plain)
    assert any(not torch.equal(plain[name], skipped[name]) for name in plain)
    fine_tune = next(stage for stage in report.stages if stage.name == "fine-tune")
    assert fine_tune.settings["ignored_label_tokens"] == int((IDS % 3 == 0).sum())


@pytest.mark.parametrize("fields, message", [
    ({"pruner": "owl"}, "pruner"), ({"loss": "kl"}, "loss"), ({"lr": 0}, "lr"), ({"steps": 0}, "steps"),
    ({"logit_lambda": 1.0}, "needs loss 'squarehead'"), ({"reconstruct": {"epoch": 1}}, "reconstruct takes"),
    ({"induce": "yes"}, "induce"), ({"method": "spt", "pruner": "sparsegpt"}, "wanda"), ({"seed": -1}, "seed"),
    ({"method": "spt", "reconstruct": True}, "reconstruct follows one-shot pruning"),
    ({"allocation": "outlier"}, "allocation 'outlier'"), ({"method": "spt", "allocation": "owl"}, "prunes gradually"),
    ({"tune_dense": {"step": 1}}, "tune_dense takes"), ({"tune_dense": {"steps": 200}}, r"in \[1, 199\]"),
    ({"tune_dense": True, "steps": 1}, "cannot be split"), ({"tune_dense": {"lr": -1}}, "tune_dense lr"),
    ({"tune_dense": {"r": 0}}, "tune_dense r"), ({"tune_dense": "half"}, "tune_dense must be"),
])
def test_recipe_refuses_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        sp.Recipe(**fields)


def test_dense_tuning_and_the_method_share_the_budgets_windows_and_the_teacher_is_the_tuned_model(monkeypatch):
    """tune_dense trains plain LoRA on the first windows of one draw and the method on the rest (no window
    twice, recipe.steps in all); the pruner, the reconstruction and the SquareHead teacher see the tuned
    dense model, so its kept weights are the tuned ones."""
    seen, teachers, real_train, real_fine_tune = [], [], rec.train, rec.fine_tune
    monkeypatch.setattr(rec, "train", lambda model, batches, *a, **k: seen.append(batches)
                        or real_train(model, batches, *a, **k))
    monkeypatch.setattr(rec, "fine_tune", lambda *a, **k: teachers.append(k.get("teacher")) or real_fine_tune(*a, **k))
    tuned = recipe(steps=5, tune_dense={"steps": 2, "lr": 5e-2, "r": 4}, method=None)
    model = make_tiny_model("llama")
    original = {name: lin.weight.clone() for name, lin in sp.sparsity.named_linears(model)}
    merged, report = sp.recover(model, IDS, sparsity=0.5, recipe=tuned, show_progress=False)
    assert [len(b) for b in seen] == [2] and report.stages[0].settings["r"] == 4
    changed = [name for name, lin in sp.sparsity.named_linears(merged)
               if not torch.equal(lin.weight[lin.weight != 0], original[name][lin.weight != 0])]
    assert changed and rec.layers_off_target(merged, {"sparsity": 0.5}) == []

    seen.clear()
    full = recipe(steps=5, tune_dense={"steps": 2}, loss="squarehead", squarehead_lambda=0.1)
    _, report = sp.recover(make_tiny_model("llama"), IDS, sparsity=0.5, recipe=full, show_progress=False)
    draw = sp.data.random_windows(IDS, n=5, seq_len=TINY["seq_len"], seed=full.seed + 1, batch_size=TINY["batch_size"])
    assert [len(b) for b in seen] == [2, 3]
    assert all(torch.equal(a, b) for a, b in zip(seen[0] + seen[1], draw))
    assert [stage.settings["steps"] for stage in report.stages if stage.name in ("tune dense", "fine-tune")] == [2, 3]
    teacher, tuned_model = teachers[-1], teachers[0]  # the dense tuning's call has no teacher
    assert tuned_model is None and teacher is not None
    assert not any("lora" in name for name, _ in teacher.named_modules())  # the merged tuned model, not an adapter
    with pytest.raises(ValueError, match=r"windows \(4, 5\) hold no 3 batches"):
        rec.fine_tune(make_tiny_model("llama"), IDS, recipe(), windows=(4, 5), show_progress=False)


def test_recipe_flags_override_the_base_recipe():
    parser = argparse.ArgumentParser()
    rec.add_recipe_flags(parser)
    base = sp.DEFAULT_RECIPES["fallback"]
    assert rec.recipe_from_flags(parser.parse_args([]), base) == base
    changed = rec.recipe_from_flags(parser.parse_args(["--steps", "5", "--r", "16", "--no-induce", "--reconstruct",
                                                       "--reconstruct-epochs", "2"]), base)
    assert (changed.steps, changed.method_options, changed.induce, changed.reconstruct) == (5, {"r": 16}, False,
                                                                                          {"epochs": 2})
    other = rec.recipe_from_flags(parser.parse_args(["--method", "spp", "--spp-r", "4", "--induce-alpha", "0.5"]), base)
    assert (other.method, other.method_options, other.induce) == ("spp", {"r": 4}, {"alpha": 0.5})
    assert rec.recipe_from_flags(parser.parse_args(["--method", "none"]), base).method is None
    assert rec.recipe_from_flags(parser.parse_args(["--allocation", "owl"]), base).allocation == "owl"
    assert rec.recipe_from_flags(parser.parse_args(["--tune-dense"]), base).tune_dense is True
    assert rec.recipe_from_flags(parser.parse_args(["--tune-dense", "--tune-dense-steps", "50"]), base).tune_dense == {
        "steps": 50}
    tuned = dataclasses.replace(base, tune_dense={"steps": 100, "r": 16})
    assert rec.recipe_from_flags(parser.parse_args(["--tune-dense-lr", "1e-3"]), tuned).tune_dense == {
        "steps": 100, "r": 16, "lr": 1e-3}
    assert rec.recipe_from_flags(parser.parse_args(["--no-tune-dense"]), tuned).tune_dense is False


def test_train_validation_split_holds_out_the_end():
    ids = torch.arange(1000)
    train, validation = train_validation_split(ids)
    assert (train.numel(), validation.numel()) == (900, 100)
    assert torch.equal(torch.cat([train, validation]), ids) and int(validation[0]) == 900
    assert train_validation_split(ids, 0.25)[1].numel() == 250
    for fraction in (0, 1, 1.5, True):
        with pytest.raises(ValueError, match="validation_fraction"):
            train_validation_split(ids, fraction)
    with pytest.raises(ValueError, match="5 tokens"):
        train_validation_split(torch.arange(5), 0.1)


# --- the command ---------------------------------------------------------------------------------------

TINY_FLAGS = ["--steps", 2, "--batch-size", 2, "--seq-len", 16, "--calib-samples", 2, "--calib-seq-len", 16]


def test_recover_command_saves_an_exactly_sparse_model_and_its_recipe(workspace, capsys):  # noqa: F811
    w = workspace
    assert run("recover", "--model", w / "base", "--data", w / "text.txt", "--sparsity", 0.5, "--out", w / "out",
               *TINY_FLAGS, "--r", 4) == 0
    out = capsys.readouterr().out
    assert "recipe: pruner=sparsegpt" in out and "| fine-tune |" in out and "global sparsity 50.00%" in out
    record = json.loads((w / "out" / "recipe.json").read_text())
    assert record["target"] == {"sparsity": 0.5} and record["data"] == str(w / "text.txt")
    assert record["recipe"]["pruner"] == "sparsegpt" and record["recipe"]["induce"] is True  # the 50% default
    assert record["recipe"]["method_options"] == {"r": 4} and record["recipe"]["steps"] == 2
    stages = {s["name"]: s["settings"] for s in record["stages"]}
    assert list(stages) == ["tune dense", "copy dense model", "prune", "reconstruct", "fine-tune", "merge", "check"]
    assert stages["tune dense"]["steps"] == stages["fine-tune"]["steps"] == 1  # the 50% default: half of --steps
    recovered = sp.load_sparse(w / "out", show_progress=False)
    assert rec.layers_off_target(recovered, {"sparsity": 0.5}) == []
    assert run("eval", "--model", w / "out", "--data", w / "text.txt", "--seq-len", 16, "--windows", 2) == 0
    assert "perplexity:" in capsys.readouterr().out


def test_recover_command_skips_the_placeholder_on_request(workspace, capsys):  # noqa: F811
    w = workspace
    words = (w / "text.txt").read_text().split()
    (w / "unk.txt").write_text(" ".join("<unk>" if i % 9 == 0 else word for i, word in enumerate(words)) + "\n")
    # 60%: the fallback recipe, whose default trains on every token
    assert run("recover", "--model", w / "base", "--data", w / "unk.txt", "--sparsity", 0.6, "--out", w / "out",
               *TINY_FLAGS, "--skip-placeholder", "<unk>") == 0
    occurrences = (w / "unk.txt").read_text().count("<unk>")
    assert f"--skip-placeholder '<unk>': {occurrences} occurrences" in capsys.readouterr().out
    record = json.loads((w / "out" / "recipe.json").read_text())
    fine_tune = next(stage for stage in record["stages"] if stage["name"] == "fine-tune")
    assert record["skip_placeholder"] == "<unk>" and fine_tune["settings"]["ignored_label_tokens"] >= occurrences
    assert run("recover", "--model", w / "base", "--data", w / "unk.txt", "--sparsity", 0.6, "--out", w / "out2",
               *TINY_FLAGS) == 0
    assert json.loads((w / "out2" / "recipe.json").read_text())["skip_placeholder"] is None


@pytest.mark.parametrize("target, flags, skipped", [
    (["--sparsity", 0.7], [], "<unk>"),  # the 70% default leaves the placeholder out
    (["--sparsity", 0.5], [], "<unk>"),  # so does the 50% one
    (["--sparsity", 0.7], ["--skip-placeholder", ""], None),  # '' trains on every token
    (["--pattern", "2:4"], [], None),  # not measured with it: every token
])
def test_recover_command_skips_the_targets_default_placeholder(workspace, target, flags, skipped):  # noqa: F811
    w = workspace
    words = (w / "text.txt").read_text().split()
    (w / "unk.txt").write_text(" ".join("<unk>" if i % 9 == 0 else word for i, word in enumerate(words)) + "\n")
    assert run("recover", "--model", w / "base", "--data", w / "unk.txt", *target, "--out", w / "out", *TINY_FLAGS,
               "--no-reconstruct", *flags) == 0
    record = json.loads((w / "out" / "recipe.json").read_text())
    fine_tune = next(stage for stage in record["stages"] if stage["name"] == "fine-tune")
    assert record["skip_placeholder"] == skipped
    assert ("ignored_label_tokens" in fine_tune["settings"]) == (skipped is not None)


def test_eval_command_leaves_the_placeholder_out_of_the_perplexity_on_request(workspace, capsys):  # noqa: F811
    w = workspace
    words = (w / "text.txt").read_text().split()
    (w / "unk.txt").write_text(" ".join("<unk>" if i % 5 == 0 else word for i, word in enumerate(words)) + "\n")
    scores = []
    for extra in ((), ("--skip-placeholder", "<unk>")):
        assert run("eval", "--model", w / "base", "--data", w / "unk.txt", "--seq-len", 16, "--windows", 4,
                   "--json", w / "e.json", *extra) == 0
        scores.append(json.loads((w / "e.json").read_text()))
    assert "skip_placeholder" not in scores[0] and scores[1]["skip_placeholder"] == "<unk>"
    assert scores[0]["perplexity"] != scores[1]["perplexity"]
    assert "--skip-placeholder '<unk>':" in capsys.readouterr().out


def test_recover_command_at_2_4_with_reconstruction(workspace):  # noqa: F811
    w = workspace
    assert run("recover", "--model", w / "base", "--data", w / "text.txt", "--pattern", "2:4", "--out", w / "out",
               *TINY_FLAGS, "--method", "spp", "--reconstruct", "--reconstruct-epochs", 1, "--format", "dense") == 0
    record = json.loads((w / "out" / "recipe.json").read_text())
    assert "reconstruct" in [s["name"] for s in record["stages"]] and record["recipe"]["method"] == "spp"
    from transformers import AutoModelForCausalLM

    recovered = AutoModelForCausalLM.from_pretrained(w / "out")
    assert all(sp.is_nm_sparse(lin.weight, 2, 4) for _, lin in sp.sparsity.named_linears(recovered))


@pytest.mark.parametrize("argv, code, message", [
    (["--data", "missing.txt", "--sparsity", 0.5], 1, "--data 'missing.txt': no such file"),
    (["--sparsity", 0.5, "--pattern", "2:4"], 2, None),
    ([], 2, None),
    (["--sparsity", 0], 1, "nothing to prune"),
    (["--sparsity", 0.5, "--method", "spt"], 1, "SPT cannot be merged"),
    (["--sparsity", 0.5, "--lr", -1], 1, "lr must be a number > 0"),
    (["--sparsity", 0.5, "--seq-len", 5000], 1, "need at least 5001"),
    (["--pattern", "2:4", "--allocation", "owl"], 1, "--allocation owl sets unstructured layer sparsities"),
])
def test_recover_command_bad_input_is_one_line(workspace, capsys, argv, code, message):  # noqa: F811
    w = workspace
    argv = [str(w / a) if a == "missing.txt" else a for a in argv]
    data = [] if "--data" in argv else ["--data", w / "text.txt"]
    assert run("recover", "--model", w / "base", "--out", w / "out", *data, *TINY_FLAGS[:2], *argv) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and not (w / "out" / "recipe.json").exists()
    if code == 1:  # one line of reason (transformers' own loading bar may come before it)
        assert [line for line in err.splitlines() if "error" in line] == [err.splitlines()[-1]]
        assert err.splitlines()[-1].startswith("sparse-peft recover: error: ")
        assert message.replace("missing.txt", str(w / "missing.txt")) in err


def test_recover_command_without_data_reads_the_bundled_text(workspace):  # noqa: F811
    w = workspace
    assert run("recover", "--model", w / "base", "--sparsity", "50%", "--out", w / "out", *TINY_FLAGS,
               "--method", "none", "--pruner", "wanda", "--no-induce", "--no-reconstruct",
               "--no-tune-dense") == 0
    record = json.loads((w / "out" / "recipe.json").read_text())
    assert record["data"].endswith("wikitext2_train.txt") and record["recipe"]["method"] is None
    assert [s["name"] for s in record["stages"]] == ["prune", "check"]


def test_recover_command_with_an_owl_allocation(workspace, capsys):  # noqa: F811
    w = workspace
    assert run("recover", "--model", w / "base", "--data", w / "text.txt", "--sparsity", 0.5, "--out", w / "out",
               *TINY_FLAGS, "--method", "none", "--no-reconstruct", "--allocation", "owl") == 0
    assert "every layer checked at its OWL count, all together at the target" in capsys.readouterr().out
    assert json.loads((w / "out" / "recipe.json").read_text())["recipe"]["allocation"] == "owl"
    recovered = sp.load_sparse(w / "out", show_progress=False)
    assert rec.layers_off_target(recovered, {"sparsity": 0.5})  # not every layer at 50%
    assert sp.sparsity_report(recovered).global_sparsity == pytest.approx(0.5, abs=1e-3)
