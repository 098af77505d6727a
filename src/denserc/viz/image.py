"""Turning an RGB image into the model's normalised input tensor (files are read by ``denserc.images``)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..images import short_side_size
from ..models import normalize_images

# Working resolution: the long side is at most this many times the short side (mmseg's (2048, 448)
# scale caps it at about 4.6), so a panorama does not explode into thousands of windows.
MAX_ASPECT_RATIO = 4


def resized_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """(width, height) scaled to a short side of ``short_side``, the long side capped at
    MAX_ASPECT_RATIO times that (as mmseg's keep-ratio resize caps panoramas)."""
    height, width = short_side_size(size[1], size[0], short_side, MAX_ASPECT_RATIO * short_side)
    return width, height


def to_model_input(image: Image.Image, preprocess_cfg: dict, short_side: int) -> torch.Tensor:
    """RGB PIL image -> (1, 3, h, w) float tensor: bicubic resize and the model's mean/std, as
    open_clip's own preprocessing does."""
    resized = image.convert("RGB").resize(resized_size(image.size, short_side), Image.Resampling.BICUBIC)
    return normalize_images(torch.from_numpy(np.array(resized)).permute(2, 0, 1)[None], preprocess_cfg)
