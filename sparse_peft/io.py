"""Compressed sparse checkpoints: ``save_sparse`` / ``load_sparse``, and ``export_dense``.

A sparse checkpoint is a directory holding

* ``sparse_model.safetensors``: every sparse linear weight as ``<param>.sparse_values`` (the
  nonzeros, row-major, in the weight's dtype) and ``<param>.sparse_bits`` (``uint8``, one bit per
  position, see ``sparsity/bitmask.py``); every other tensor as-is under its own name;
* ``sparse_format.json``: format name and version, the weights file's size and SHA-256, and per
  packed layer its layout, dtype, shape, nnz and N:M pattern (if any);
* ``config.json`` (+ ``generation_config.json``) and, if given, the tokenizer files.

Loading checks everything it can before building a model (format and version, file size,
checksum, then per layer shape, dtype, nnz against the bits and the JSON, N:M pattern) and raises
``ValueError`` naming the file, layer and value: a damaged checkpoint never loads as a wrong model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ._progress import progress
from .sparsity.bitmask import PackedBitmask, pack_bitmask, row_offsets_from_bits, unpack_bitmask, validate_packed
from .sparsity.masks import is_nm_sparse, named_linears, parse_pattern
from .sparsity.report import layer_sparsity

FORMAT_NAME = "sparse-peft-checkpoint"
FORMAT_VERSION = 1
FORMAT_FILE = "sparse_format.json"
WEIGHTS_FILE = "sparse_model.safetensors"
VALUES_SUFFIX = ".sparse_values"
BITS_SUFFIX = ".sparse_bits"
_HASH_CHUNK = 1 << 22

__all__ = ["BitmaskLinear", "checkpoint_bytes", "decode_cache_bytes", "drop_decode_cache", "export_dense", "load_sparse",
           "read_format", "save_sparse", "set_decode_cache"]


# --- the packed linear used by load_sparse(packed=True) -------------------------------------------

@dataclass
class _DecodeCache:
    """A layer's decoded weight and what it was decoded from (to notice a changed ``values``)."""

    weight: torch.Tensor
    values: weakref.ref
    versions: tuple[int, int]


class BitmaskLinear(nn.Module):
    """A linear layer whose weight stays packed (values + bitmask) and is decoded per call.

    The packed parts are buffers, so ``.to(device)`` moves them; they are not persistent (a
    ``state_dict`` of a packed model has no weight for this layer: save it with ``save_sparse``).

    Where ``bitmask_linear`` would take its PyTorch reference (CPU inputs), decoding the whole
    weight on every call costs ~50x the dense GEMV it feeds. With ``decode_cache`` on (the default)
    the first such call keeps the decoded dense weight, built once, bit-identical to
    ``unpack_bitmask``, so decoding runs at dense speed with the same outputs; it costs the dense
    weight's bytes on top of the packed parts until ``drop_decode_cache()`` (or moving or casting
    the module) frees it. The Triton path (CUDA) never builds it.
    """

    def __init__(self, packed: PackedBitmask, bias: torch.Tensor | None = None, decode_cache: bool = True):
        super().__init__()
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.register_buffer("values", packed.values, persistent=False)
        self.register_buffer("bits", packed.bits, persistent=False)
        self.register_buffer("row_offsets", packed.row_offsets, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.decode_cache = decode_cache
        self._decode_cache: _DecodeCache | None = None

    @property
    def packed(self) -> PackedBitmask:
        return PackedBitmask(self.values, self.bits, self.row_offsets, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode_cache and self._cache_serves(x):
            return F.linear(x, self._decoded_weight(), self.bias)
        return ops.bitmask_linear(x, self.packed, self.bias)

    # The two helpers below run on every call of every layer while decoding: they read the buffers
    # from ``_buffers`` directly, as nn.Module's attribute lookup costs more than the checks.

    def _cache_serves(self, x: torch.Tensor) -> bool:
        # Only the ordinary case: a mismatched dtype or device goes to the op, which says what is wrong.
        values = self._buffers["values"]
        return x.dtype == values.dtype and x.device == values.device and ops.runs_torch_twin(x.device)

    def _decoded_weight(self) -> torch.Tensor:
        values, bits = self._buffers["values"], self._buffers["bits"]
        versions = (values._version, bits._version)
        cache = self._decode_cache
        if cache is None or cache.values() is not values or cache.versions != versions:
            self._decode_cache = None  # free the stale copy before decoding the new one
            # A plain tensor even under inference_mode: a later call with autograd on may save it.
            with torch.inference_mode(False), torch.no_grad():
                weight = unpack_bitmask(self.packed)
            cache = self._decode_cache = _DecodeCache(weight, weakref.ref(values), versions)
        return cache.weight

    @property
    def decode_cache_bytes(self) -> int:
        """Bytes held by the decoded weight now (0 when there is none)."""
        cache = self._decode_cache
        return 0 if cache is None else cache.weight.numel() * cache.weight.element_size()

    def drop_decode_cache(self) -> int:
        """Free the decoded weight (the next CPU call decodes it again if ``decode_cache`` is on);
        returns the bytes freed."""
        freed = self.decode_cache_bytes
        self._decode_cache = None
        return freed

    def __getstate__(self):
        # Pickling and deepcopy leave the decoded weight behind: it is rebuilt on demand.
        state = self.__dict__.copy()
        state["_decode_cache"] = None
        return state

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half() build new buffers: a copy decoded from the old ones must not linger.
        self.drop_decode_cache()
        return super()._apply(fn, *args, **kwargs)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the decoded weight (bit-identical)."""
        weight = unpack_bitmask(self.packed)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        p = self.packed
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={p.nnz}, "
                f"sparsity={p.sparsity:.4f}, decode_cache={self.decode_cache}")


def set_decode_cache(model: nn.Module, enabled: bool) -> int:
    """Turn the CPU decode cache of every ``BitmaskLinear`` in ``model`` on or off (off frees it);
    returns the number of packed layers."""
    layers = [m for m in model.modules() if isinstance(m, BitmaskLinear)]
    for layer in layers:
        layer.decode_cache = enabled
        if not enabled:
            layer.drop_decode_cache()
    return len(layers)


def drop_decode_cache(model: nn.Module) -> int:
    """Free every ``BitmaskLinear``'s decoded weight in ``model`` (rebuilt on the next CPU call while
    the cache is on); returns the bytes freed."""
    return sum(m.drop_decode_cache() for m in model.modules() if isinstance(m, BitmaskLinear))


def decode_cache_bytes(model: nn.Module) -> int:
    """Bytes the decoded weights of ``model``'s ``BitmaskLinear`` layers hold now."""
    return sum(m.decode_cache_bytes for m in model.modules() if isinstance(m, BitmaskLinear))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# --- saving ----------------------------------------------------------------------------------------

def _check_plain_model(model: nn.Module, what: str) -> None:
    if hasattr(model, "peft_config") or hasattr(model, "get_base_model"):
        raise ValueError(f"{what} needs a plain transformers model, got a peft model "
                         f"({type(model).__name__}) with unmerged adapters: merge them first "
                         "(sp.merge_and_unload_sparse(peft_model) or peft_model.merge_and_unload())")
    if not hasattr(model, "config") or not hasattr(model.config, "save_pretrained"):
        raise ValueError(f"{what} needs a transformers model with a .config, got {type(model).__name__}")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{where}: unknown dtype {name!r}")
    return dtype


def _model_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _packed_layers(model: nn.Module) -> dict[str, PackedBitmask | nn.Linear]:
    """Parameter name of each weight that may be packed -> an already packed layer's parts, or
    the linear whose weight to pack."""
    layers: dict[str, PackedBitmask | nn.Linear] = {}
    for name, module in model.named_modules():
        if isinstance(module, BitmaskLinear):
            layers[f"{name}.weight"] = module.packed
    for name, linear in named_linears(model):
        # BitmaskLinear computes x Wᵀ from an out x in weight; a Conv1D (GPT-2) stores its weight
        # in x out and is kept as a plain tensor: exact, just not compressed.
        if isinstance(linear, nn.Linear):
            layers[f"{name}.weight"] = linear
    return layers


def save_sparse(model: nn.Module, save_directory: str | os.PathLike, tokenizer=None, show_progress: bool = True) -> dict:
    """Write ``model`` as a compressed sparse checkpoint; returns the format record (the JSON).

    Each linear weight (output head excluded) is stored packed when that is smaller than dense,
    i.e. at sparsity above ``1 / (8 * bytes per element)`` (6.25% in bf16); a dense layer stays as
    it is. Tied weights are stored once. ``load_sparse`` restores the model bit for bit.
    """
    _check_plain_model(model, "save_sparse")
    out_dir = Path(save_directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    first_name_of: dict[tuple, str] = {}
    packable = _packed_layers(model)
    for name in progress(list(packable), "packing sparse weights", show_progress):
        source = packable[name]
        if isinstance(source, PackedBitmask):
            packed, weight = source, None
        else:
            weight = source.weight.detach()
            if not weight.is_floating_point():
                continue  # a quantized linear: stored as-is below
            packed = pack_bitmask(weight)
            if packed.nbytes >= weight.numel() * weight.element_size():
                continue  # too dense to gain from packing: stored as-is below
        pattern = layer_sparsity(weight if weight is not None else unpack_bitmask(packed)).pattern
        tensors[name + VALUES_SUFFIX] = packed.values.contiguous().cpu()
        tensors[name + BITS_SUFFIX] = packed.bits.contiguous().cpu()
        layers[name] = {"layout": "bitmask", "dtype": _dtype_name(packed.dtype), "shape": list(packed.shape),
                        "nnz": packed.nnz, "pattern": pattern}
        if weight is not None:
            first_name_of[(weight.data_ptr(), tuple(weight.shape), weight.dtype)] = name

    for name, tensor in state.items():
        if name in layers:
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in first_name_of:  # a tied weight: store it once
            aliases[name] = first_name_of[key]
            continue
        first_name_of[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()

    from safetensors.torch import save_file

    weights_path = out_dir / WEIGHTS_FILE
    save_file(tensors, str(weights_path), metadata={"format": FORMAT_NAME, "version": str(FORMAT_VERSION)})
    record = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "weights_file": WEIGHTS_FILE,
        "weights_bytes": weights_path.stat().st_size,
        "weights_sha256": _file_digest(weights_path),
        "dtype": _dtype_name(_model_dtype(model)),
        "layers": layers,
        "aliases": aliases,
    }
    (out_dir / FORMAT_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    model.config.save_pretrained(out_dir)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and hasattr(generation_config, "save_pretrained"):
        generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return record


def export_dense(model: nn.Module, save_directory: str | os.PathLike, tokenizer=None) -> None:
    """Write a plain transformers checkpoint (safetensors, zeros kept) that
    ``AutoModelForCausalLM.from_pretrained`` and any other tool loads."""
    _check_plain_model(model, "export_dense")
    if any(isinstance(m, BitmaskLinear) for m in model.modules()):
        model = copy.deepcopy(model)  # decode the packed layers in a copy: leave the caller's model as is
        for name, module in list(model.named_modules()):
            if isinstance(module, BitmaskLinear):
                _set_module(model, name, module.to_linear())
    model.save_pretrained(save_directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)


# --- loading ---------------------------------------------------------------------------------------

def is_sparse_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / FORMAT_FILE).is_file()


def read_format(directory: str | os.PathLike) -> dict:
    """The checkpoint's format record, checked for name, version and the fields loading needs."""
    path = Path(directory) / FORMAT_FILE
    if not path.is_file():
        raise ValueError(f"{directory}: not a sparse-peft checkpoint (no {FORMAT_FILE})")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
        got = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path}: format is {got!r}, expected {FORMAT_NAME!r}")
    if record.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {record.get('version')!r} is not supported "
                         f"(this sparse-peft reads version {FORMAT_VERSION})")
    for field_name, kind in (("weights_file", str), ("weights_bytes", int), ("weights_sha256", str),
                             ("dtype", str), ("layers", dict), ("aliases", dict)):
        if not isinstance(record.get(field_name), kind):
            raise ValueError(f"{path}: field {field_name!r} is missing or not a {kind.__name__}")
    if Path(record["weights_file"]).name != record["weights_file"]:
        raise ValueError(f"{path}: weights_file {record['weights_file']!r} must be a plain file name")
    return record


def _read_tensors(directory: Path, record: dict, verify_checksum: bool) -> dict[str, torch.Tensor]:
    weights_path = directory / record["weights_file"]
    if not weights_path.is_file():
        raise ValueError(f"{weights_path}: missing (named by {FORMAT_FILE})")
    size = weights_path.stat().st_size
    if size != record["weights_bytes"]:
        raise ValueError(f"{weights_path}: {size} bytes, {FORMAT_FILE} says {record['weights_bytes']} "
                         "(truncated or replaced)")
    if verify_checksum:
        digest = _file_digest(weights_path)
        if digest != record["weights_sha256"]:
            raise ValueError(f"{weights_path}: SHA-256 {digest} does not match {FORMAT_FILE} "
                             f"({record['weights_sha256']}): the file is corrupted")
    from safetensors.torch import load_file

    try:
        return load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{weights_path}: not a readable safetensors file ({err})") from None


def _unpacked_layer(name: str, info: dict, tensors: dict, expected: torch.Tensor | None, where: str) -> PackedBitmask:
    """Check one packed layer against the JSON and the model; return its parts."""
    loc = f"{where}: layer {name!r}"
    if not isinstance(info, dict) or info.get("layout") != "bitmask":
        raise ValueError(f"{loc}: unknown layout {info.get('layout') if isinstance(info, dict) else info!r}")
    values, bits = tensors.pop(name + VALUES_SUFFIX, None), tensors.pop(name + BITS_SUFFIX, None)
    if values is None or bits is None:
        raise ValueError(f"{loc}: {VALUES_SUFFIX if values is None else BITS_SUFFIX} tensor is missing")
    shape = info.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) for d in shape)):
        raise ValueError(f"{loc}: shape {shape!r} is not [out, in]")
    if expected is None:
        raise ValueError(f"{loc}: the model built from config.json has no such parameter")
    if tuple(expected.shape) != tuple(shape):
        raise ValueError(f"{loc}: stored shape {tuple(shape)} does not match the model's {tuple(expected.shape)}")
    dtype = _dtype_from_name(info.get("dtype"), loc)
    if values.dtype != dtype:
        raise ValueError(f"{loc}: values are {values.dtype}, {FORMAT_FILE} says {dtype}")
    validate_packed(values, bits, shape, loc)
    if values.numel() != info.get("nnz"):
        raise ValueError(f"{loc}: {values.numel()} values stored, {FORMAT_FILE} says nnz={info.get('nnz')!r}")
    packed = PackedBitmask(values, bits, row_offsets_from_bits(bits, shape[1]), (shape[0], shape[1]))
    if info.get("pattern"):
        n, m = parse_pattern(info["pattern"])
        if not is_nm_sparse(packed.mask(), n, m):
            raise ValueError(f"{loc}: the bits break the recorded {info['pattern']} pattern")
    return packed


def load_sparse(directory: str | os.PathLike, packed: bool = False, device=None, verify_checksum: bool = True,
                show_progress: bool = True, decode_cache: bool = True):
    """Load a checkpoint written by ``save_sparse`` into a plain transformers causal LM.

    Every tensor comes back bit-identical to the saved model. The tokenizer, if saved, loads with
    ``AutoTokenizer.from_pretrained(directory)``.

    With ``packed=True`` the packed linears become ``BitmaskLinear`` modules that keep values +
    bitmask in memory (``(1 - s) * bytes per element + 1/8`` bytes per position, plus 8 bytes per
    row for the row offsets) and compute ``sparse_peft.ops.bitmask_linear``. What that costs:

    * CUDA: the Triton kernel decodes the weight tile by tile for up to 16 tokens, so GPU memory
      holds only the packed parts; more tokens decode one layer at a time into a transient dense
      weight. ``decode_cache`` plays no part.
    * CPU (and wherever the torch backend is forced): the reference decodes the whole weight per
      call, ~50x a dense GEMV, so generation runs at ~0.1x dense. With ``decode_cache=True`` (the
      default) each layer keeps its decoded weight after its first call: decoding then runs at
      dense speed with bit-identical outputs, but the process holds the packed parts AND the dense
      linears, more than ``packed=False`` (fp32, 50%: ~1.5x the dense linears). On the CPU, packed
      mode saves memory only with ``decode_cache=False`` (or after ``drop_decode_cache(model)``),
      at ~0.1x speed; its saving that always holds is on disk.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    record = read_format(directory)
    where = str(directory / record["weights_file"])
    tensors = _read_tensors(directory, record, verify_checksum)
    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as err:
        raise ValueError(f"{directory / 'config.json'}: cannot read the model config ({err})") from None
    model_dtype = _dtype_from_name(record["dtype"], str(directory / FORMAT_FILE))
    model = AutoModelForCausalLM.from_config(config, dtype=model_dtype)
    expected = model.state_dict()

    packed_layers: dict[str, PackedBitmask] = {}
    for name, info in progress(record["layers"].items(), "unpacking sparse weights", show_progress):
        packed_layers[name] = _unpacked_layer(name, info, tensors, expected.get(name), where)

    state: dict[str, torch.Tensor] = {}
    if not packed:
        state.update({name: unpack_bitmask(p) for name, p in packed_layers.items()})
    for name, tensor in tensors.items():
        if name.endswith((VALUES_SUFFIX, BITS_SUFFIX)):
            raise ValueError(f"{where}: tensor {name!r} belongs to no packed layer in {FORMAT_FILE}")
        state[name] = tensor
    for alias, target in record["aliases"].items():
        if target not in state and target not in packed_layers:
            raise ValueError(f"{where}: tied weight {alias!r} points to {target!r}, which is not stored")
        state[alias] = state[target] if target in state else unpack_bitmask(packed_layers[target])

    if packed:
        for name, parts in packed_layers.items():
            module_name = name.removesuffix(".weight")
            # The bias stays in ``state``: load_state_dict below assigns it to the new module.
            bias = state.get(f"{module_name}.bias")
            _set_module(model, module_name, BitmaskLinear(parts, bias, decode_cache=decode_cache))
        expected = model.state_dict()

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: does not match the model built from config.json: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(expected[name].shape)}")
    # assign=True keeps each stored tensor as it is (dtype included): bit-identical, no cast.
    model.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False) or record["aliases"]:
        model.tie_weights()
    model.eval()
    if device is not None:
        model.to(device)
    return model


# --- sizes (tests and benchmarks/checkpoint_size.py) ----------------------------------------------

def checkpoint_bytes(directory: str | os.PathLike) -> dict:
    """Bytes on disk: the whole weights file, the packed linear tensors, the other tensors, and
    what the packed linears would take dense in bf16."""
    from safetensors import safe_open

    directory = Path(directory)
    record = read_format(directory)
    weights_path = directory / record["weights_file"]
    packed_bytes = other_bytes = 0
    with safe_open(str(weights_path), framework="pt") as f:
        for name in f.keys():
            piece = f.get_slice(name)
            numel = 1
            for d in piece.get_shape():
                numel *= d
            nbytes = numel * _dtype_from_name(_safetensors_dtype(piece.get_dtype()), name).itemsize
            if name.endswith((VALUES_SUFFIX, BITS_SUFFIX)):
                packed_bytes += nbytes
            else:
                other_bytes += nbytes
    dense_bf16 = sum(2 * info["shape"][0] * info["shape"][1] for info in record["layers"].values())
    return {"file": weights_path.stat().st_size, "packed_linears": packed_bytes, "other_tensors": other_bytes,
            "dense_bf16_linears": dense_bf16}


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "U8": "uint8",
                       "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool"}


def _safetensors_dtype(name: str) -> str:
    return _SAFETENSORS_DTYPES.get(name, name.lower())
