"""The text that ships with the package, the splits made from it, and perplexity's refusal."""

import re

import pytest
import torch
from conftest import make_tiny_model

from sparse_peft.data import BUNDLED_TEXT_PARTS, bundled_text, load_text, perplexity, text_splits

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
