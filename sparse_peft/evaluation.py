"""Evaluation of (sparse, fine-tuned) causal LMs from local files: perplexity and zero-shot ARC.

``sp.evaluate(model, tokenizer, data_dir)`` runs the tasks a sparse-peft table reports:

- ``wikitext``: perplexity on windows of ``wikitext-2/wiki.test.raw`` (``sparse_peft.data.perplexity``);
- ``arc_easy`` / ``arc_challenge``: zero-shot multiple choice on ``arc/arc_*_official_test.jsonl``.
  Each choice is scored by the log-likelihood of `` <choice>`` after ``Question: <stem>\\nAnswer:``
  (lm-eval-harness's ARC prompt); ``acc`` picks the highest sum, ``acc_norm`` the highest sum per
  byte of the choice (the harness's length normalisation).

``lm_eval_model(model, tokenizer)`` wraps a model for lm-eval-harness when it is installed, so the
harness's own tasks run on a sparse-peft model (a ``PeftModel`` or a merged one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from ._progress import progress

ARC_FILES = {"arc_easy": "arc_easy_official_test.jsonl", "arc_challenge": "arc_challenge_official_test.jsonl"}
TASKS = ("wikitext",) + tuple(ARC_FILES)


def load_arc(path: str | Path, limit: Optional[int] = None) -> list[dict]:
    """ARC questions from JSON lines (``question.stem``, ``question.choices[].text/label``, ``answerKey``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"ARC file {str(path)!r}: no such file")
    items = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            stem, choices, answer = row["question"]["stem"], row["question"]["choices"], row["answerKey"]
            labels, texts = [c["label"] for c in choices], [c["text"] for c in choices]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"ARC file {str(path)!r} line {line_no}: not an ARC question (question.stem, "
                             "question.choices, answerKey)") from None
        if answer not in labels:
            raise ValueError(f"ARC file {str(path)!r} line {line_no}: answerKey {answer!r} is not one of {labels}")
        items.append({"stem": stem, "labels": labels, "texts": texts, "answer": answer})
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise ValueError(f"ARC file {str(path)!r}: no questions")
    return items


@torch.no_grad()
def choice_log_likelihoods(model, tokenizer, context: str, continuations: Sequence[str]) -> list[float]:
    """Sum of log-probabilities of each continuation's tokens after ``context`` (one padded batch).

    Context and continuation are tokenized separately and concatenated, so every choice is scored
    on the same context tokens. Right padding: a causal model's logits before the padding do not
    depend on it.
    """
    device = next(model.parameters()).device
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False):
        context_ids = [bos] + context_ids
    if not context_ids:
        raise ValueError("choice_log_likelihoods: the context tokenizes to nothing")
    sequences = [context_ids + tokenizer(text, add_special_tokens=False)["input_ids"] for text in continuations]
    width = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
        attention[row, :len(seq)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
    log_probs = logits.log_softmax(dim=-1)
    scores = []
    for row, seq in enumerate(sequences):
        start, end = len(context_ids), len(seq)
        targets = ids[row, start:end].to(device)
        scores.append(log_probs[row, start - 1:end - 1].gather(-1, targets[:, None]).sum().item())
    return scores


def arc_zero_shot(model, tokenizer, path: str | Path, limit: Optional[int] = None,
                  show_progress: bool = True) -> dict:
    """Zero-shot accuracy on an ARC file: ``{"questions", "acc", "acc_norm"}``."""
    items = load_arc(path, limit)
    was_training = model.training
    model.eval()
    correct = correct_norm = 0
    for item in progress(items, f"zero-shot {Path(path).stem}", show_progress):
        scores = choice_log_likelihoods(model, tokenizer, f"Question: {item['stem']}\nAnswer:",
                                        [f" {text}" for text in item["texts"]])
        per_byte = [s / max(1, len(f" {t}".encode("utf-8"))) for s, t in zip(scores, item["texts"])]
        correct += item["labels"][max(range(len(scores)), key=scores.__getitem__)] == item["answer"]
        correct_norm += item["labels"][max(range(len(scores)), key=per_byte.__getitem__)] == item["answer"]
    model.train(was_training)
    return {"questions": len(items), "acc": correct / len(items), "acc_norm": correct_norm / len(items)}


def evaluate(model, tokenizer, data_dir: str | Path, tasks: Sequence[str] = TASKS,
             limit: Optional[int] = None, ppl_windows: int = 24, ppl_seq_len: int = 512,
             show_progress: bool = True) -> dict:
    """Perplexity and zero-shot accuracy from local files.

    Args:
        data_dir: the folder holding ``wikitext-2/wiki.test.raw`` and ``arc/*.jsonl`` (see ``ARC_FILES``).
        tasks: any of ``"wikitext"``, ``"arc_easy"``, ``"arc_challenge"``.
        limit: at most this many questions per ARC task (``None``: all).
    Returns ``{"wikitext": {"ppl", "windows", "seq_len"}, "arc_easy": {"questions", "acc", "acc_norm"}, ...}``.
    """
    from .data import load_text, perplexity, token_ids

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"evaluate: unknown task(s) {unknown}; choose from {TASKS}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"evaluate: data_dir {str(data_dir)!r} is not a directory")
    results = {}
    for task in tasks:
        if task == "wikitext":
            ids = token_ids(tokenizer, load_text(data_dir / "wikitext-2" / "wiki.test.raw"))
            results[task] = {"ppl": perplexity(model, ids, n_windows=ppl_windows, seq_len=ppl_seq_len),
                             "windows": ppl_windows, "seq_len": ppl_seq_len}
        else:
            results[task] = arc_zero_shot(model, tokenizer, data_dir / "arc" / ARC_FILES[task], limit=limit,
                                          show_progress=show_progress)
    return results


def lm_eval_model(model, tokenizer, batch_size: int = 1, **kwargs):
    """An lm-eval-harness ``HFLM`` around an in-memory model, e.g.
    ``lm_eval.simple_evaluate(model=sp.evaluation.lm_eval_model(merged, tok), tasks=["arc_easy"])``.

    A ``PeftModel`` works as it is (its forward applies the adapters); merged sparse models too.
    """
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:
        raise ImportError("lm_eval_model needs lm-eval-harness: pip install lm-eval") from error
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
