"""Sharded evaluation under ``torchrun``: each rank takes every world_size-th image, counts are summed.

Every metric here is a sum (confusion matrix, hit counts), so one ``all_reduce(SUM)`` per tensor
gives exactly the single-process result, whatever the split.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in 0..{self.world_size - 1}, got {self.rank}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def indices(self, count: int) -> list[int]:
        """This rank's share of ``count`` items: rank, rank + world_size, ..."""
        return list(range(self.rank, count, self.world_size))


def setup(device: str | None) -> tuple[Shard, torch.device]:
    """Join the torchrun process group if there is one; return this rank's shard and device.

    Under torchrun with CUDA each rank uses GPU ``LOCAL_RANK`` and NCCL; otherwise gloo on ``device``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world_size == 1:
        return Shard(), torch.device(device)
    use_cuda = torch.device(device).type == "cuda"
    if use_cuda:
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Shard(dist.get_rank(), dist.get_world_size()), torch.device(device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (a no-op outside a multi-process group); returns it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def teardown() -> None:
    """Leave the process group joined by ``setup`` (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
