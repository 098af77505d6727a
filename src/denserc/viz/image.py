"""Reading a user's image file as RGB, and turning it into the model's normalised input tensor.

Files come in every mode a camera, scanner or editor writes; all of them end up as 8-bit RGB in the
orientation a photo viewer shows (EXIF rotation applied), so the outputs line up with what the user sees.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..models import normalize_images

# Transparent pixels are shown on white, as image viewers and browsers do.
TRANSPARENCY_BACKGROUND = (255, 255, 255)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
SIXTEEN_BIT_MAX = 65535
# Working resolution: the long side is at most this many times the short side (mmseg's (2048, 448)
# scale caps it at about 4.6), so a panorama does not explode into thousands of windows.
MAX_ASPECT_RATIO = 4


class ImageReadError(ValueError):
    """The file exists but cannot be decoded as an image."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image, upright per its EXIF orientation.

    Handles RGBA/LA/palette transparency (composited on white), grayscale, 1-bit, CMYK and 16-bit
    grayscale (scaled from 0..65535, not clipped as PIL's own conversion does).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected an image file (PNG, JPEG, ...)")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except Image.DecompressionBombError as error:
        raise ImageReadError(f"cannot read {path}: {error}") from error
    except UnidentifiedImageError as error:
        raise ImageReadError(f"cannot read {path} as an image: not a format Pillow recognises "
                             "(expected PNG, JPEG, WebP, TIFF, BMP, GIF, ...)") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"cannot read {path} as an image: the file is truncated or corrupt "
                             f"({error})") from error
    try:
        return to_rgb(image)
    except ValueError as error:
        raise ImageReadError(f"{path}: {error}") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (see ``load_image``)."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > SIXTEEN_BIT_MAX):
            raise ValueError(f"{image.mode} image has values in {values.min()}..{values.max()}; "
                             f"expected a 16-bit image in 0..{SIXTEEN_BIT_MAX}")
        scaled = np.round(values * 255 / SIXTEEN_BIT_MAX).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    if image.mode == "F":
        raise ValueError("32-bit float images are not supported; save the image as 8- or 16-bit")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, TRANSPARENCY_BACKGROUND + (255,))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def resized_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """(width, height) scaled to a short side of ``short_side``, the long side capped at
    MAX_ASPECT_RATIO times that (as mmseg's keep-ratio resize caps panoramas)."""
    if short_side <= 0:
        raise ValueError(f"short_side must be positive, got {short_side}")
    width, height = size
    scale = min(short_side / min(width, height), MAX_ASPECT_RATIO * short_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_model_input(image: Image.Image, preprocess_cfg: dict, short_side: int) -> torch.Tensor:
    """RGB PIL image -> (1, 3, h, w) float tensor: bicubic resize and the model's mean/std, as
    open_clip's own preprocessing does."""
    resized = image.convert("RGB").resize(resized_size(image.size, short_side), Image.Resampling.BICUBIC)
    return normalize_images(torch.from_numpy(np.array(resized)).permute(2, 0, 1)[None], preprocess_cfg)
