"""Detection training as a task on the library's training engine (``denserc.engine.loop``).

The engine owns the run (accumulation to the global batch, autocast, DDP, AdamW + warm-up, clipping,
atomic checkpoints, exact resume, metrics, progress, export); this task says what trains:

- ``module``: ``FViTHeads`` (pyramid, FPN, RPN, RoI heads); its forward returns the loss dict.
- ``prepare``: on the device, outside DDP and without gradients, the seeded augmentation
  (``data.augment``) and the frozen tower's tapped block outputs.
- ``export``: the detector folder ``denserc.detect.load`` reads (tower, heads, config, split).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..distributed import DistributedEnv
from ..engine.loop import Task
from .config import DetectConfig
from .data import DetectionDataset, augment, collate_samples, normalisation
from .detector import build_heads, build_tower, save_detector
from .evaluation import read_split
from .protocols import get_protocol


class DetectionTask(Task):
    """F-ViT on the base classes of ``config.data.protocol``'s split of the training annotations."""

    progress_fields = {"loss": "loss", "cls": "loss_classifier", "rpn": "loss_objectness"}

    def __init__(self, config: DetectConfig, env: DistributedEnv):
        torch.manual_seed(config.train.seed)
        self.config = config
        self.device = env.device
        data = config.data
        ground_truth, self.split = read_split(data.train_annotations, get_protocol(data.protocol), scoring=False,
                                              what="training annotation")
        self.dataset = DetectionDataset(data.train_annotations, data.train_images, self.split, base_only=True,
                                        with_masks=config.detector.masks, ground_truth=ground_truth)
        self.num_workers = data.num_workers
        self.tower = build_tower(config).to(env.device).requires_grad_(False).eval()
        heads = build_heads(config, self.tower, self.split)
        if env.distributed:
            heads = nn.SyncBatchNorm.convert_sync_batchnorm(heads)
        self.module = heads.to(env.device)
        self.mean, self.std = normalisation(data, self.tower)

    def collate(self, samples: list[dict]) -> list[dict]:
        return collate_samples(samples)

    def prepare(self, batch: list[dict], epoch: int) -> dict:
        data = self.config.data
        inputs = augment(batch, data.image_size, self.mean, self.std, self.device, seed=self.config.train.seed,
                         epoch=epoch, scale_range=tuple(data.scale_range), flip=data.flip)
        _, maps = self.tower.encode_dense_with_taps(inputs.images, self.config.detector.taps)
        return {"maps": maps, "image_sizes": inputs.image_sizes, "targets": inputs.targets}

    def export(self, folder: Path) -> None:
        save_detector(folder, self.tower, self.module, self.config, self.split)

    def describe(self) -> str:
        return (f"F-ViT heads ({sum(p.numel() for p in self.module.parameters()):,} parameters) on frozen "
                f"{self.tower.model_name}, {self.config.data.protocol}: {len(self.split.base_ids)} base / "
                f"{len(self.split.novel_ids)} novel classes")
