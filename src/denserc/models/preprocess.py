"""The one normalisation of images into a model's input: ``(pixels / white - mean) / std``."""
from __future__ import annotations

from typing import Mapping

import torch


def normalize_images(images: torch.Tensor, preprocess_cfg: Mapping, *, white: float = 255.0) -> torch.Tensor:
    """(..., 3, H, W) images whose white is ``white`` (255 for uint8 pixels, 1 for [0, 1]) -> float32 input.

    ``preprocess_cfg`` holds the per-channel ``mean`` and ``std`` of [0, 1] pixels: a DenseRC model's
    ``preprocess_cfg`` (open_clip's) or a timm model's ``pretrained_cfg``. The order of operations is
    open_clip's own preprocessing (``ToTensor`` divides by 255, then ``Normalize``).
    """
    mean = torch.tensor(preprocess_cfg["mean"], dtype=torch.float32, device=images.device).view(3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"], dtype=torch.float32, device=images.device).view(3, 1, 1)
    return (images.float() / white - mean) / std
