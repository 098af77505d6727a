"""Pictures of dense predictions, drawn with PIL at the input image's own size.

The legend and the colour bar are drawn inside the image (on translucent panels), so the output
pixel grid is the input's and the two can be compared or flipped between directly.
"""
from __future__ import annotations

import colorsys
import json
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from ..io import atomic_write

# Kelly's colours of maximum contrast (white and black left out: they vanish on light/dark photos),
# ordered so that the first few classes get the most different hues.
KELLY_COLOURS = (
    (190, 0, 50), (0, 103, 165), (0, 136, 86), (243, 195, 0), (135, 86, 146), (243, 132, 0),
    (161, 202, 241), (230, 143, 172), (141, 182, 0), (132, 132, 130), (194, 178, 128), (96, 78, 151),
    (249, 147, 121), (246, 166, 0), (179, 68, 108), (220, 211, 0), (136, 45, 23), (101, 69, 34),
    (226, 88, 34), (43, 61, 38),
)
GOLDEN_RATIO_CONJUGATE = 0.618033988749895

# Heat colour map: anchors at even steps from low to high similarity (dark blue -> cyan -> green ->
# yellow -> red), linearly interpolated.
HEAT_ANCHORS = ((35, 23, 90), (30, 110, 220), (30, 200, 200), (110, 220, 70), (250, 200, 30), (215, 30, 20))

PANEL_FILL = (0, 0, 0, 165)
TEXT_FILL = (255, 255, 255, 255)
BOUNDARY_FILL = (255, 255, 255)
# Font height relative to the image's short side, and the range it is kept in (pixels).
FONT_FRACTION = 1 / 22
MIN_FONT_SIZE = 7
MAX_FONT_SIZE = 40
BOUNDARY_FRACTION = 1 / 400
COLORBAR_HEIGHT_FRACTION = 0.6
COLORBAR_TICKS = 5
METADATA_KEY = "denserc"


@dataclass
class LegendEntry:
    name: str
    colour: tuple[int, int, int]
    fraction: float  # share of the image's pixels with this label
    swatch: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the drawn colour square, inclusive


@dataclass
class ColourBar:
    vmin: float
    vmax: float
    bar: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the gradient, inclusive; vmax at the top


def palette(count: int) -> list[tuple[int, int, int]]:
    """``count`` distinct RGB colours: Kelly's list, then hues stepped by the golden ratio."""
    colours = list(KELLY_COLOURS[:count])
    hue = 0.0
    while len(colours) < count:
        hue = (hue + GOLDEN_RATIO_CONJUGATE) % 1.0
        saturation, value = (0.85, 0.9) if len(colours) % 2 else (0.6, 0.7)
        colours.append(tuple(round(c * 255) for c in colorsys.hsv_to_rgb(hue, saturation, value)))
    return colours


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) -> uint8 RGB of the heat colour map, shape values.shape + (3,)."""
    anchors = np.asarray(HEAT_ANCHORS, dtype=np.float64)
    positions = np.linspace(0.0, 1.0, len(anchors))
    values = np.clip(values, 0.0, 1.0)
    channels = [np.interp(values, positions, anchors[:, c]) for c in range(3)]
    return np.round(np.stack(channels, axis=-1)).astype(np.uint8)


def draw_segmentation(image: Image.Image, labels: np.ndarray, class_names: list[str], *,
                      alpha: float = 0.5) -> tuple[Image.Image, list[LegendEntry]]:
    """Blend a colour per class over ``image``, outline the regions and add a legend of every class.

    ``labels`` (H, W) holds indices into ``class_names``; the legend lists all classes in order with
    the share of pixels each got (0% for classes that were never chosen).
    """
    labels = np.asarray(labels)
    if labels.shape != (image.height, image.width):
        raise ValueError(f"label map has shape {labels.shape}, expected the image's {(image.height, image.width)}")
    _check_alpha(alpha)
    colours = np.asarray(palette(len(class_names)), dtype=np.float32)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = base * (1 - alpha) + colours[labels] * alpha
    blended[_boundaries(labels, max(1, round(min(labels.shape) * BOUNDARY_FRACTION)))] = BOUNDARY_FILL
    canvas = Image.fromarray(np.round(blended).astype(np.uint8))
    counts = np.bincount(labels.ravel(), minlength=len(class_names))
    fractions = counts / labels.size
    lines = [f"{name}  {100 * share:.1f}%" for name, share in zip(class_names, fractions)]
    swatches = _draw_legend(canvas, lines, [tuple(int(c) for c in colour) for colour in colours])
    entries = [LegendEntry(name, tuple(int(c) for c in colour), float(share), swatch)
               for name, colour, share, swatch in zip(class_names, colours, fractions, swatches)]
    return canvas, entries


def draw_heatmap(image: Image.Image, similarity: np.ndarray, *, caption: str, alpha: float = 0.5,
                 vmin: float | None = None, vmax: float | None = None) -> tuple[Image.Image, ColourBar]:
    """Blend the colour-mapped ``similarity`` (H, W) over ``image`` with a caption and a colour bar.

    The colour map spans [vmin, vmax], by default the map's own minimum and maximum.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.shape != (image.height, image.width):
        raise ValueError(f"similarity map has shape {similarity.shape}, expected the image's "
                         f"{(image.height, image.width)}")
    _check_alpha(alpha)
    vmin = float(similarity.min()) if vmin is None else float(vmin)
    vmax = float(similarity.max()) if vmax is None else float(vmax)
    if vmax < vmin:
        raise ValueError(f"vmax must not be below vmin, got vmin={vmin}, vmax={vmax}")
    heat = heat_colours(_unit_scale(similarity, vmin, vmax)).astype(np.float32)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    canvas = Image.fromarray(np.round(base * (1 - alpha) + heat * alpha).astype(np.uint8))
    font = _font(_preferred_font_size(canvas))
    _draw_caption(canvas, caption, font)
    bar = _draw_colour_bar(canvas, vmin, vmax, font)
    return canvas, ColourBar(vmin, vmax, bar)


def save_png(image: Image.Image, path: str | os.PathLike, metadata: dict) -> None:
    """Write ``image`` as PNG atomically, with ``metadata`` as JSON in a text chunk (key "denserc")."""
    info = PngInfo()
    info.add_text(METADATA_KEY, json.dumps(metadata))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_metadata(path: str | os.PathLike) -> dict:
    """The metadata ``save_png`` wrote into ``path``."""
    with Image.open(path) as image:
        text = image.text.get(METADATA_KEY)
    if text is None:
        raise ValueError(f"{path} has no '{METADATA_KEY}' metadata (not written by denserc segment/heatmap)")
    return json.loads(text)


# ------------------------------------------------------------------------------------ internals
def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def _unit_scale(values, vmin: float, vmax: float):
    """Map [vmin, vmax] linearly to [0, 1]; a constant range (vmin == vmax) maps everything to 0."""
    return (values - vmin) / (vmax - vmin) if vmax > vmin else np.zeros_like(values)


def _boundaries(labels: np.ndarray, thickness: int) -> np.ndarray:
    """Boolean (H, W): pixels within ``thickness`` of a change of label."""
    edges = np.zeros(labels.shape, dtype=bool)
    edges[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edges[1:, :] |= labels[1:, :] != labels[:-1, :]
    if thickness > 1:  # grow by a square, as a row pass then a column pass
        grown = torch.from_numpy(edges).float()[None, None]
        size, pad = 2 * thickness - 1, thickness - 1
        grown = F.max_pool2d(grown, kernel_size=(1, size), stride=1, padding=(0, pad))
        grown = F.max_pool2d(grown, kernel_size=(size, 1), stride=1, padding=(pad, 0))
        edges = grown[0, 0].numpy() > 0
    return edges


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _preferred_font_size(image: Image.Image) -> int:
    return int(np.clip(round(min(image.size) * FONT_FRACTION), MIN_FONT_SIZE, MAX_FONT_SIZE))


def _legend_layout(lines: list[str], size: int, image_size: tuple[int, int]):
    """Font, geometry and column split of the legend at font ``size``; None if it cannot fit."""
    font = _font(size)
    pad = max(2, size // 3)
    row = round(size * 1.35)
    text_width = max(font.getbbox(line)[2] for line in lines)
    column_width = size + pad + text_width + pad
    width, height = image_size
    rows_per_column = max(1, (height - 2 * pad - 2 * pad) // row)
    columns = -(-len(lines) // rows_per_column)
    rows = min(len(lines), rows_per_column)
    panel = (columns * column_width + pad, rows * row + pad)
    fits = panel[0] + 2 * pad <= width and panel[1] + 2 * pad <= height
    return font, pad, row, column_width, rows, panel, fits


def _draw_legend(canvas: Image.Image, lines: list[str], colours: list[tuple[int, int, int]]):
    """Draw a legend panel in the top-left corner; returns each line's swatch box."""
    for size in range(_preferred_font_size(canvas), MIN_FONT_SIZE - 1, -1):
        font, pad, row, column_width, rows, panel, fits = _legend_layout(lines, size, canvas.size)
        if fits:
            break
    else:
        warnings.warn(f"the image ({canvas.width}x{canvas.height}) is too small for a readable legend of "
                      f"{len(lines)} classes; the legend is cut off (the PNG's metadata lists every class)",
                      stacklevel=3)
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rectangle((pad, pad, pad + panel[0] - 1, pad + panel[1] - 1), fill=PANEL_FILL)
    swatches = []
    for index, (line, colour) in enumerate(zip(lines, colours)):
        column, position = divmod(index, rows)
        x = 2 * pad + column * column_width
        y = 2 * pad + position * row
        swatch = (x, y, x + size - 1, y + size - 1)
        draw.rectangle(swatch, fill=colour + (255,))
        draw.text((x + size + pad, y + size / 2), line, font=font, fill=TEXT_FILL, anchor="lm")
        swatches.append(swatch)
    canvas.paste(Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB"))
    return swatches


def _draw_caption(canvas: Image.Image, caption: str, font: ImageFont.FreeTypeFont) -> None:
    """The query in a panel at the top-left corner."""
    pad = max(2, font.size // 3)
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    left, top, right, bottom = draw.textbbox((2 * pad, 2 * pad), caption, font=font)
    draw.rectangle((pad, pad, right + pad, bottom + pad), fill=PANEL_FILL)
    draw.text((2 * pad, 2 * pad), caption, font=font, fill=TEXT_FILL)
    canvas.paste(Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB"))


def _draw_colour_bar(canvas: Image.Image, vmin: float, vmax: float,
                     font: ImageFont.FreeTypeFont) -> tuple[int, int, int, int]:
    """A vertical gradient with cosine-similarity ticks at the right edge; returns the gradient's box."""
    pad = max(2, font.size // 3)
    ticks = np.linspace(vmax, vmin, COLORBAR_TICKS)
    labels = [f"{tick:.3f}" for tick in ticks]
    label_width = max(font.getbbox(label)[2] for label in labels)
    bar_width = max(4, font.size)
    bar_height = max(COLORBAR_TICKS, round(canvas.height * COLORBAR_HEIGHT_FRACTION))
    x1 = canvas.width - 2 * pad - 1
    x0 = x1 - bar_width + 1
    y0 = (canvas.height - bar_height) // 2
    y1 = y0 + bar_height - 1
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rectangle((x0 - 2 * pad - label_width - pad, y0 - font.size, x1 + pad, y1 + font.size), fill=PANEL_FILL)
    for tick, label in zip(ticks, labels):
        y = y1 - round(_unit_scale(tick, vmin, vmax) * (bar_height - 1))
        draw.line((x0 - pad, y, x0 - 1, y), fill=TEXT_FILL)
        draw.text((x0 - 2 * pad, y), label, font=font, fill=TEXT_FILL, anchor="rm")
    canvas.paste(Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB"))
    gradient = heat_colours(np.linspace(1.0, 0.0, bar_height))
    strip = np.repeat(gradient[:, None, :], bar_width, axis=1)
    canvas.paste(Image.fromarray(strip), (x0, y0))
    return (x0, y0, x1, y1)
