"""Loader-side transforms: any PIL image -> a square uint8 tensor at the training input size.

Images stay uint8 until they reach the device (4x less host memory and transfer than float);
the trainer scales and normalises them there with the student's mean/std.

Aspect handling:
    pad      the default, as CLIPSelf's ``ResizeLongest(1024, fill=0)`` (src/open_clip/transform.py) and
             the region evaluation: resize the longer side to ``size`` keeping the aspect ratio and pad
             the bottom/right with black; the grid then tiles only the valid (unpadded) area
    stretch  resize to size x size, ignoring the aspect ratio (the paper's "1024 x 1024" read literally)

The keep-aspect size and the centred offsets come from ``denserc.images`` (``fit_within``,
``centred_letterbox``), as for detection's batch and the teacher's RoIAlign letterbox:
``SquareResize`` uses the size, ``LetterboxResize`` (the teacher's crops cut in the loader,
``data.teacher_crops: source``) the size and the offsets.
"""
from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from ..images import centred_letterbox, fit_within, to_rgb

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

    def valid_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of a width x height image once resized (the unpadded area)."""
        if self.aspect == "stretch":
            return self.size, self.size
        (new_h, new_w), _ = fit_within((height, width), (self.size, self.size))
        return int(new_h), int(new_w)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        image = to_rgb(image)
        height, width = self.valid_size(image.width, image.height)
        if self.aspect == "stretch":
            resized = image.resize((width, height), Image.Resampling.BICUBIC)
            return pil_to_tensor(resized), (height, width)
        canvas = Image.new("RGB", (self.size, self.size), (0, 0, 0))
        canvas.paste(image.resize((width, height), Image.Resampling.BICUBIC), (0, 0))
        return pil_to_tensor(canvas), (height, width)


class LetterboxResize:
    """PIL image -> uint8 tensor (3, height, width): longer side to fit, bicubic, centred on black.

    The peers' crop preprocess, ``ResizeMaxSize(224, fill=0)`` (CLIPSelf ``wusize/CLIPSelf`` @1c7fe9c
    src/open_clip/transform.py lines 26-49, chosen by ``resize_longest_max=True`` at lines 119-122 for
    ``preprocess_val_img`` in src/open_clip/factory.py lines 319-325; DeCLIP ``xiaomoguhz/DeCLIP`` @2c0b3de
    src/open_clip/transform.py lines 24-47): torchvision's ``resize`` of a PIL image (PIL bicubic) to
    ``denserc.images.centred_letterbox``'s size, then ``pad`` with 0 to its centred offsets. Here the same resize is pasted
    onto a black canvas (the same pixels; tests/test_source_crops.py checks it against their lines).
    """

    def __init__(self, size: tuple[int, int]):
        self.height, self.width = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        fitted, offsets = centred_letterbox((image.height, image.width), (self.height, self.width))
        (new_h, new_w), (top, left) = fitted.long().tolist(), offsets.long().tolist()
        canvas = Image.new("RGB", (self.width, self.height), (0, 0, 0))
        canvas.paste(to_rgb(image).resize((new_w, new_h), Image.Resampling.BICUBIC), (left, top))
        return pil_to_tensor(canvas)
