"""The one collective sparse-peft needs: topology decisions (SEFT's drop-and-grow, SPT's gradual
Wanda pruning) are made from statistics summed over data-parallel ranks, so every rank decides
the same. Without an initialised process group these are no-ops."""

from __future__ import annotations

import torch


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks (returns it)."""
    if world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor
