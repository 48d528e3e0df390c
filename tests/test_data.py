"""The text that ships with the package, the splits made from it, and perplexity's refusal."""

import re

import pytest
import torch
from conftest import make_tiny_model

from sparse_peft.data import (BUNDLED_TEXT_PARTS, IGNORED_LABEL, bundled_text, load_text, perplexity,
                              placeholder_labels, text_splits, token_ids)

# What the quickstart and the demo draw from each part, in tokens (each word is at least one).
NEEDED_TOKENS = {"train": 20 * 4 * 128, "calibration": 16 * 128, "heldout": 8 * 128}


def article_titles(text: str) -> set[str]:
    return set(re.findall(r"^ = ([^=].*?) = $", text, flags=re.M))


def test_bundled_parts_are_disjoint_articles_large_enough_for_the_quickstart():
    titles = {}
    for part in BUNDLED_TEXT_PARTS:
        text = load_text(bundled_text(part))
        assert len(text.split()) >= NEEDED_TOKENS[part], part
        titles[part] = article_titles(text)
        assert titles[part], part
    assert not titles["train"] & titles["calibration"]
    assert not titles["train"] & titles["heldout"]
    assert not titles["calibration"] & titles["heldout"]


def test_bundled_text_names_the_parts_it_has():
    with pytest.raises(ValueError, match="'test'"):
        bundled_text("test")


def test_text_splits_of_a_file_hold_out_the_end(tmp_path):
    (tmp_path / "t.txt").write_text("".join(chr(97 + i % 26) for i in range(100)), encoding="utf-8")
    splits = text_splits(lambda text: torch.tensor([ord(c) for c in text]), tmp_path / "t.txt")
    assert [splits[p].numel() for p in ("train", "calibration", "heldout")] == [80, 10, 10]
    assert torch.equal(torch.cat([splits["train"], splits["calibration"], splits["heldout"]]),
                       torch.tensor([97 + i % 26 for i in range(100)]))


def test_perplexity_with_no_window_says_why():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="no window to score.*100 tokens"):
        perplexity(model, torch.zeros(100, dtype=torch.long), n_windows=0, seq_len=128, show_progress=False)


def word_tokenizer(words):
    """A fast tokenizer with one token per whitespace-separated word (unknown words: ``[UNK]``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_placeholder_labels_leave_out_every_token_that_overlaps_the_placeholder():
    """Tokens overlapping ``<unk>`` are ignored, also merged with punctuation; a token that only shares
    the unknown-word id, or spells part of the placeholder, is kept: the labels follow the text."""
    tokenizer = word_tokenizer(["a", "b", "<unk>", "(<unk>)", "<unk>,"])
    text = "a <unk> b (<unk>) a <unk>, b <un zzz a"
    ids, labels, count = placeholder_labels(tokenizer, text, "<unk>")
    assert torch.equal(ids, token_ids(tokenizer, text)) and count == 3
    ignored = [word for word, label in zip(text.split(), labels.tolist()) if label == IGNORED_LABEL]
    assert ignored == ["<unk>", "(<unk>)", "<unk>,"]
    kept = labels != IGNORED_LABEL
    assert torch.equal(labels[kept], ids[kept])
    ids, labels, count = placeholder_labels(tokenizer, "a b a", "<unk>")
    assert count == 0 and torch.equal(ids, labels)


def test_placeholder_labels_refuse_an_empty_placeholder_and_need_offsets_only_where_it_occurs():
    with pytest.raises(ValueError, match="empty"):
        placeholder_labels(word_tokenizer(["a"]), "a", "")

    class SlowTokenizer:
        is_fast = False

    with pytest.raises(ValueError, match="SlowTokenizer gives no character offsets"):
        placeholder_labels(SlowTokenizer(), "a <unk>", "<unk>")
    slow = lambda text, **kwargs: {"input_ids": [len(word) for word in text.split()]}  # noqa: E731
    ids, labels, count = placeholder_labels(slow, "ab c def", "<unk>")  # nothing to leave out: no offsets needed
    assert ids.tolist() == labels.tolist() == [2, 1, 3] and count == 0


def test_perplexity_with_labels_scores_only_the_kept_predictions():
    model = make_tiny_model("llama")
    ids = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.arange(64) % 5 == 0, IGNORED_LABEL)
    with torch.no_grad():
        logits = torch.cat([model(input_ids=ids[i * 16:(i + 1) * 16][None]).logits[0, :-1] for i in range(4)])
    targets = torch.cat([labels[i * 16 + 1:(i + 1) * 16] for i in range(4)])
    kept = targets != IGNORED_LABEL
    expected = torch.nn.functional.cross_entropy(logits[kept].float(), targets[kept]).exp().item()
    assert perplexity(model, ids, 4, 16, show_progress=False, labels=labels) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, ids, 4, 16, show_progress=False, labels=ids) == perplexity(model, ids, 4, 16,
                                                                                         show_progress=False)
    assert perplexity(model, ids, 4, 16, show_progress=False, labels=labels) != perplexity(model, ids, 4, 16,
                                                                                           show_progress=False)
    with pytest.raises(ValueError, match="labels have 63 tokens, ids 64"):
        perplexity(model, ids, 4, 16, show_progress=False, labels=labels[:-1])
