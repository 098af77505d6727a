"""Loader-side transforms: any PIL image -> a square uint8 tensor at the training input size.

Images stay uint8 until they reach the device (4x less host memory and transfer than float);
the trainer scales and normalises them there with the student's mean/std.

Aspect handling:
    pad      the default, as CLIPSelf's ``ResizeLongest(1024, fill=0)`` (src/open_clip/transform.py) and
             the region evaluation: resize the longer side to ``size`` keeping the aspect ratio and pad
             the bottom/right with black; the grid then tiles only the valid (unpadded) area
    stretch  resize to size x size, ignoring the aspect ratio (the paper's "1024 x 1024" read literally)
"""
from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from ..images import fit_within, to_rgb

ASPECT_MODES = ("pad", "stretch")


class SquareResize:
    """PIL image -> (uint8 tensor (3, size, size), valid (height, width) before padding)."""

    def __init__(self, size: int, aspect: str = "pad"):
        if aspect not in ASPECT_MODES:
            raise ValueError(f"aspect must be one of {ASPECT_MODES}, got {aspect!r}")
        if size < 1:
            raise ValueError(f"image size must be positive, got {size}")
        self.size = size
        self.aspect = aspect

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        image = to_rgb(image)
        if self.aspect == "stretch":
            resized = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
            return pil_to_tensor(resized), (self.size, self.size)
        (height, width), _ = fit_within((image.height, image.width), (self.size, self.size))
        height, width = int(height), int(width)
        canvas = Image.new("RGB", (self.size, self.size), (0, 0, 0))
        canvas.paste(image.resize((width, height), Image.Resampling.BICUBIC), (0, 0))
        return pil_to_tensor(canvas), (height, width)
