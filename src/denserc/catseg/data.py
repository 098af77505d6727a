"""CAT-Seg's training samples: resized, cropped, colour-jittered and flipped (image, label) pairs.

The pipeline is detectron2's ``mask_former_semantic`` mapper as CAT-Seg configures it
(``cvlab-kaist/CAT-Seg`` ``cat_seg/data/dataset_mappers/mask_former_semantic_dataset_mapper.py``,
``configs/config.yaml`` ``INPUT``):

    ResizeShortestEdge(384)   short side to ``crop_size`` (bilinear; labels nearest)
    RandomCrop(384 x 384)     ``SINGLE_CATEGORY_MAX_AREA: 1.0`` makes it a plain random crop
    ColorAugSSD               brightness +-32, contrast x[0.5, 1.5], saturation x[0.5, 1.5], hue +-18/180 of
                              a turn, each with probability 1/2, contrast first or last at random
    RandomFlip                horizontal, probability 1/2
    pad to 384 x 384          image 0, label 255 (only when the resized image is smaller)

Colour jitter uses torchvision's saturation/hue operators (grey blend, HSV rotation); detectron2's
version scales OpenCV's HSV channels, which differs at the level of rounding and clipping.
Labels can be remapped (``label_map``): classes held out of training map to 255 and so are never
a training target.

CAT-Seg's schedule is one pass over ``iterations x batch`` draws of the training images (``Repeated``;
``config.py``): an image recurs about three times in 80k x 4 draws, and each draw is augmented afresh, as
detectron2's mapper does on every read. The crops are therefore made over the draws, not the images:
every draw's randomness comes from (seed, epoch, draw index), with the epoch always 0 (the schedule is
one epoch), so two draws of one image get their own crop, jitter and flip while a resumed run
reproduces each draw exactly.
"""
from __future__ import annotations

import math

from typing import Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

from ..data.grid import draw_seed
from ..eval.datasets import resize_short_side
from ..eval.metrics import IGNORE_INDEX


def training_label_map(num_classes: int, train_classes: Sequence[int]) -> torch.Tensor:
    """(65536,) lookup over 8- and 16-bit labels: dataset class train_classes[i] -> i, every other value -> 255."""
    if len(set(train_classes)) != len(train_classes) or not all(0 <= c < num_classes for c in train_classes):
        raise ValueError(f"training classes must be distinct ids in 0..{num_classes - 1}, got {list(train_classes)}")
    if len(train_classes) >= IGNORE_INDEX:
        raise ValueError(f"at most {IGNORE_INDEX - 1} training classes fit 8-bit training labels")
    lookup = torch.full((2 ** 16,), IGNORE_INDEX, dtype=torch.uint8)
    lookup[torch.tensor(list(train_classes), dtype=torch.long)] = torch.arange(len(train_classes), dtype=torch.uint8)
    return lookup


def photometric_distortion(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """ColorAugSSD on a (3, H, W) uint8 RGB image, each step with probability 1/2."""
    def chance() -> bool:
        return bool(torch.rand((), generator=generator) < 0.5)

    def uniform(low: float, high: float) -> float:
        return float(low + (high - low) * torch.rand((), generator=generator))

    x = image.float()
    if chance():
        x = x + uniform(-32, 32)
    contrast_first = chance()

    def contrast(x):
        return x * uniform(0.5, 1.5) if chance() else x
    if contrast_first:
        x = contrast(x)
    x = x.clamp(0, 255).round().to(torch.uint8)
    if chance():
        x = TF.adjust_saturation(x, uniform(0.5, 1.5))
    if chance():
        x = TF.adjust_hue(x, uniform(-18, 18) / 180)
    if not contrast_first:
        x = contrast(x.float()).clamp(0, 255).round().to(torch.uint8)
    return x


class Repeated(Dataset):
    """``length`` draws from ``base``, index i -> base[i mod len(base)] (the sampler shuffles the draws)."""

    def __init__(self, base: Dataset, length: int):
        self.base = base
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.base[index % len(self.base)]


class TrainingCrops(Dataset):
    """``base[i]`` = {"image": (3, H, W) uint8, "label": (H, W)} -> a CAT-Seg training crop and its label;
    ``base`` is indexed by draw (``Repeated``), and each index gets its own augmentation."""

    def __init__(self, base: Dataset, crop_size: int, label_map: torch.Tensor | None = None, seed: int = 0):
        self.base = base
        self.crop_size = crop_size
        self.label_map = label_map
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        sample = self.base[index]
        generator = torch.Generator().manual_seed(draw_seed(self.seed, 0, index))  # epoch 0: one pass
        image, label = sample["image"], sample["label"].long()
        if self.label_map is not None:
            label = self.label_map[label].long()
        image, label = self._resize(image, label)
        image, label = self._crop(image, label, generator)
        image = photometric_distortion(image, generator)
        if torch.rand((), generator=generator) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return {"image": image, "label": label.to(torch.uint8)}

    def _resize(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Short side to the crop size (the evaluation's ``resize_short_side``, no cap on the long side); the
        label nearest."""
        resized = resize_short_side(image, self.crop_size, max_long_side=math.inf)
        if resized.shape == image.shape:
            return image, label
        label = F.interpolate(label[None, None].float(), size=resized.shape[1:], mode="nearest")[0, 0].long()
        return resized, label

    def _crop(self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator):
        size = self.crop_size
        height, width = image.shape[1:]
        top = int(torch.randint(0, max(height - size, 0) + 1, (), generator=generator))
        left = int(torch.randint(0, max(width - size, 0) + 1, (), generator=generator))
        image, label = image[:, top:top + size, left:left + size], label[top:top + size, left:left + size]
        pad_bottom, pad_right = size - image.shape[1], size - image.shape[2]
        if pad_bottom or pad_right:
            image = F.pad(image, (0, pad_right, 0, pad_bottom), value=0)
            label = F.pad(label, (0, pad_right, 0, pad_bottom), value=IGNORE_INDEX)
        return image, label
