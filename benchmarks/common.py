"""Shared helpers for the benchmark scripts. Model loading, token windows and perplexity live in
the package (``sparse_peft.data``) so the examples and the CLI use the same code; this adds the
benchmark defaults and a one-line description of the machine.

Benchmarks run offline on a folder of development assets (``data/wikitext-2/wiki.valid.tokens``,
``wiki.test.raw``, ``data/arc/*.jsonl``, ``models/``): the folder named by ``SPARSE_PEFT_ASSETS``, else a
``shared/`` folder beside the checkout. Every script still takes ``--model`` and ``--data`` so that
users with a model hub or their own text can use it; the library itself never looks for this folder.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from sparse_peft.data import load_model_and_tokenizer, load_text, perplexity, random_windows, token_ids

REPO_ROOT = Path(__file__).resolve().parent.parent


def assets_dir() -> Path | None:
    """The development assets: ``$SPARSE_PEFT_ASSETS``, else ``shared/`` beside the checkout, else None."""
    named = os.environ.get("SPARSE_PEFT_ASSETS")
    candidate = Path(named) if named else REPO_ROOT.parent / "shared"
    return candidate if candidate.is_dir() else None


DEFAULT_DATA_DIR = (assets_dir() or REPO_ROOT.parent / "shared") / "data" / "wikitext-2"

__all__ = ["DEFAULT_DATA_DIR", "assets_dir", "calibration_batches_from_text", "load_model_and_tokenizer", "load_text",
           "machine_info", "perplexity"]


def calibration_batches_from_text(tokenizer, text: str, n: int = 128, seq_len: int = 512, seed: int = 0):
    """``n`` random windows of ``seq_len`` tokens from ``text``, each a ``[1, seq_len]`` batch."""
    return random_windows(token_ids(tokenizer, text), n=n, seq_len=seq_len, seed=seed)


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
