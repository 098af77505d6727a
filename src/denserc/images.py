"""Reading image files as RGB: the one loader that training, evaluation and visualisation share.

Files come in every mode a camera, scanner or editor writes; all of them end up as 8-bit RGB in the
orientation a photo viewer shows (EXIF rotation applied), so a 16-bit PNG or a palette PNG with
transparency reads the same wherever it is used, and every error names the file.

It also holds the resize geometry every consumer shares: the keep-aspect fit of the letterboxes
(``fit_within``: the training loader's PIL image, detection's tensor batch, the teacher's RoI crops,
centred by ``centred_letterbox`` for the teacher's crops, cut from the batch or in the loader)
and the short-side resize (``short_side_size``: evaluation, CAT-Seg, ``denserc segment``/``heatmap``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Transparent pixels are shown on white, as image viewers and browsers do.
TRANSPARENCY_BACKGROUND = (255, 255, 255)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
SIXTEEN_BIT_MAX = 65535


class ImageReadError(ValueError):
    """The file exists but cannot be decoded as an image."""


def load_image(path: str | os.PathLike, upright: bool = True) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image, upright per its EXIF orientation.

    Handles RGBA/LA/palette transparency (composited on white), grayscale, 1-bit, CMYK and 16-bit
    grayscale (scaled from 0..65535, not clipped as PIL's own conversion does). ``upright=False`` keeps
    the stored pixel grid, for evaluation images whose label maps were drawn on it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected an image file (PNG, JPEG, ...)")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened) if upright else opened.copy()
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
    """Any PIL mode -> 8-bit RGB (see ``load_image``); 32-bit float images are refused, not guessed at."""
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


def fit_within(sizes, bound: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep-aspect fit of (..., 2) (height, width) sizes into ``bound`` (H, W): ((..., 2) int64 sizes, (...,) scales).

    scale = min(H / h, W / w) and each side becomes round(side * scale), clamped to 1..its bound side,
    in float64 with half-to-even rounding: Python's ``round`` in CLIPSelf's ``ResizeMaxSize``
    (src/open_clip/transform.py) and mmdet's keep-ratio ``Resize``.
    """
    sizes = torch.as_tensor(sizes, dtype=torch.float64)
    limits = torch.tensor(bound, dtype=torch.float64, device=sizes.device)
    scale = (limits / sizes).amin(-1)
    fitted = torch.minimum(torch.round(sizes * scale[..., None]).clamp(min=1), limits)
    return fitted.long(), scale


def centred_letterbox(sizes, bound: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """((..., 2) fitted (height, width), (..., 2) (top, left) offsets), float64, of sizes letterboxed into
    ``bound`` and centred: ``fit_within``'s size at offsets floor((bound - size) / 2), the peers'
    ``pad_h // 2``, ``pad_w // 2`` (CLIPSelf src/open_clip/transform.py ``ResizeMaxSize``, line 47)."""
    fitted, _ = fit_within(sizes, bound)
    fitted = fitted.to(torch.float64)
    limits = torch.tensor(bound, dtype=torch.float64, device=fitted.device)
    return fitted, ((limits - fitted) / 2).floor()


def short_side_size(height: int, width: int, short_side: int, max_long_side: float) -> tuple[int, int]:
    """(height, width) scaled so the short side is ``short_side`` unless the long side would pass
    ``max_long_side``: mmseg's keep-ratio ``Resize(scale=(max_long_side, short_side))`` (``rescale_size``,
    sides rounded as int(side * scale + 0.5)), at least 1 pixel."""
    if short_side <= 0:
        raise ValueError(f"short_side must be positive, got {short_side}")
    scale = min(short_side / min(height, width), max_long_side / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
