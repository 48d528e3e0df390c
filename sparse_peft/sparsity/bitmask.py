"""The packed bitmask format: a sparse weight as its nonzero values plus one bit per position.

Shared by the compressed checkpoint (``sparse_peft.io``) and the ``bitmask_linear`` decode
kernel, so both read the same layout:

* ``values``: 1-D, the nonzeros of the weight in row-major order, in the weight's dtype;
* ``bits``: ``uint8`` of shape ``(out, ceil(in / 8))``; bit ``j % 8`` (little-endian inside the
  byte) of byte ``j // 8`` in row ``i`` is set iff ``W[i, j] != 0``; padding bits past
  ``in_features`` are always 0;
* ``row_offsets``: ``int64`` of shape ``(out + 1,)``, where row ``i``'s values start in
  ``values``; derived from ``bits`` (never stored on disk, so it cannot disagree with them).

Zero means ``== 0``: a stored ``-0.0`` is a pruned position like ``+0.0`` and unpacks as ``+0.0``
(``restore_mask`` already writes ``+0.0`` at every pruned position, so a pruned model round-trips
bit for bit). Every nonzero value, NaN and inf included, keeps its exact bit pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS_PER_BYTE = 8


@dataclass
class PackedBitmask:
    """A 2-D weight of ``shape`` stored as its nonzero ``values`` and a bit-packed support."""

    values: torch.Tensor
    bits: torch.Tensor
    row_offsets: torch.Tensor
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def out_features(self) -> int:
        return int(self.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.shape[1])

    @property
    def sparsity(self) -> float:
        numel = self.out_features * self.in_features
        return 1.0 - self.nnz / numel if numel else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of what a checkpoint stores (values + bits; row offsets are derived)."""
        return self.values.numel() * self.values.element_size() + self.bits.numel()

    def mask(self) -> torch.Tensor:
        """The bool support, shaped like the weight."""
        return bits_to_mask(self.bits, self.in_features)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "PackedBitmask":
        """Move to ``device``; ``dtype`` casts the values only (bits and offsets stay integral).

        Casting down may round a tiny value to 0; the bits still mark it kept, as they should.
        """
        values = self.values.to(device=device, dtype=dtype) if dtype is not None else self.values.to(device)
        return PackedBitmask(values, self.bits.to(device), self.row_offsets.to(device), self.shape)

    def validate(self, where: str = "packed weight") -> None:
        """Raise ``ValueError`` (naming ``where``) unless the parts describe one consistent weight."""
        validate_packed(self.values, self.bits, self.shape, where, row_offsets=self.row_offsets)

    def __repr__(self) -> str:
        return (f"PackedBitmask(shape={tuple(self.shape)}, dtype={self.dtype}, nnz={self.nnz}, "
                f"sparsity={self.sparsity:.4f}, device={self.device})")


def packed_row_bytes(in_features: int) -> int:
    return (in_features + BITS_PER_BYTE - 1) // BITS_PER_BYTE


def _bit_weights(device) -> torch.Tensor:
    return torch.arange(BITS_PER_BYTE, dtype=torch.uint8, device=device)


def mask_to_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a 2-D bool mask into ``uint8`` bytes, little-endian bit order, zero padding bits."""
    if mask.dim() != 2:
        raise ValueError(f"mask_to_bits expects a 2-D mask, got shape {tuple(mask.shape)}")
    out_features, in_features = mask.shape
    n_bytes = packed_row_bytes(in_features)
    padded = torch.zeros(out_features, n_bytes * BITS_PER_BYTE, dtype=torch.uint8, device=mask.device)
    padded[:, :in_features] = mask.to(torch.uint8)
    grouped = padded.view(out_features, n_bytes, BITS_PER_BYTE)
    # OR the eight bit planes together in uint8: no int64 intermediate the size of the weight.
    bits = torch.zeros(out_features, n_bytes, dtype=torch.uint8, device=mask.device)
    for bit in range(BITS_PER_BYTE):
        bits |= grouped[:, :, bit] << bit
    return bits


def _all_bits(bits: torch.Tensor) -> torch.Tensor:
    """``(out, n_bytes * 8)`` bool, padding bits included."""
    shifted = (bits.unsqueeze(-1) >> _bit_weights(bits.device)) & 1
    return shifted.reshape(bits.shape[0], -1).bool()


def bits_to_mask(bits: torch.Tensor, in_features: int) -> torch.Tensor:
    """Unpack ``uint8`` bytes into the ``(out, in_features)`` bool mask."""
    _check_bits_tensor(bits, in_features, "bits")
    return _all_bits(bits)[:, :in_features]


def row_offsets_from_bits(bits: torch.Tensor, in_features: int) -> torch.Tensor:
    """``int64`` of shape ``(out + 1,)``: where each row's values start (and, last, the nnz)."""
    per_row = bits_to_mask(bits, in_features).sum(dim=1, dtype=torch.int64)
    offsets = torch.zeros(bits.shape[0] + 1, dtype=torch.int64, device=bits.device)
    torch.cumsum(per_row, dim=0, out=offsets[1:])
    return offsets


def pack_bitmask(weight: torch.Tensor) -> PackedBitmask:
    """Pack a 2-D floating-point weight; ``unpack_bitmask`` gives it back bit for bit (``-0.0``
    comes back as ``+0.0``)."""
    if weight.dim() != 2:
        raise ValueError(f"pack_bitmask expects a 2-D weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"pack_bitmask expects a floating-point weight, got dtype {weight.dtype}")
    weight = weight.detach()
    mask = weight != 0
    values = weight.masked_select(mask)  # row-major order
    bits = mask_to_bits(mask)
    per_row = mask.sum(dim=1, dtype=torch.int64)
    row_offsets = torch.zeros(weight.shape[0] + 1, dtype=torch.int64, device=weight.device)
    torch.cumsum(per_row, dim=0, out=row_offsets[1:])
    return PackedBitmask(values, bits, row_offsets, (int(weight.shape[0]), int(weight.shape[1])))


def unpack_bitmask(packed: PackedBitmask) -> torch.Tensor:
    """The dense weight: ``values`` scattered into the set bits, ``+0.0`` everywhere else."""
    mask = packed.mask()
    nnz_from_bits = int(mask.sum().item())
    if nnz_from_bits != packed.nnz:
        raise ValueError(f"packed weight of shape {tuple(packed.shape)}: the bits mark {nnz_from_bits} "
                         f"nonzeros but {packed.nnz} values are stored")
    dense = torch.zeros(packed.shape, dtype=packed.dtype, device=packed.device)
    dense.masked_scatter_(mask, packed.values)
    return dense


def _check_bits_tensor(bits: torch.Tensor, in_features: int, where: str) -> None:
    if bits.dtype != torch.uint8:
        raise ValueError(f"{where}: bits must be uint8, got {bits.dtype}")
    if bits.dim() != 2 or bits.shape[1] != packed_row_bytes(in_features):
        raise ValueError(f"{where}: bits must have shape (out, {packed_row_bytes(in_features)}) for "
                         f"in_features={in_features}, got {tuple(bits.shape)}")


def validate_packed(values: torch.Tensor, bits: torch.Tensor, shape, where: str,
                    row_offsets: torch.Tensor | None = None) -> None:
    """Check every invariant of the format; ``ValueError`` naming ``where`` and the bad value."""
    if len(shape) != 2 or any(int(d) < 0 for d in shape):
        raise ValueError(f"{where}: shape must be (out, in), got {tuple(shape)}")
    out_features, in_features = int(shape[0]), int(shape[1])
    _check_bits_tensor(bits, in_features, where)
    if bits.shape[0] != out_features:
        raise ValueError(f"{where}: bits have {bits.shape[0]} rows, shape says out={out_features}")
    if values.dim() != 1 or not values.is_floating_point():
        raise ValueError(f"{where}: values must be a 1-D floating-point tensor, got "
                         f"shape {tuple(values.shape)} dtype {values.dtype}")
    all_bits = _all_bits(bits)
    if in_features % BITS_PER_BYTE and all_bits[:, in_features:].any():
        raise ValueError(f"{where}: padding bits past in_features={in_features} are set")
    nnz_from_bits = int(all_bits[:, :in_features].sum().item())
    if nnz_from_bits != values.numel():
        raise ValueError(f"{where}: the bits mark {nnz_from_bits} nonzeros but {values.numel()} values are stored")
    if (values == 0).any():
        raise ValueError(f"{where}: {int((values == 0).sum())} stored values are zero; the format stores nonzeros only")
    if row_offsets is not None:
        expected = row_offsets_from_bits(bits, in_features)
        if row_offsets.shape != expected.shape or not torch.equal(row_offsets.to(expected.device), expected):
            raise ValueError(f"{where}: row_offsets disagree with the bits")
