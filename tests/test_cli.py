"""The ``sparse-peft`` command: the whole flow on a tiny model, resuming, and bad input."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file

import sparse_peft as sp
from sparse_peft.cli import main

CHARS = list("abcdefghijklmnopqrstuvwxyz .,\n")


def char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>"] + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.fixture
def workspace(tmp_path):
    """A tiny dense llama with a character tokenizer saved to disk, and a text file."""
    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    char_tokenizer().save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    words = ["".join(CHARS[i] for i in torch.randint(0, 26, (int(n),), generator=g))
             for n in torch.randint(2, 7, (400,), generator=g)]
    (tmp_path / "text.txt").write_text(" ".join(words) + ".\n", encoding="utf-8")
    return tmp_path


def run(*argv):
    return main([str(a) for a in argv])


def adapter_tensors(directory):
    return load_file(str(directory / "adapter" / "adapter_model.safetensors"))


def test_prune_finetune_eval_export_report(workspace, capsys):
    w = workspace
    text = w / "text.txt"
    assert run("prune", "--model", w / "base", "--out", w / "pruned", "--method", "wanda", "--sparsity", 0.5,
               "--data", text, "--calib-samples", 2, "--calib-seq-len", 32) == 0
    pruned = sp.load_sparse(w / "pruned", show_progress=False)
    pruned_report = sp.sparsity_report(pruned)
    assert abs(pruned_report.global_sparsity - 0.5) < 0.01

    assert run("finetune", "--model", w / "pruned", "--data", text, "--out", w / "tuned", "--method", "spp",
               "--r", 4, "--steps", 3, "--batch-size", 2, "--seq-len", 32, "--lr", 1e-2, "--save-steps", 3) == 0
    tuned = sp.load_sparse(w / "tuned", show_progress=False)
    for name, linear in sp.sparsity.named_linears(tuned):  # same zeros, new values
        assert torch.equal(linear.weight != 0, pruned.get_submodule(name).weight != 0), name
    assert any(not torch.equal(linear.weight, pruned.get_submodule(name).weight)
               for name, linear in sp.sparsity.named_linears(tuned))
    assert (w / "tuned" / "checkpoints" / "checkpoint-3").is_dir()
    assert adapter_tensors(w / "tuned")

    capsys.readouterr()
    assert run("eval", "--model", w / "tuned", "--data", text, "--seq-len", 32, "--windows", 3,
               "--json", w / "eval.json") == 0
    results = json.loads((w / "eval.json").read_text())
    assert f"{results['perplexity']:.4f}" in capsys.readouterr().out
    ids = sp.data.token_ids(char_tokenizer(), text.read_text())
    assert results["perplexity"] == pytest.approx(sp.data.perplexity(tuned, ids, n_windows=3, seq_len=32,
                                                                      show_progress=False), rel=1e-6)

    assert run("export", "--model", w / "tuned", "--out", w / "dense", "--format", "dense") == 0
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(w / "dense")
    for name, tensor in tuned.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name

    assert run("report", "--model", w / "dense", "--out", w / "report.md") == 0
    report_md = (w / "report.md").read_text()
    assert report_md.strip() == sp.sparsity_report(exported).to_markdown().strip()
    assert "model.layers.0.self_attn.q_proj" in report_md



def test_prune_fit_4bit_puts_kept_weights_on_the_grid(workspace, capsys):
    from sparse_peft.sparsity.fit_4bit import CODE_BOOKS

    w = workspace
    assert run("prune", "--model", w / "base", "--out", w / "pruned", "--method", "magnitude", "--sparsity", 0.5,
               "--fit-4bit", "nf4") == 1  # the fitting needs calibration text
    assert "--fit-4bit nf4 needs calibration text: pass --data" in capsys.readouterr().err
    assert run("prune", "--model", w / "base", "--out", w / "pruned", "--method", "wanda", "--sparsity", 0.5,
               "--data", w / "text.txt", "--calib-samples", 2, "--calib-seq-len", 32, "--fit-4bit", "nf4") == 0
    assert "kept weights on the nf4 grid" in capsys.readouterr().out
    codes = torch.tensor(CODE_BOOKS["nf4"])
    for name, linear in sp.sparsity.named_linears(sp.load_sparse(w / "pruned", show_progress=False)):
        blocks = linear.weight.detach().reshape(-1, 64)
        scaled = blocks / blocks.abs().amax(1, keepdim=True)  # each block in units of its largest magnitude
        assert torch.allclose(scaled.unsqueeze(-1).sub(codes).abs().amin(-1), torch.zeros(()), atol=1e-6), name
        assert abs(sp.sparsity.sparsity_of(linear.weight) - 0.5) < 0.02, name

def test_finetune_seft_moves_positions_and_keeps_counts(workspace):
    w = workspace
    text = w / "text.txt"
    assert run("prune", "--model", w / "base", "--out", w / "pruned", "--method", "magnitude", "--sparsity", 0.5) == 0
    assert run("finetune", "--model", w / "pruned", "--data", text, "--out", w / "tuned", "--method", "seft",
               "--density", 0.05, "--update-interval", 2, "--steps", 4, "--batch-size", 2, "--seq-len", 32,
               "--lr", 1e-2, "--save-steps", 4) == 0
    pruned, tuned = sp.load_sparse(w / "pruned", show_progress=False), sp.load_sparse(w / "tuned", show_progress=False)
    moved = 0
    for name, linear in sp.sparsity.named_linears(tuned):
        before = pruned.get_submodule(name).weight != 0
        assert int((linear.weight != 0).sum()) == int(before.sum()), name  # same count per layer
        moved += int(((linear.weight != 0) & ~before).sum())
    assert moved > 0  # the topology really moved


def test_finetune_resume_matches_uninterrupted_run(workspace):
    w = workspace
    assert run("prune", "--model", w / "base", "--out", w / "pruned", "--method", "magnitude",
               "--sparsity", 0.5) == 0
    common = ["--model", w / "pruned", "--data", w / "text.txt", "--method", "masked_lora", "--r", 2,
              "--steps", 4, "--batch-size", 2, "--seq-len", 16, "--lr", 1e-2, "--save-steps", 2]
    assert run("finetune", *common, "--out", w / "full") == 0
    # A run "killed" after step 2: only its first checkpoint exists; resume it to the end.
    (w / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(w / "full" / "checkpoints" / "checkpoint-2", w / "cut" / "checkpoints" / "checkpoint-2")
    assert run("finetune", *common, "--out", w / "cut", "--resume-from-checkpoint") == 0
    full, resumed = adapter_tensors(w / "full"), adapter_tensors(w / "cut")
    assert set(full) == set(resumed)
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=1e-5, atol=1e-6, msg=name)
    a = sp.load_sparse(w / "full", show_progress=False)
    b = sp.load_sparse(w / "cut", show_progress=False)
    for name, linear in sp.sparsity.named_linears(a):
        assert torch.equal(linear.weight != 0, b.get_submodule(name).weight != 0), name


def test_arc_zero_shot(workspace, capsys):
    w = workspace
    questions = [{"question": {"stem": "abc", "choices": [{"label": "A", "text": "de"}, {"label": "B", "text": "xy"}]},
                  "answerKey": "A"} for _ in range(3)]
    (w / "arc.jsonl").write_text("\n".join(json.dumps(q) for q in questions), encoding="utf-8")
    assert run("eval", "--model", w / "base", "--arc", w / "arc.jsonl", "--json", w / "zs.json") == 0
    zero_shot = json.loads((w / "zs.json").read_text())["zero_shot"]
    assert zero_shot["questions"] == 3 and zero_shot["acc"] in (0.0, 1.0)  # same question thrice
    (w / "bad.jsonl").write_text('{"question": {"stem": "a"}}\n', encoding="utf-8")
    capsys.readouterr()
    assert run("eval", "--model", w / "base", "--arc", w / "bad.jsonl") == 1
    assert "line 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv, code, message", [
    (["prune", "--model", "{base}", "--out", "{tmp}/o", "--sparsity", "1.5"], 2, "must be in [0, 1)"),
    (["prune", "--model", "{tmp}/missing", "--out", "{tmp}/o", "--sparsity", "0.5", "--method", "magnitude"],
     1, "no such file or directory"),
    (["prune", "--model", "{base}", "--out", "{tmp}/o", "--sparsity", "0.5", "--method", "wanda"], 1, "needs calibration"),
    (["prune", "--model", "{base}", "--out", "{tmp}/o", "--pattern", "2:5", "--method", "magnitude"], 1, "M=5"),
    (["eval", "--model", "{base}", "--data", "{tmp}/nope.txt"], 1, "no such file"),
    (["eval", "--model", "{base}", "--data", "{tmp}/text.txt", "--seq-len", "100000"], 1, "fewer than --seq-len"),
    (["finetune", "--model", "{base}", "--data", "{tmp}/text.txt", "--out", "{tmp}/o", "--method", "lora"], 2,
     "invalid choice"),
    (["finetune", "--model", "{base}", "--data", "{tmp}/text.txt", "--out", "{tmp}/o", "--steps", "1",
      "--resume-from-checkpoint"], 1, "no checkpoint"),
    (["finetune", "--model", "{base}", "--data", "{tmp}/text.txt", "--out", "{tmp}/o", "--method", "spt"], 1,
     "--method spt: SPT cannot be merged"),
    (["report", "--model", "{tmp}/text.txt"], 1, "--model"),
    ([], 2, "required"),
])
def test_bad_input_exits_with_one_line(workspace, capsys, argv, code, message):
    argv = [a.format(base=workspace / "base", tmp=workspace) for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err
    if code == 1:  # one line of reason (transformers' own loading bar may come before it)
        assert [line for line in err.splitlines() if "error" in line] == [err.splitlines()[-1]]
        assert err.splitlines()[-1].startswith(f"sparse-peft {argv[0]}: error: ")


def test_corrupted_checkpoint_is_a_one_line_error(workspace, capsys):
    w = workspace
    assert run("prune", "--model", w / "base", "--out", w / "pruned", "--method", "magnitude", "--sparsity", 0.5) == 0
    weights = w / "pruned" / "sparse_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    capsys.readouterr()
    assert run("eval", "--model", w / "pruned", "--data", w / "text.txt", "--seq-len", 32) == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("sparse-peft eval: error: ") and "truncated" in last_line


def truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


def flip_header_byte(path):
    raw = bytearray(path.read_bytes())
    raw[12] ^= 0xFF  # inside the JSON header that follows the 8-byte length
    path.write_bytes(bytes(raw))


def assert_one_line_naming(err, command, file):
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line.lower()] == [err.splitlines()[-1]]
    last_line = err.splitlines()[-1]
    assert last_line.startswith(f"sparse-peft {command}: error: ") and str(file) in last_line


@pytest.mark.parametrize("damage", [truncate, flip_header_byte])
@pytest.mark.parametrize("command", ["report", "eval"])
def test_damaged_transformers_checkpoint_is_a_one_line_error(workspace, capsys, command, damage):
    weights = workspace / "base" / "model.safetensors"
    damage(weights)
    extra = ["--data", workspace / "text.txt", "--seq-len", 32] if command == "eval" else []
    assert run(command, "--model", workspace / "base", *extra) == 1
    assert_one_line_naming(capsys.readouterr().err.strip(), command, weights)


@pytest.mark.parametrize("damage", [truncate, flip_header_byte])
def test_damaged_sparse_checkpoint_is_a_one_line_error(workspace, capsys, damage):
    w = workspace
    assert run("prune", "--model", w / "base", "--out", w / "pruned", "--method", "magnitude", "--sparsity", 0.5) == 0
    weights = w / "pruned" / "sparse_model.safetensors"
    damage(weights)
    capsys.readouterr()
    assert run("report", "--model", w / "pruned") == 1
    assert_one_line_naming(capsys.readouterr().err.strip(), "report", weights)


def test_report_png_or_message(workspace, capsys):
    w = workspace
    assert run("report", "--model", w / "base", "--png", w / "layers.png") == 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in capsys.readouterr().err
        assert not (w / "layers.png").exists()
    else:
        assert (w / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_installed_entry_point_help():
    exe = shutil.which("sparse-peft")
    cmd = [exe] if exe else [sys.executable, "-m", "sparse_peft.cli"]
    for sub in ([], ["prune"], ["finetune"], ["recover"], ["eval"], ["export"], ["report"], ["demo"]):
        result = subprocess.run(cmd + sub + ["--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "usage: sparse-peft" in result.stdout
    assert exe is not None, "the sparse-peft console script is not installed (pip install -e .)"


def test_demo_runs_the_whole_flow(workspace, capsys):
    w = workspace
    assert run("demo", "--model", w / "base", "--data", w / "text.txt", "--out", w / "demo", "--steps", 2,
               "--seq-len", 16, "--windows", 2, "--calib-samples", 2, "--sparsity", 0.6) == 0
    out = capsys.readouterr().out
    assert out.count("perplexity:") == 3 and "$ sparse-peft finetune" in out
    summary = out[out.index("\ndemo: "):]
    assert "wanda 60%, then spp for 2 steps" in summary and "every layer's mask unchanged: True" in summary
    assert "| " not in summary  # the per-layer table goes to the file, not the screen
    tuned = sp.load_sparse(w / "demo" / "tuned", show_progress=False)
    assert abs(sp.sparsity_report(tuned).global_sparsity - 0.6) < 0.01
    assert "Global sparsity" in (w / "demo" / "report.md").read_text()
    # --data is cut into disjoint parts at white space: the held-out text is the file's last tenth
    text = (w / "text.txt").read_text()
    parts = [(w / "demo" / "text" / f"{part}.txt").read_text() for part in ("train", "calibration", "heldout")]
    assert "".join(parts) == text and 0.09 < len(parts[2]) / len(text) < 0.11 and parts[2][0] == " "


def test_demo_without_data_runs_on_the_bundled_text(workspace, capsys):
    w = workspace
    assert run("demo", "--model", w / "base", "--out", w / "demo", "--steps", 1, "--seq-len", 16, "--windows", 2,
               "--calib-samples", 2, "--method", "masked_lora") == 0
    out = capsys.readouterr().out
    assert "wikitext2_heldout.txt" in out and "wikitext2_calibration.txt" in out and "wikitext2_train.txt" in out
    assert "every layer's mask unchanged: True" in out
    assert not (w / "demo" / "text").exists()


def test_demo_refuses_a_text_too_short_to_split(workspace, capsys):
    (workspace / "short.txt").write_text("two words", encoding="utf-8")
    assert run("demo", "--model", workspace / "base", "--data", workspace / "short.txt",
               "--out", workspace / "demo") == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "9 characters" in err and "calibration part is empty" in err
