"""The collectives sparse-peft needs, for data parallelism (DDP) and for sharded parameters (FSDP2).

Topology decisions (SEFT's drop-and-grow, SPT's gradual Wanda pruning) are made from statistics
summed over data-parallel ranks, so every rank decides the same. Without an initialised process
group these are no-ops.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a parameter outside the forward and backward
is a ``DTensor`` of which each rank holds a block of rows (``Shard(0)``). The helpers below let a
topology update read a whole layer (``full_tensor``: gathered, transient, one layer at a time) and
write back only what the rank owns (``write_full_``, ``set_rows_``), so no rank keeps anything of
size out x in beyond its own shard between steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch built without distributed support: nothing is ever sharded
    DTensor, Shard = (), None


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks (returns it)."""
    if world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


# --- sharded (FSDP2 / DTensor) parameters ----------------------------------------------------------


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a ``DTensor``: call it on every rank)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part this rank stores (in place writes to it reach the parameter)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def local_slices(tensor: torch.Tensor) -> tuple[slice, ...]:
    """Where this rank's part of ``tensor`` lies in the whole tensor, one slice per dimension."""
    if not is_sharded(tensor):
        return tuple(slice(0, n) for n in tensor.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


@torch.no_grad()
def write_full_(tensor: torch.Tensor, full: torch.Tensor) -> None:
    """Set ``tensor`` to ``full`` (the same whole value on every rank): each rank writes its own part."""
    local_tensor(tensor).copy_(full[local_slices(tensor)])


@torch.no_grad()
def set_rows_(tensor: torch.Tensor, rows: torch.Tensor, values) -> None:
    """``tensor[rows] = values`` for global indices ``rows`` along dim 0 (a scalar or one value per
    row); a rank writes the rows it holds."""
    part = local_slices(tensor)[0]
    inside = (rows >= part.start) & (rows < part.stop)
    if torch.is_tensor(values) and values.dim() > 0:
        values = values[inside]
    local_tensor(tensor)[rows[inside] - part.start] = values


@dataclass(frozen=True)
class RowShards:
    """How FSDP2 splits an out x in weight over the ranks of its (1-D) mesh: rank ``r`` of ``group``
    holds rows ``ranges[r]``."""

    group: object
    ranges: tuple[tuple[int, int], ...]
    me: int  # this process's rank in ``group``

    @classmethod
    def of(cls, weight: torch.Tensor, what: str) -> Optional["RowShards"]:
        """The row split of ``weight``, or None when it is not sharded."""
        if not is_sharded(weight):
            return None
        mesh = weight.device_mesh
        if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
            raise NotImplementedError(f"{what} under FSDP needs weights sharded by rows over a 1-D mesh (fully_shard's "
                                      f"default for nn.Linear), got placements {tuple(weight.placements)} on a "
                                      f"{mesh.ndim}-D mesh")
        group = mesh.get_group()
        rows = weight.shape[0]
        chunk = -(-rows // mesh.size())  # torch.chunk's split, which FSDP2 uses
        ranges = tuple((min(rows, r * chunk), min(rows, (r + 1) * chunk)) for r in range(mesh.size()))
        return cls(group, ranges, mesh.get_local_rank())


class RowShardSum:
    """The sum over ranks of a dense out x in tensor that each rank produces a block of rows at a
    time, of which each rank keeps only the rows of its own shard (``local``).

    Rows arrive in increasing order (``delta_linear.row_blocks``); as soon as one owner's rows are
    complete they are reduced onto that owner, so the transient buffer is one shard, never the whole
    tensor. Every rank must add the same blocks in the same order (it runs the same backward).
    """

    def __init__(self, shards: RowShards, columns: int, dtype: torch.dtype, device):
        self.shards = shards
        start, stop = shards.ranges[shards.me]
        self.local = torch.zeros(stop - start, columns, dtype=dtype, device=device)
        self._pending: Optional[tuple[int, torch.Tensor]] = None  # (owner, its rows so far)

    def add(self, start: int, stop: int, rows: torch.Tensor) -> None:
        for owner, (first, last) in enumerate(self.shards.ranges):
            lo, hi = max(start, first), min(stop, last)
            if lo >= hi:
                continue
            if self._pending is None or self._pending[0] != owner:
                self._pending = (owner, rows.new_zeros(last - first, rows.shape[1]))
            self._pending[1][lo - first:hi - first] += rows[lo - start:hi - start]
            if hi == last:
                self._reduce(owner, self._pending[1])
                self._pending = None

    def _reduce(self, owner: int, buffer: torch.Tensor) -> None:
        dst = torch.distributed.get_global_rank(self.shards.group, owner)
        torch.distributed.reduce(buffer, dst=dst, op=torch.distributed.ReduceOp.SUM, group=self.shards.group)
        if owner == self.shards.me:
            self.local += buffer.to(self.local.dtype)

    def full(self) -> torch.Tensor:
        """The whole summed tensor on every rank (a collective; transient, for a topology update)."""
        rows = self.shards.ranges[-1][1]
        columns = self.local.shape[1]
        mesh_group = self.shards.group
        sizes = [last - first for first, last in self.shards.ranges]
        chunk = max(sizes)
        padded = self.local.new_zeros(chunk, columns)
        padded[:self.local.shape[0]] = self.local
        gathered = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(gathered, padded, group=mesh_group)
        whole = torch.cat([part[:n] for part, n in zip(gathered, sizes)])
        assert whole.shape[0] == rows
        return whole
