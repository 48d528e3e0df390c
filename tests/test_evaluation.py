"""Zero-shot ARC and the evaluate() entry point, on a tiny model with a character tokenizer."""

import json

import pytest
import torch
from conftest import make_tiny_model
from test_cli import char_tokenizer

from sparse_peft.evaluation import arc_zero_shot, choice_log_likelihoods, evaluate, lm_eval_model


def log_likelihood_alone(model, tokenizer, context, continuation):
    """The same score computed one sequence at a time, without padding."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = context_ids + tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        log_probs = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(log_probs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))


def test_batched_choices_equal_scoring_each_alone():
    model, tokenizer = make_tiny_model("llama"), char_tokenizer()
    choices = [" a", " bcd", " efghij"]  # different lengths: the short ones are padded in the batch
    batched = choice_log_likelihoods(model, tokenizer, "Question: xyz\nAnswer:", choices)
    for score, text in zip(batched, choices):
        assert score == pytest.approx(log_likelihood_alone(model, tokenizer, "Question: xyz\nAnswer:", text), abs=1e-4)


def write_arc(path, questions):
    path.write_text("\n".join(json.dumps(q) for q in questions), encoding="utf-8")
    return path


def test_accuracy_follows_the_model_scores(tmp_path):
    model, tokenizer = make_tiny_model("llama"), char_tokenizer()
    stems = ["abc", "hello", "why"]
    texts = ["de", "xyz", "pq"]
    questions_best, questions_worst = [], []
    for stem in stems:
        scores = choice_log_likelihoods(model, tokenizer, f"Question: {stem}\nAnswer:", [f" {t}" for t in texts])
        per_byte = [s / len(f" {t}") for s, t in zip(scores, texts)]
        choices = [{"label": label, "text": t} for label, t in zip("ABC", texts)]
        questions_best.append({"question": {"stem": stem, "choices": choices},
                               "answerKey": "ABC"[max(range(3), key=per_byte.__getitem__)]})
        questions_worst.append({"question": {"stem": stem, "choices": choices},
                                "answerKey": "ABC"[min(range(3), key=per_byte.__getitem__)]})
    best = arc_zero_shot(model, tokenizer, write_arc(tmp_path / "best.jsonl", questions_best), show_progress=False)
    worst = arc_zero_shot(model, tokenizer, write_arc(tmp_path / "worst.jsonl", questions_worst), show_progress=False)
    assert best["questions"] == 3 and best["acc_norm"] == 1.0
    assert worst["acc_norm"] == 0.0
    limited = arc_zero_shot(model, tokenizer, tmp_path / "best.jsonl", limit=2, show_progress=False)
    assert limited["questions"] == 2


def test_evaluate_reads_the_data_folder(tmp_path):
    model, tokenizer = make_tiny_model("llama"), char_tokenizer()
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.test.raw").write_text("the quick brown fox jumps over the lazy dog " * 20)
    (tmp_path / "arc").mkdir()
    question = {"question": {"stem": "abc", "choices": [{"label": "A", "text": "d"}, {"label": "B", "text": "e"}]},
                "answerKey": "A"}
    write_arc(tmp_path / "arc" / "arc_easy_official_test.jsonl", [question] * 2)
    results = evaluate(model, tokenizer, tmp_path, tasks=("wikitext", "arc_easy"), ppl_windows=2, ppl_seq_len=32,
                       show_progress=False)
    assert set(results) == {"wikitext", "arc_easy"}
    assert 1.0 < results["wikitext"]["ppl"] < 1e4
    assert results["arc_easy"]["questions"] == 2
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(model, tokenizer, tmp_path, tasks=("mmlu",))


def test_bad_arc_file_names_the_line(tmp_path):
    model, tokenizer = make_tiny_model("llama"), char_tokenizer()
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": {"stem": "a", "choices": [{"label": "A", "text": "b"}]}, "answerKey": "C"}\n')
    with pytest.raises(ValueError, match="line 1: answerKey 'C'"):
        arc_zero_shot(model, tokenizer, path, show_progress=False)


def test_lm_eval_adapter_explains_a_missing_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name.startswith("lm_eval"):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        lm_eval_model(make_tiny_model("llama"), char_tokenizer())


def test_perplexity_builds_no_autograd_graph():
    """Scoring a model with trainable parameters keeps no activations for a backward."""
    import torch
    from sparse_peft.data import perplexity

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.grad_enabled = torch.nn.Embedding(16, 16), []

        def forward(self, input_ids, use_cache=False):
            self.grad_enabled.append(torch.is_grad_enabled())
            logits = self.embed(input_ids)
            assert not logits.requires_grad
            return type("Out", (), {"logits": logits})()

    model = Tiny()
    ppl = perplexity(model, torch.arange(32) % 16, n_windows=2, seq_len=8, show_progress=False)
    assert ppl > 0 and model.grad_enabled == [False, False]
