"""What the benchmark scripts share: their arguments, random models, timing, memory, tables and worker processes.
Model loading, token windows and perplexity live in the package (``sparse_peft.data``), as the examples and the CLI
use the same code. No script in ``benchmarks/`` is named as an installed package (``kernels`` is the Hugging Face
package transformers imports; the kernel timings are ``kernel_timings.py``), because ``benchmarks/`` comes first on
``sys.path``. The development assets (WikiText-2, ARC, the model) and ``SPARSE_PEFT_ASSETS``: docs/results/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
MODEL_HELP = "hub id, local dir or .gguf (default: SmolLM2-135M GGUF)"
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def assets_dir() -> Path | None:
    """The development assets: ``$SPARSE_PEFT_ASSETS``, else ``shared/`` beside the checkout, else None."""
    named = os.environ.get("SPARSE_PEFT_ASSETS")
    candidate = Path(named) if named else REPO_ROOT.parent / "shared"
    return candidate if candidate.is_dir() else None


DEFAULT_DATA_DIR = (assets_dir() or REPO_ROOT.parent / "shared") / "data" / "wikitext-2"


# --- arguments, data and the record of a run --------------------------------------------------------


def comma_list(convert, choices=None):
    """An argparse ``type``: a comma-separated list (blank items dropped), each item through ``convert``
    and, given ``choices``, one of them; ``convert``'s ValueError becomes argparse's usage error."""
    def parse(text: str) -> list:
        try:
            values = [convert(item) for item in text.split(",") if item.strip()]
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        unknown = [value for value in values if choices is not None and value not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(choices)}")
        return values
    return parse


def arg_parser(doc: str, *, model: str | None = None, data: str | None = None,
               threads: int | None = None) -> argparse.ArgumentParser:
    """A parser with ``doc`` as its help and the shared options asked for: ``--model`` and ``--data``
    (the argument is their help text), ``--threads`` (the argument is its default)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if model is not None:
        parser.add_argument("--model", default=None, help=model)
    if data is not None:
        parser.add_argument("--data", default=str(DEFAULT_DATA_DIR), help=data)
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, help="torch threads (intra-op)")
    return parser


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reruns ``script`` (its ``__file__``) with ``argv`` (default: this process's)."""
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


def machine_info() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return (f"{names[0] if names else platform.processor() or platform.machine()}; {os.cpu_count()} CPUs "
            f"visible, torch threads {torch.get_num_threads()}; torch {torch.__version__}; "
            f"Python {platform.python_version()}; {platform.system()} {platform.release()}")


def append(path, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(text)


def append_jsonl(path, rows) -> None:
    append(path, "".join(json.dumps(row) + "\n" for row in rows))


def table_row(cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def markdown_table(header: list[str], align: str, rows) -> str:
    """A markdown table; ``align`` has one letter per column: ``r`` right-aligns it (numbers), ``l`` not."""
    if len(align) != len(header):
        raise ValueError(f"markdown_table: {len(header)} columns but {len(align)} alignments ({align!r})")
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align)
    return "\n".join([table_row(header), rule, *map(table_row, rows)])


# --- models, timing and memory ----------------------------------------------------------------------


def random_llama(*, hidden: int, intermediate: int, layers: int, vocab: int, heads: int, seed: int = 0, **config):
    """A Llama built in code with random weights (no model hub): speed and memory depend on the
    shapes, not on the values. Built on torch's current default device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=heads, **config))


def timed(fn, cuda: bool = False):
    """``fn()`` and the seconds it took: between two CUDA events (the GPU's clock) on CUDA, else wall-clock."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        return result, start.elapsed_time(end) / 1000
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def trim_heap() -> None:
    """Hand the heap's free memory back to the OS (glibc keeps it otherwise, and it would count as held)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the resident set may include freed heap
        pass


def rss_bytes() -> int:
    """The process's resident set now (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    """The largest resident set the process has had (``ru_maxrss``, which Linux reports in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """The peak memory between ``start()`` and ``stop()``. CUDA: ``max_memory_allocated()`` after a reset, over
    ``memory_allocated()`` at the start. CPU: the resident set at the start (after a garbage collection and
    ``trim_heap``) and its peak, which a thread samples every ``interval`` seconds; raised to ``ru_maxrss`` if that
    grew in between, since it is then the exact peak (it cannot be reset, so an earlier, higher peak would hide this
    one). A spike shorter than the interval and under an earlier peak can be missed."""

    def __init__(self, cuda: bool = False, interval: float = 0.005):
        self.cuda, self.interval, self._stop = cuda, interval, threading.Event()

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        trim_heap()
        self.base = self.peak = rss_bytes()
        self._max_rss_at_start = max_rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """The peak minus the level at ``start()``, in bytes (``self.base`` and ``self.peak`` keep both)."""
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return self.peak - self.base
        self._stop.set()
        self._thread.join()
        end = max_rss_bytes()
        self.peak = max(self.peak, rss_bytes(), end if end > self._max_rss_at_start else 0)
        return self.peak - self.base


# --- worker processes -------------------------------------------------------------------------------


class WorkerFailed(RuntimeError):
    def __init__(self, label: str, status: int, output: str):
        self.status, self.output = status, output
        super().__init__(f"{label} worker failed (exit {status}):\n{output[-4000:]}")


def spawn(script: str, argv: list[str], label: str = "", env: dict | None = None) -> dict:
    """Run ``script`` with ``argv`` in a fresh interpreter, so that the memory it measures is its own
    alone; returns the JSON object it printed last on stdout, or raises ``WorkerFailed`` with its
    exit status and stderr (stdout when stderr is empty)."""
    done = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    results = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and results:
        return json.loads(results[-1])
    raise WorkerFailed(label, done.returncode, done.stderr.strip() or done.stdout.strip() or "(no output)")
