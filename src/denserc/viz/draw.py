"""Pictures of dense predictions at the input image's own size: matplotlib draws the legend and the colour bar.

The overlay (the image blended with class colours or the heat colours) is computed in numpy and placed
pixel for pixel on a matplotlib figure of exactly the image's size (``figimage``, 1 point = 1 pixel);
matplotlib's legend, colour bar and text are drawn inside it on translucent panels, so the output pixel
grid is the input's and the two can be compared or flipped between directly. Class colours come from
matplotlib's qualitative ``tab20`` map, heat colours from its ``turbo`` map.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.patches import Patch, Rectangle
from matplotlib.transforms import Bbox, IdentityTransform
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..io import atomic_write

QUALITATIVE_MAP = "tab20"  # up to 20 classes: its ten strong tones, then their light partners
MANY_CLASSES_MAP = "turbo"  # more classes: evenly spaced colours of this map (256 distinct at most)
HEAT_MAP = "turbo"  # low similarity dark blue -> cyan -> green -> yellow -> red high
POINTS_PER_INCH = 72  # the figure's dpi: one point is one pixel

PANEL_COLOUR = "black"
PANEL_ALPHA = 165 / 255
TEXT_COLOUR = "white"
BOUNDARY_FILL = (255, 255, 255)
# Font height relative to the image's short side, and the range it is kept in (pixels).
FONT_FRACTION = 1 / 22
MIN_FONT_SIZE = 7
MAX_FONT_SIZE = 40
BOUNDARY_FRACTION = 1 / 400
COLORBAR_HEIGHT_FRACTION = 0.6
# Legend geometry in font sizes: square swatches, and spacing tighter than matplotlib's defaults, so
# that a legend fits small pictures.
LEGEND_SPACING = {"handlelength": 1.0, "handleheight": 1.0, "handletextpad": 0.4, "borderpad": 0.35,
                  "labelspacing": 0.35, "columnspacing": 1.0}
METADATA_KEY = "denserc"


@dataclass
class LegendEntry:
    name: str
    colour: tuple[int, int, int]
    fraction: float  # share of the image's pixels with this label
    swatch: tuple[int, int, int, int]  # (x0, y0, x1, y1): pixels inside the drawn colour square, inclusive


@dataclass
class ColourBar:
    vmin: float
    vmax: float
    bar: tuple[int, int, int, int]  # (x0, y0, x1, y1): pixels inside the gradient, inclusive; vmax at the top


def palette(count: int) -> list[tuple[int, int, int]]:
    """``count`` RGB colours: matplotlib's tab20 (strong tones first) up to 20 classes, else turbo resampled."""
    if count <= 20:
        tones = colormaps[QUALITATIVE_MAP].colors
        colours = [tones[i] for i in (*range(0, 20, 2), *range(1, 20, 2))][:count]
    else:
        colours = colormaps[MANY_CLASSES_MAP].resampled(count)(np.arange(count))[:, :3]
    return [tuple(int(round(255 * c)) for c in colour[:3]) for colour in colours]


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) -> uint8 RGB of the heat colour map, shape values.shape + (3,)."""
    rgba = np.asarray(colormaps[HEAT_MAP](np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)))
    return np.round(rgba[..., :3] * 255).astype(np.uint8)


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
    colours = palette(len(class_names))
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = base * (1 - alpha) + np.asarray(colours, dtype=np.float32)[labels] * alpha
    blended[_boundaries(labels, max(1, round(min(labels.shape) * BOUNDARY_FRACTION)))] = BOUNDARY_FILL
    figure = _figure(np.round(blended).astype(np.uint8))
    fractions = np.bincount(labels.ravel(), minlength=len(class_names)) / labels.size
    lines = [f"{name}  {100 * share:.1f}%" for name, share in zip(class_names, fractions)]
    legend = _draw_legend(figure, lines, colours)
    picture = _render(figure)
    swatches = [_inside(patch.get_window_extent(), picture.height) for patch in legend.get_patches()]
    entries = [LegendEntry(name, colour, float(share), swatch)
               for name, colour, share, swatch in zip(class_names, colours, fractions, swatches)]
    return picture, entries


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
    figure = _figure(np.round(base * (1 - alpha) + heat * alpha).astype(np.uint8))
    font_size = _preferred_font_size(image.size)
    pad = max(2, font_size // 3)
    figure.text(2 * pad, image.height - 2 * pad, caption, transform=IdentityTransform(), fontsize=font_size,
                color=TEXT_COLOUR, va="top", ha="left", bbox=_panel())
    bar = _draw_colour_bar(figure, vmin, vmax, font_size)
    return _render(figure), ColourBar(vmin, vmax, bar)


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


def _preferred_font_size(size: tuple[int, int]) -> int:
    return int(np.clip(round(min(size) * FONT_FRACTION), MIN_FONT_SIZE, MAX_FONT_SIZE))


def _panel() -> dict:
    """Text-box style of the translucent panels."""
    return {"boxstyle": "square,pad=0.3", "facecolor": PANEL_COLOUR, "alpha": PANEL_ALPHA, "edgecolor": "none"}


def _figure(pixels: np.ndarray) -> Figure:
    """A figure of exactly the picture's size in pixels with ``pixels`` (H, W, 3) as its background."""
    height, width = pixels.shape[:2]
    # half a pixel more, so that rounding of width / dpi * dpi can never lose a pixel of the canvas
    figure = Figure(figsize=((width + 0.5) / POINTS_PER_INCH, (height + 0.5) / POINTS_PER_INCH),
                    dpi=POINTS_PER_INCH)
    FigureCanvasAgg(figure)
    figure.figimage(pixels, xo=0, yo=0, origin="upper", resize=False)
    return figure


def _render(figure: Figure) -> Image.Image:
    figure.canvas.draw()
    rgba = np.asarray(figure.canvas.buffer_rgba())
    return Image.fromarray(np.ascontiguousarray(rgba[..., :3]))


def _inside(box, height: int) -> tuple[int, int, int, int]:
    """The pixels (x0, y0, x1, y1), top-left origin, inclusive, that lie wholly inside a display-space box."""
    return (int(np.ceil(box.x0)), int(np.ceil(height - box.y1)), int(np.floor(box.x1)) - 1,
            int(np.floor(height - box.y0)) - 1)


def _draw_legend(figure: Figure, lines: list[str], colours: list[tuple[int, int, int]]) -> Legend:
    """matplotlib's legend in the top-left corner, at the largest font (<= the preferred one) that fits the
    picture, in as many columns as that font needs."""
    renderer = figure.canvas.get_renderer()
    width, height = renderer.get_canvas_width_height()
    handles = [Patch(facecolor=np.asarray(colour) / 255, edgecolor="none", antialiased=False) for colour in colours]

    def place(size: int, columns: int) -> tuple[Legend, bool]:
        pad = max(2, size // 3)
        legend = figure.legend(handles, lines, loc="upper left", bbox_to_anchor=(pad, height - pad),
                               bbox_transform=IdentityTransform(), ncols=columns, fontsize=size,
                               labelcolor=TEXT_COLOUR, frameon=True, fancybox=False, framealpha=PANEL_ALPHA,
                               facecolor=PANEL_COLOUR, edgecolor="none", borderaxespad=0.0, **LEGEND_SPACING)
        box = legend.get_window_extent(renderer)
        return legend, box.width + 2 * pad <= width and box.height + 2 * pad <= height

    # One column at the preferred font, measured once, gives the row pitch and column width at every font
    # size (matplotlib's legend scales with its font), hence the columns each size needs and whether it fits.
    preferred = _preferred_font_size((width, height))
    legend, fits = place(preferred, 1)
    if fits:
        return legend
    box = legend.get_window_extent(renderer)
    legend.remove()
    for size in range(preferred, MIN_FONT_SIZE - 1, -1):
        scale, margin = size / preferred, 2 * max(2, size // 3)
        rows = max(1, int((height - margin) / (scale * box.height / len(lines))))
        columns = -(-len(lines) // rows)
        if columns * scale * box.width + margin > width:
            continue
        legend, fits = place(size, columns)
        if fits:
            return legend
        legend.remove()
    warnings.warn(f"the image ({width}x{height}) is too small for a readable legend of {len(lines)} classes; "
                  "the legend is cut off (the PNG's metadata lists every class)", stacklevel=3)
    return place(MIN_FONT_SIZE, 1)[0]


def _draw_colour_bar(figure: Figure, vmin: float, vmax: float, font_size: int) -> tuple[int, int, int, int]:
    """matplotlib's colour bar at the right edge, labelled in cosine similarity; returns the gradient's pixels."""
    renderer = figure.canvas.get_renderer()
    width, height = renderer.get_canvas_width_height()
    pad = max(2, font_size // 3)
    bar_width, bar_height = max(4, font_size), max(5, round(height * COLORBAR_HEIGHT_FRACTION))
    left, bottom = width - 2 * pad - bar_width, (height - bar_height) // 2
    axes = figure.add_axes(figure.transFigure.inverted().transform_bbox(
        Bbox.from_bounds(left, bottom, bar_width, bar_height)).bounds, zorder=1)
    # matplotlib needs a range: a constant map (vmin == vmax, all pixels the lowest colour) gets one of 1e-6
    norm = Normalize(vmin, vmax if vmax > vmin else vmin + 1e-6)
    colour_bar = figure.colorbar(ScalarMappable(norm=norm, cmap=colormaps[HEAT_MAP]), cax=axes,
                                 format="%.3f", ticklocation="left")
    colour_bar.outline.set_edgecolor(TEXT_COLOUR)
    axes.tick_params(labelsize=font_size, colors=TEXT_COLOUR, labelcolor=TEXT_COLOUR)
    figure.canvas.draw()  # lays out the tick labels, so the panel can be sized to them
    panel = axes.get_tightbbox(renderer)
    figure.add_artist(Rectangle((panel.x0 - pad, panel.y0 - pad), panel.width + 2 * pad, panel.height + 2 * pad,
                                transform=IdentityTransform(), facecolor=PANEL_COLOUR, alpha=PANEL_ALPHA,
                                edgecolor="none", zorder=0.5))  # above the picture, below the bar
    x0, y0, x1, y1 = _inside(axes.get_window_extent(renderer), height)
    line = int(np.ceil(colour_bar.outline.get_linewidth()))  # the outline covers the gradient's edge pixels
    return (x0 + line, y0 + line, x1 - line, y1 - line)
