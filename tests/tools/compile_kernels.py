"""Compile every Triton kernel in ``sparse_peft/kernels/`` for NVIDIA GPUs on a machine without one.

    python tests/tools/compile_kernels.py                         # sm_90 and sm_80, fp16/bf16/fp32
    python tests/tools/compile_kernels.py --all-specializations   # + 1-token training, 2..16-token decode, TF32
    python tests/tools/compile_kernels.py --targets 90 --dtypes bf16 --kernels spp --jobs 8
    python tests/tools/compile_kernels.py --list                  # the recorded launches, nothing compiled

Why: the tests run the kernels in Triton's CPU interpreter (``TRITON_INTERPRET=1``), which executes
their Python bodies with numpy and never calls Triton's compiler. The GPU autotune lists are not
even used there (``sparse_peft/kernels/_common.autotune_configs`` swaps in one small config), nor are bf16
tiles (the wrappers cast them to fp32 in the interpreter, ``_common.compute_dtype``). A kernel
that passes every test can still fail on the first GPU it meets: a ``tl.dot`` shape or dtype the
NVIDIA backend rejects, a layout conversion or pipelining pass that fails for one config, a config
whose shared memory exceeds the GPU's. This script runs the real compiler (``triton.compile`` with
an explicit ``GPUTarget``; Triton ships ``ptxas``, so it goes down to a cubin) for every kernel,
every GPU autotune config, every input dtype and every target, with the argument types the host
wrappers really launch with.

How, in two processes (Triton decides at import time whether kernels are interpreted or compiled,
and the kernel modules pick their autotune lists at import time too, so one process cannot do both):

1. Record (a subprocess with ``TRITON_INTERPRET=1``): call the public ops of ``sparse_peft.ops``
   with ``backend="triton"`` on small CPU tensors (``spp_linear`` and ``masked_linear`` forward and
   backward, ``sddmm`` with a bool mask and with int64 indices, ``bitmask_linear`` on a
   ``pack_bitmask`` weight; with and without bias) and capture every kernel launch
   at ``InterpretedFunction.run``, the one call every launch goes through in the interpreter,
   below the autotuner. Each launch's arguments are specialized by Triton's own JIT binder for the
   CUDA backend, the code that turns a GPU launch's arguments into its compile signature: tensor
   -> ``*fp16``/``*bf16``/``*fp32``/``*i64``/``*u8``..., int -> ``i32``/``i64`` by value, an int
   equal to 1 -> a constexpr, a multiple of 16 (or a 16-byte-aligned pointer) -> the
   ``tt.divisibility=16`` hint, float -> ``fp32``. So the recorded signature, constexprs and hints
   are the ones the same call would compile on a GPU.

   Two deviations from a plain interpreter run make the recording the GPU's:

   * ``compute_dtype`` is replaced, in every kernel module, by its GPU rule (the same function
     evaluated with ``INTERPRET`` off): on a GPU bf16 tiles stay bf16, so the wrappers must pass
     bf16 tensors, not the interpreter's fp32 copies. Tensors the wrappers keep in fp32 whatever
     the input (SPP's ``b`` and its fp32 gradients, sddmm's values) stay ``*fp32``.
   * The kernels are not executed (their outputs stay uninitialized): which launches happen, and
     with which argument types, depends on shapes, dtypes and flags, never on values, and the
     interpreter's numpy emulation of a bf16 ``tl.dot`` is beside the point here.

   Which calls (``Scope``): each distinct launch costs a compile per config and target, one to
   several seconds each, so by default the training ops see a 32-token batch, the decode kernel
   one token, and fp32 torch's default TF32 switch (off: ``DOT_PRECISION="ieee"``).
   ``--all-specializations`` adds one token through the training ops, 2..16 decode tokens and fp32
   with ``torch.backends.cuda.matmul.allow_tf32`` on (``"tf32"``, the ``fp32+tf32`` rows; the
   kernels follow torch's switch, ``_common.dot_precision``): about three times the compiles.

2. Compile (this process, ``TRITON_INTERPRET=0``, a pool of ``--jobs`` workers): each distinct
   recorded launch x each config of the kernel's GPU autotune list x each target. A config supplies
   its block-size constexprs and its ``num_warps``/``num_stages`` (exactly what the autotuner adds
   to the launch); the rest is the recording. A result is ``ok`` when ``triton.compile`` returned a
   kernel with a cubin and the kernel's shared memory fits the target. Triton checks the latter
   only when a GPU loads the kernel (``OutOfResources``), and the autotuner, like for a ptxas error,
   then silently drops the config; when no config is left it still picks one and the op fails.
   Compiles use a fresh, temporary Triton cache, so every one really runs.

The table has one row per kernel, dtype, config and target: ``ok (N launches, smem <= S)``, N
being the distinct specializations that compiled for it, or the first error (else the largest
shared-memory excess). Then: compile errors in full, the configs over the shared memory, and
``NO CONFIG LEFT`` for launches that no config of the list can serve on a target (the call fails
there). ``--json FILE`` writes every compile's result. Exit status 1 if a kernel would fail on a target (a
compile error, or a launch that no config can serve) or an autotuned kernel was never launched by
the recording (a new kernel without a recorded call); configs over the shared memory alone are
reported, not failed, since the autotuner drops them.

What this cannot catch: anything that happens at run time (wrong results, races, illegal memory
accesses, launch failures from the grid or register use: ``num_warps`` x registers is only known
once the driver loads the cubin), specializations the recorded calls do not produce (a
non-contiguous input whose inner stride is not 1, sizes that are not multiples of 16 (the shapes
here are LLM-like), the scope's token counts), and other GPUs or Triton versions than the ones
given (``--targets 89`` checks an L4/L40/RTX 4090's 99 KiB of shared memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context

# Nothing here imports torch or triton at module level: the two phases need triton imported with
# different TRITON_INTERPRET settings, and the spawned compile workers re-import this module.

KERNELS_PACKAGE = "sparse_peft.kernels"
DTYPE_LABELS = ("fp16", "bf16", "fp32")
TORCH_DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
#: The fp32 recording with torch's TF32 switch on (``DOT_PRECISION="tf32"``).
FP32_TF32_LABEL = "fp32+tf32"
DEFAULT_TARGETS = (90, 80)
#: Largest shared memory one block may use (bytes; CUDA's cudaDevAttrMaxSharedMemoryPerBlockOptin),
#: which is what Triton compares a kernel's ``metadata.shared`` with when it loads it on a GPU.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}

# The recorded calls are shaped like an LLM layer: every size a multiple of 16 (4096, 11008 are),
# so ints and strides get the divisibility hint they get at real shapes; in = 128 makes the packed
# bitmask's row 16 bytes wide, as at in = 4096. r = 16 is SPP's default rank.
OUT_FEATURES, IN_FEATURES, SPP_RANK = 64, 128, 16


@dataclass(frozen=True)
class Scope:
    """Which calls are recorded: each distinct launch they produce costs one compile per config and
    target (1 to 7 s each on one core), so the default keeps to the common ones."""

    #: Tokens of spp_linear/masked_linear (forward and backward) and sddmm.
    matmul_tokens: tuple
    #: Tokens of bitmask_linear (its decode kernel serves 1..16).
    decode_tokens: tuple
    #: Whether fp32 is also recorded with torch's TF32 switch on.
    tf32: bool


#: A training batch (a multiple of 16) through the training ops; one-token decode through
#: bitmask_linear; fp32 with torch's default (TF32 off).
DEFAULT_SCOPE = Scope(matmul_tokens=(32,), decode_tokens=(1,), tf32=False)
#: Also: one token through the training ops (generation with an unmerged SPP layer; an int equal to
#: 1 compiles as a constexpr, so it is a signature of its own), every decode token count (1, 16 and
#: the rest specialize three ways), and fp32 with TF32 on (e.g. HF Trainer's ``tf32=True``).
ALL_SCOPE = Scope(matmul_tokens=(1, 32), decode_tokens=tuple(range(1, 17)), tf32=True)


# --- phase 1: recording, in the interpreter ----------------------------------------------------------


@dataclass
class Launch:
    """One kernel launch as the GPU's JIT would specialize it."""

    module: str  # e.g. sparse_peft.kernels.sddmm
    kernel: str  # the @triton.jit function's name
    signature: dict  # parameter -> Triton type ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict  # parameter -> value, for every "constexpr" entry of the signature
    hints: dict  # parameter -> Triton's specialization string ("D": divisible by 16)
    options: dict  # the launch's compile options (num_warps, num_stages, ...)
    dtype: str  # which recording produced it: fp16, bf16, fp32, fp32+tf32
    call: str  # which op call launched it

    def identity(self) -> str:
        """What makes two launches the same compile (the dtype and call labels do not)."""
        return json.dumps([self.module, self.kernel, self.signature, self.constexprs, self.hints, self.options],
                          sort_keys=True)


class LaunchRecorder:
    """Replaces the interpreter's kernel launch with one that specializes and records the launch."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        # The CUDA backend's specialization rules (pointer dtypes, divisibility, ints equal to 1)
        # do not depend on the architecture: any NVIDIA target gives the same binder.
        self.backend = make_backend(GPUTarget("cuda", DEFAULT_TARGETS[0], 32))
        self.binders = {}  # raw Python kernel function -> (JITFunction twin, binder)
        self.launches: list[Launch] = []
        self.dtype = self.call = ""

    def binder_for(self, python_fn):
        """Triton's JIT binder for ``python_fn``, built as a GPU run builds it. In the interpreter the
        kernels are InterpretedFunctions, so a JITFunction twin of the same function supplies it."""
        if python_fn not in self.binders:
            from triton.runtime.jit import JITFunction, create_function_from_signature

            twin = JITFunction(python_fn)
            self.binders[python_fn] = (twin, create_function_from_signature(twin.signature, twin.params, self.backend))
        return self.binders[python_fn]

    def record(self, python_fn, args, kwargs) -> None:
        twin, binder = self.binder_for(python_fn)
        bound, specialization, _ = binder(*args, **kwargs)
        signature, constexprs, hints = {}, {}, {}
        for param, (kind, hint) in zip(twin.params, specialization):
            signature[param.name] = kind
            if kind == "constexpr":
                constexprs[param.name] = bound[param.name]
            elif isinstance(hint, str) and hint:
                hints[param.name] = hint
        options = {k: v for k, v in kwargs.items() if k not in signature}
        self.launches.append(Launch(python_fn.__module__, python_fn.__name__, signature, constexprs, hints,
                                    options, self.dtype, self.call))

    def install(self) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        recorder = self

        def record_instead_of_run(interpreted, *args, grid, warmup, **kwargs):
            if not warmup:
                recorder.record(interpreted.fn, args, kwargs)

        InterpretedFunction.run = record_instead_of_run


def launch_kernels_as_on_gpu() -> None:
    """Make the kernel modules' host wrappers pass the tensors they pass on a GPU: ``compute_dtype``
    (the only interpreter-dependent choice of tensor dtype) follows its GPU rule."""
    import importlib
    import pkgutil

    kernels = importlib.import_module(KERNELS_PACKAGE)
    common = importlib.import_module(f"{KERNELS_PACKAGE}._common")
    interpreter_rule = common.compute_dtype

    def gpu_rule(dtype):
        # The function itself, with its INTERPRET switch off: follows the source if the rule changes.
        saved, common.INTERPRET = common.INTERPRET, False
        try:
            return interpreter_rule(dtype)
        finally:
            common.INTERPRET = saved

    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{KERNELS_PACKAGE}.{info.name}")
        if getattr(module, "compute_dtype", None) is interpreter_rule:
            module.compute_dtype = gpu_rule


def call_every_op(recorder: LaunchRecorder, dtype_label: str, scope: Scope) -> None:
    """Call each public op the way the library does, in ``dtype_label``'s input dtype."""
    import torch

    from sparse_peft import ops

    base_label = dtype_label.split("+")[0]
    dtype = getattr(torch, TORCH_DTYPE_NAMES[base_label])
    torch.backends.cuda.matmul.allow_tf32 = dtype_label == FP32_TF32_LABEL
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=dtype, requires_grad=False):
        return torch.randn(shape, generator=generator).to(dtype).requires_grad_(requires_grad)

    def call(description: str, fn) -> None:
        recorder.dtype, recorder.call = dtype_label, description
        fn()

    def forward_backward(op, *args):
        out = op(*args, backend="triton")
        out.backward(torch.ones_like(out))

    # Half the weight pruned, as the library's sparse layers are.
    weight = randn(OUT_FEATURES, IN_FEATURES) * (torch.rand(OUT_FEATURES, IN_FEATURES, generator=generator) < 0.5)
    mask = weight != 0
    for tokens in scope.matmul_tokens:
        for with_bias in (False, True):
            bias = randn(OUT_FEATURES, requires_grad=True) if with_bias else None
            suffix = f"{tokens} tokens, {'bias' if with_bias else 'no bias'}"
            # The SPP layer's adapter is fp32 whatever the base dtype (tuners/spp/layer.py).
            A = randn(SPP_RANK, IN_FEATURES, dtype=torch.float32, requires_grad=True)
            b = randn(OUT_FEATURES, 1, dtype=torch.float32, requires_grad=True)
            call(f"spp_linear fwd+bwd, {suffix}", lambda: forward_backward(
                ops.spp_linear, randn(tokens, IN_FEATURES, requires_grad=True), weight, A, b, 0.5, bias))
            call(f"masked_linear fwd+bwd, {suffix}", lambda: forward_backward(
                ops.masked_linear, randn(tokens, IN_FEATURES, requires_grad=True),
                weight.clone().requires_grad_(True), mask, bias))
        grad_out, x = randn(tokens, OUT_FEATURES), randn(tokens, IN_FEATURES)
        call(f"sddmm bool mask, {tokens} tokens", lambda: ops.sddmm(grad_out, x, mask, backend="triton"))
        # SEFT passes flat indices in no particular order.
        flat = mask.reshape(-1).nonzero().squeeze(1)
        flat = flat[torch.randperm(flat.numel(), generator=generator)]
        call(f"sddmm int64 indices, {tokens} tokens", lambda: ops.sddmm(grad_out, x, flat, backend="triton"))
    packed = ops.pack_bitmask(weight)
    for tokens in scope.decode_tokens:
        for with_bias in (False, True):
            bias = randn(OUT_FEATURES) if with_bias else None
            call(f"bitmask_linear, {tokens} tokens, {'bias' if with_bias else 'no bias'}",
                 lambda: ops.bitmask_linear(randn(tokens, IN_FEATURES), packed, bias, backend="triton"))


def record(dtype_labels: list[str], scope: Scope, path: str) -> None:
    """Phase 1 (run in a subprocess with TRITON_INTERPRET=1): write every launch to ``path`` (JSON)."""
    common = __import__(f"{KERNELS_PACKAGE}._common", fromlist=["INTERPRET"])
    if not (common.INTERPRET and common.LANGUAGE_INTERPRETED):
        raise SystemExit("the recording needs TRITON_INTERPRET=1 set before triton is imported")
    recorder = LaunchRecorder()
    recorder.install()
    launch_kernels_as_on_gpu()
    for label in dtype_labels:
        call_every_op(recorder, label, scope)
        # Guard against a wrapper that gets its bf16 cast elsewhere than compute_dtype: the GPU
        # launches would then be recorded as fp32 and bf16 never compiled.
        if label == "bf16" and not any("*bf16" in l.signature.values() for l in recorder.launches if l.dtype == label):
            raise SystemExit("the bf16 calls launched no kernel with a bf16 tensor: the interpreter's fp32 "
                             "cast was not undone (see launch_kernels_as_on_gpu)")
    with open(path, "w") as file:
        json.dump([asdict(launch) for launch in recorder.launches], file)


def record_in_interpreter(dtype_labels: list[str], all_specializations: bool) -> list[Launch]:
    """Run phase 1 in a child process (the interpreter switch is fixed when triton is imported)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        command = [sys.executable, os.path.abspath(__file__), "--record-to", path, "--dtypes", ",".join(dtype_labels)]
        if all_specializations:
            command.append("--all-specializations")
        child = subprocess.run(command, env=env, capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"recording the launches failed (exit {child.returncode}):\n{child.stderr[-4000:]}")
        with open(path) as file:
            return [Launch(**entry) for entry in json.load(file)]


# --- phase 2: compiling, for the GPU -----------------------------------------------------------------


def find_kernels() -> dict:
    """(module, kernel name) -> (JITFunction, GPU autotune configs or None) for every kernel in the
    package, found by walking its modules (so a new kernel file is covered without a list here)."""
    import importlib
    import pkgutil

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    kernels = importlib.import_module(KERNELS_PACKAGE)
    found = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{KERNELS_PACKAGE}.{info.name}")
        for value in vars(module).values():
            configs, inner = None, value
            # Autotuner and Heuristics wrap the JITFunction in `.fn`; the first autotuner's configs count.
            while not isinstance(inner, JITFunction) and hasattr(inner, "fn"):
                if configs is None and isinstance(inner, Autotuner):
                    configs = inner.configs
                inner = inner.fn
            if isinstance(inner, JITFunction) and inner.fn.__module__ == module.__name__:
                found[(module.__name__, inner.fn.__name__)] = (inner, configs)
    return found


def with_config(launch: Launch, config) -> tuple[dict, dict]:
    """The launch's constexprs and compile options once the autotuner has added ``config`` to it:
    the config's constexprs (block sizes) replace the interpreter config's, and its num_warps and
    num_stages are the options. Without a config (a kernel not autotuned) the launch's own."""
    if config is None:
        return dict(launch.constexprs), dict(launch.options)
    config_kwargs = config.all_kwargs()
    constexprs = {**launch.constexprs, **{k: v for k, v in config_kwargs.items() if k in launch.signature}}
    return constexprs, {k: v for k, v in config_kwargs.items() if k not in launch.signature}


def config_label(config) -> str:
    if config is None:
        return "(launch's own)"
    blocks = " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in config.kwargs.items())
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


@dataclass
class CompileJob:
    launch: Launch
    config_index: int | None  # into the kernel's GPU autotune list; None for a kernel without one
    target: int  # compute capability, e.g. 90


@dataclass
class CompileResult:
    #: "ok"; "error": triton.compile raised (or gave no cubin); "smem": it compiled, but needs more
    #: shared memory than the target has.
    status: str
    summary: str = ""  # one line: what went wrong
    message: str = ""  # the error in full
    cubin_bytes: int = 0
    shared_bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


_worker_kernels = None


def start_worker() -> None:
    global _worker_kernels
    import warnings

    # Triton 3.9 warns once per process that its default for FP fusion will change; a GPU run
    # compiles with the same default, so the warning says nothing about these kernels.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    common = __import__(f"{KERNELS_PACKAGE}._common", fromlist=["INTERPRET"])
    if common.INTERPRET:
        raise RuntimeError("compile workers must import triton with TRITON_INTERPRET=0 (GPU autotune lists)")
    _worker_kernels = find_kernels()


def compile_one(job: CompileJob) -> CompileResult:
    """``triton.compile`` one launch for one config and target; ok when it gives a cubin that fits."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    started = time.perf_counter()
    launch = job.launch
    jit_fn, configs = _worker_kernels[(launch.module, launch.kernel)]
    constexprs, options = with_config(launch, configs[job.config_index] if job.config_index is not None else None)
    target = GPUTarget("cuda", job.target, 32)
    backend = make_backend(target)
    # Hints are keyed by the argument's path (its index, as a 1-tuple), as the JIT passes them.
    attrs = {(jit_fn.arg_names.index(name),): backend.parse_attr(hint) for name, hint in launch.hints.items()}
    try:
        source = ASTSource(jit_fn, launch.signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=target, options=options)
    except Exception as error:  # any compiler error is the finding; report it, go on
        # A CompilationError's text starts with "at LINE:COL:" and the kernel source; its reason
        # is in error_message.
        reason = getattr(error, "error_message", None) or str(error)
        kind = type(error).__name__
        return CompileResult("error", f"{kind}: {first_line(reason)}", f"{kind}: {error}",
                             seconds=time.perf_counter() - started)
    seconds = time.perf_counter() - started
    cubin = compiled.asm.get("cubin", b"")
    shared = int(compiled.metadata.shared)
    if not cubin:
        return CompileResult("error", "no cubin", "triton.compile returned no cubin", seconds=seconds)
    limit = SHARED_MEMORY_LIMIT.get(job.target)
    if limit is not None and shared > limit:
        return CompileResult("smem", f"shared memory {shared} B > {limit} B", cubin_bytes=len(cubin),
                             shared_bytes=shared, seconds=seconds)
    return CompileResult("ok", cubin_bytes=len(cubin), shared_bytes=shared, seconds=seconds)


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


# --- the run -----------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(map(str, DEFAULT_TARGETS)),
                        help="compute capabilities, comma separated (90: H100/H200, 80: A100)")
    parser.add_argument("--dtypes", default=",".join(DTYPE_LABELS),
                        help="input dtypes, comma separated: fp16, bf16, fp32, fp32+tf32 (fp32 with torch's TF32 "
                             "switch on; implied by fp32 with --all-specializations)")
    parser.add_argument("--all-specializations", action="store_true",
                        help="also 1-token training calls, 2..16-token decode and fp32 with TF32 on: every "
                             "specialization those produce (about 3x the compiles)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--kernels", help="only kernels whose name contains one of these, comma separated")
    parser.add_argument("--json", help="also write every compile's result here, one JSON object a line")
    parser.add_argument("--list", action="store_true", help="print the distinct recorded launches, compile nothing")
    parser.add_argument("--record-to", help=argparse.SUPPRESS)  # phase 1, in the interpreter subprocess
    args = parser.parse_args(argv)
    try:
        args.targets = [int(t) for t in args.targets.split(",")]
    except ValueError:
        parser.error(f"--targets takes compute capabilities such as 90,80, got {args.targets!r}")
    args.dtypes = args.dtypes.split(",")
    unknown = set(args.dtypes) - set(DTYPE_LABELS) - {FP32_TF32_LABEL}
    if unknown:
        parser.error(f"unknown dtypes {sorted(unknown)}; choose from {','.join((*DTYPE_LABELS, FP32_TF32_LABEL))}")
    if args.all_specializations and ALL_SCOPE.tf32 and "fp32" in args.dtypes and FP32_TF32_LABEL not in args.dtypes:
        args.dtypes.append(FP32_TF32_LABEL)
    return args


@dataclass
class DistinctLaunch:
    """A launch recorded once or more; the compile is the same for all of its recordings."""

    launch: Launch
    dtypes: set = field(default_factory=set)
    calls: list = field(default_factory=list)


def distinct_launches(launches: list[Launch]) -> list[DistinctLaunch]:
    by_identity: dict[str, DistinctLaunch] = {}
    for launch in launches:
        entry = by_identity.setdefault(launch.identity(), DistinctLaunch(launch))
        entry.dtypes.add(launch.dtype)
        entry.calls.append(launch.call)
    return list(by_identity.values())


def describe(launch: Launch, config=None) -> str:
    """``kernel(name:type, ..., NAME=value)``; ``/16``: the divisibility-by-16 hint."""
    constexprs, options = with_config(launch, config)
    args = ", ".join(f"{name}={constexprs[name]!r}" if kind == "constexpr"
                     else f"{name}:{kind}{'/16' if launch.hints.get(name) == 'D' else ''}"
                     for name, kind in launch.signature.items())
    return f"{launch.kernel}({args}) {options}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.record_to:
        record(args.dtypes, ALL_SCOPE if args.all_specializations else DEFAULT_SCOPE, args.record_to)
        return 0
    started = time.perf_counter()
    # This process compiles: triton must come in with the interpreter off. A fresh cache makes
    # every compile run (and keeps ~1000 cubins out of ~/.triton).
    os.environ["TRITON_INTERPRET"] = "0"
    cache = tempfile.TemporaryDirectory(prefix="triton-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache.name
    if "triton" in sys.modules:
        raise SystemExit("compile_kernels.py must import triton itself (with TRITON_INTERPRET=0)")
    recorded = record_in_interpreter(args.dtypes, args.all_specializations)
    distinct = distinct_launches(recorded)
    recorded_seconds = time.perf_counter() - started
    import triton

    kernels = find_kernels()
    # An autotuned kernel no recorded call reaches is unchecked; a plain @triton.jit function may be
    # a device helper, compiled as part of the kernels that call it.
    never_launched = sorted(set(key for key, (_, configs) in kernels.items() if configs)
                            - {(d.launch.module, d.launch.kernel) for d in distinct})
    if args.kernels:
        distinct = [entry for entry in distinct if any(part in entry.launch.kernel for part in args.kernels.split(","))]
    print(f"triton {triton.__version__}: {len(recorded)} launches recorded in {recorded_seconds:.0f} s, "
          f"{len(distinct)} distinct, of {len(kernels)} kernels")
    if args.list:
        print("(block sizes, num_warps and num_stages below are the interpreter's config; each GPU config "
              "replaces them)")
        for entry in distinct:
            print(f"[{','.join(sorted(entry.dtypes))}] {describe(entry.launch)}\n    from: {entry.calls[0]}"
                  f"{f' (+{len(entry.calls) - 1} more)' if len(entry.calls) > 1 else ''}")
        return 0

    jobs, owners = [], []
    for entry in distinct:
        configs = kernels[(entry.launch.module, entry.launch.kernel)][1]
        config_indices = range(len(configs)) if configs else [None]
        for target in args.targets:
            for index in config_indices:
                jobs.append(CompileJob(entry.launch, index, target))
                owners.append(entry)
    print(f"compiling {len(jobs)} kernels ({len(distinct)} launches x configs x {len(args.targets)} targets) "
          f"with {args.jobs} processes", flush=True)
    results = []
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=start_worker) as pool:
        for done, result in enumerate(pool.map(compile_one, jobs), 1):
            results.append(result)
            if done % max(1, len(jobs) // 10) == 0 or done == len(jobs):
                print(f"  {done}/{len(jobs)} compiled, {time.perf_counter() - started:.0f} s", file=sys.stderr,
                      flush=True)
    cache.cleanup()

    if args.json:
        with open(args.json, "w") as file:
            for job, entry, result in zip(jobs, owners, results):
                configs = kernels[(job.launch.module, job.launch.kernel)][1]
                config = configs[job.config_index] if job.config_index is not None else None
                file.write(json.dumps({"kernel": job.launch.kernel, "dtypes": sorted(entry.dtypes),
                                       "config": config_label(config), "target": job.target,
                                       "launch": describe(job.launch, config), **asdict(result)}) + "\n")
    failed = report(jobs, owners, results, kernels)
    for module, kernel in never_launched:
        print(f"\nNOT CHECKED {module}.{kernel}: no recorded op call launches it (add one to call_every_op)")
    compile_seconds = sum(result.seconds for result in results)
    counts = {status: sum(result.status == status for result in results) for status in ("ok", "error", "smem")}
    print(f"\ntriton {triton.__version__}, targets {', '.join(f'sm_{t}' for t in args.targets)}, dtypes "
          f"{', '.join(args.dtypes)}: {counts['ok']}/{len(results)} compiles ok, {counts['error']} compile errors, "
          f"{counts['smem']} over shared memory, {len(never_launched)} kernels never launched; "
          f"{time.perf_counter() - started:.0f} s wall ({compile_seconds:.0f} s of compiling in {args.jobs} processes)")
    return 1 if failed or never_launched else 0


def report(jobs: list[CompileJob], owners: list[DistinctLaunch], results: list[CompileResult], kernels: dict) -> bool:
    """Print the table and the failures; True if a kernel would fail on a target (a compile error, or a
    launch that no config can serve)."""
    dtype_order = {label: i for i, label in enumerate((*DTYPE_LABELS, FP32_TF32_LABEL))}

    def config_of(job):
        configs = kernels[(job.launch.module, job.launch.kernel)][1]
        return configs[job.config_index] if job.config_index is not None else None

    # One row per kernel, dtype, config and target; a launch's result counts for every dtype that
    # recorded it.
    rows = defaultdict(list)
    for job, entry, result in zip(jobs, owners, results):
        for dtype in entry.dtypes:
            rows[(job.launch.kernel, dtype, job.config_index, job.target)].append((job, result))
    ordered = sorted(rows, key=lambda key: (key[0], dtype_order[key[1]], -1 if key[2] is None else key[2], -key[3]))
    table = [("kernel", "dtype", "config", "target", "result")]
    for key in ordered:
        outcomes = rows[key]
        errors = [result for _, result in outcomes if result.status == "error"]
        over = [result for _, result in outcomes if result.status == "smem"]
        if errors:
            cell = f"FAIL {errors[0].summary}"
        elif over:
            cell = f"FAIL {max(over, key=lambda result: result.shared_bytes).summary}"
        else:
            cell = f"ok ({len(outcomes)} launch{'es' if len(outcomes) > 1 else ''}, " \
                   f"smem <= {max(result.shared_bytes for _, result in outcomes) // 1024} KiB)"
        table.append((key[0], key[1], config_label(config_of(outcomes[0][0])), f"sm_{key[3]}", cell))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])

    # Compile errors in full, one report per kernel, config, target and error.
    error_groups = defaultdict(list)
    for job, entry, result in zip(jobs, owners, results):
        if result.status == "error":
            error_groups[(job.launch.kernel, job.config_index, job.target, result.summary)].append((job, entry, result))
    for (kernel, _, target, _), hits in error_groups.items():
        job, _, result = hits[0]
        dtypes = sorted({dtype for _, entry, _ in hits for dtype in entry.dtypes}, key=dtype_order.get)
        # A CompilationError's last lines are the end of the kernel's source excerpt and the reason.
        message = "\n      ".join(result.message.splitlines()[-20:])
        print(f"\nCOMPILE ERROR {kernel}, config [{config_label(config_of(job))}], sm_{target}, {', '.join(dtypes)} "
              f"({len(hits)} launches)\n  error:  {message}\n  launch: {describe(job.launch, config_of(job))}\n"
              f"          from {job.launch.call} ({job.launch.dtype})")

    # A config over the target's shared memory cannot be loaded there: Triton raises OutOfResources
    # when it loads the kernel, and the autotuner treats that as an infinitely slow config. When no
    # config of the list is left, the autotuner still picks one and the op itself fails.
    over = [(job, entry, result) for job, entry, result in zip(jobs, owners, results) if result.status == "smem"]
    if over:
        print("\nOver the target's shared memory per block (the autotuner skips these configs on that GPU):")
        groups = defaultdict(list)
        for job, entry, result in over:
            groups[(job.launch.kernel, job.config_index, job.target)].append((entry, result))
        for (kernel, config_index, target), hits in groups.items():
            config = kernels[(hits[0][0].launch.module, kernel)][1][config_index]
            dtypes = sorted({dtype for entry, _ in hits for dtype in entry.dtypes}, key=dtype_order.get)
            print(f"  {kernel} [{config_label(config)}] sm_{target}: {', '.join(dtypes)}, up to "
                  f"{max(result.shared_bytes for _, result in hits)} B of {SHARED_MEMORY_LIMIT[target]} B")
    usable = {}  # (distinct launch, target) -> whether some config compiled and fits
    for job, entry, result in zip(jobs, owners, results):
        usable[(id(entry), job.target)] = usable.get((id(entry), job.target), False) or result.ok
    stranded = defaultdict(list)  # (kernel, target, dtypes) -> launches no config can serve
    for entry in {id(entry): entry for entry in owners}.values():
        for target in sorted({job.target for job in jobs}, reverse=True):
            if not usable.get((id(entry), target), True):
                dtypes = ", ".join(sorted(entry.dtypes, key=dtype_order.get))
                stranded[(entry.launch.kernel, target, dtypes)].append(entry)
    for (kernel, target, dtypes), entries in stranded.items():
        print(f"\nNO CONFIG LEFT {kernel} sm_{target}, {dtypes}: for {len(entries)} launches no config of the "
              f"autotune list compiles and fits, so these calls fail on this GPU, e.g. {entries[0].calls[0]}")
    # A config over the shared memory is only slower autotuning (it is dropped); a compile error or
    # a call no config can serve is a kernel that fails on that GPU.
    return bool(error_groups or stranded)


if __name__ == "__main__":
    sys.exit(main())
