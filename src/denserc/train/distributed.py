"""Process-group setup for ``torchrun`` (one node or many) and the few collectives the trainer needs.

Without torchrun (no WORLD_SIZE in the environment) everything runs in one process and the
collectives are no-ops. With CUDA each process drives the GPU named by LOCAL_RANK over NCCL;
on CPU the processes talk over gloo.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistributedEnv:
    """Read torchrun's environment, pick the device and join the process group if there is one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is available (use train.device=cpu)")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but this node has only {torch.cuda.device_count()} "
                               "GPUs: use torchrun --nproc_per_node at most the number of GPUs")
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend,
                                device_id=torch_device if torch_device.type == "cuda" else None)
    return DistributedEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
    """Sum or mean of ``tensor`` over all processes (in place; returned for chaining)."""
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
