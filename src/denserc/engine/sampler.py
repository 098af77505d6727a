"""Epoch-seeded distributed sampling that can start anywhere inside an epoch.

Each epoch's order is one global permutation seeded by (seed, epoch). The first
``samples_per_epoch`` entries are dealt round-robin to the processes (process r takes positions
r, r + W, r + 2W, ...), so one optimizer step consumes the next ``global_batch_size`` positions
whatever the number of processes. Resuming at global position p deals permutation[p:] the same
way: the remaining samples of the epoch are exactly those an uninterrupted run would have seen.

With ``with_epoch=True`` the sampler deals ``(epoch, index)`` pairs instead of bare indices, for a dataset
whose samples depend on the epoch (the distillation task's crops cut in the loader, ``data.teacher_crops:
source``). The epoch then travels with every index from the process that iterates the sampler to whichever
loader worker fetches the sample, so it is right with any number of workers, persistent or not (a worker's
copy of the dataset never needs to be told the epoch), on every DDP process (each sampler is set to the same
epoch) and after an exact resume (``set_epoch(epoch, start)`` deals the same pairs an uninterrupted run would).
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    def __init__(self, dataset_size: int, samples_per_epoch: int, *, world_size: int = 1, rank: int = 0,
                 seed: int = 0, with_epoch: bool = False):
        if samples_per_epoch > dataset_size or samples_per_epoch % world_size:
            raise ValueError(f"samples_per_epoch={samples_per_epoch} must be at most the dataset size "
                             f"{dataset_size} and a multiple of world_size={world_size}")
        self.dataset_size = dataset_size
        self.samples_per_epoch = samples_per_epoch
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.with_epoch = with_epoch
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Deal epoch ``epoch`` from global position ``start`` (a multiple of the world size)."""
        if start % self.world_size or not 0 <= start <= self.samples_per_epoch:
            raise ValueError(f"start={start} must be a multiple of world_size={self.world_size} in "
                             f"0..{self.samples_per_epoch}")
        self.epoch = epoch
        self.start = start

    def order(self) -> list[int]:
        """The epoch's global permutation (the same on every process)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.dataset_size, generator=generator)[:self.samples_per_epoch].tolist()

    def __iter__(self):
        indices = self.order()[self.start + self.rank::self.world_size]
        return iter([(self.epoch, index) for index in indices] if self.with_epoch else indices)

    def __len__(self) -> int:
        return (self.samples_per_epoch - self.start) // self.world_size
