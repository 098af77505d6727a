"""Process groups under ``torchrun`` (one node or many), and the few collectives training and evaluation need.

Without torchrun (no WORLD_SIZE in the environment) everything runs in one process and the
collectives are no-ops. With CUDA each process drives the GPU named by LOCAL_RANK over NCCL;
on CPU the processes talk over gloo. Training splits each global batch over the processes;
evaluation gives each process every world_size-th image (``DistributedEnv.indices``) and sums the
counts with ``all_reduce``, which equals the single-process result because every metric is a sum.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedEnv:
    """This process's place among the processes (the defaults: the only one) and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in 0..{self.world_size - 1}, got {self.rank}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def indices(self, count: int) -> list[int]:
        """This process's share of ``count`` items: rank, rank + world_size, ..."""
        return list(range(self.rank, count, self.world_size))


def resolve_device(device: str | None) -> str:
    """"auto" (or None): CUDA if available, else the CPU; any other torch device name as it is."""
    if device in ("auto", None):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def setup_distributed(device: str | None = "auto") -> DistributedEnv:
    """Read torchrun's environment, pick the device and join the process group if there is one.

    ``device``: "auto" (or None) for CUDA if available, else the CPU; or any torch device name. Under
    torchrun a CUDA process uses GPU ``LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device)
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device} requested but no CUDA device is available (use cpu)")
        if world_size > 1 or torch_device.index is None:
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"LOCAL_RANK={local_rank} but this node has only {torch.cuda.device_count()} "
                                   "GPUs: use torchrun --nproc_per_node at most the number of GPUs")
            torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend,
                                device_id=torch_device if torch_device.type == "cuda" else None)
    return DistributedEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def cleanup_distributed() -> None:
    """Leave the process group joined by ``setup_distributed`` (if any)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """``op`` "sum" or "mean" of ``tensor`` over all processes, in place; returned for chaining."""
    if op not in ("sum", "mean"):
        raise ValueError(f"all_reduce: op must be 'sum' or 'mean', got {op!r}")
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        if op == "mean":
            tensor /= dist.get_world_size()
    return tensor


def broadcast_object(obj):
    """Rank 0's ``obj`` on every process."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(obj) -> list:
    """Every process's ``obj``, indexed by rank, on every process."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
