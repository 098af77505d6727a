"""Procedural scenes: colour x pattern objects of random shapes on textured stuff backgrounds, with exact annotations.

A scene is a pure function of its seed and ``SceneConfig``. The background is split into 1..max_stuff
wavy regions, each filled with one stuff texture; objects are pasted on top with hard edges, so
every pixel belongs to exactly one segment (an object's visible part or a stuff region's visible
part) and the masks, boxes and label map are exact, not estimates. An object is only placed where it
leaves every earlier object at least ``min_visible`` of its own area visible.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .vocabulary import (CATEGORY_BY_ID, COLOURS, PATTERNS, SHAPES, STUFF, STUFF_ID, THING_ID, VOID_LABEL,
                         label_of, phrase)

MAX_SEGMENT_ID = 2 ** 24 - 1  # a panoptic PNG stores ids as R + 256 G + 256^2 B


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn; sizes are in pixels, ``max_rotation`` in degrees."""

    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 4
    min_object_size: int = 28
    max_object_size: int = 72
    max_rotation: float = 30.0
    min_visible: float = 0.6
    max_stuff: int = 3
    min_stuff_fraction: float = 0.12
    placement_tries: int = 20

    def __post_init__(self):
        checks = [
            (self.image_size >= 32, "image_size must be >= 32"),
            (1 <= self.min_objects <= self.max_objects, "need 1 <= min_objects <= max_objects"),
            (8 <= self.min_object_size <= self.max_object_size <= self.image_size,
             "need 8 <= min_object_size <= max_object_size <= image_size"),
            (0.0 < self.min_visible <= 1.0, "min_visible must be in (0, 1]"),
            (1 <= self.max_stuff <= len(STUFF), f"max_stuff must be in 1..{len(STUFF)}"),
            (0.0 <= self.min_stuff_fraction * self.max_stuff < 1.0,
             "min_stuff_fraction * max_stuff must be < 1"),
            (self.placement_tries >= 1, "placement_tries must be >= 1"),
        ]
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise ValueError(f"invalid SceneConfig({asdict(self)}): {'; '.join(errors)}")


@dataclass
class Segment:
    """One panoptic segment: an object's visible pixels or a stuff region's visible pixels."""

    id: int
    category_id: int
    mask: np.ndarray  # (H, W) bool
    shape: str | None = None  # an object's outline (not part of its class); None for stuff

    @property
    def isthing(self) -> bool:
        return bool(CATEGORY_BY_ID[self.category_id]["isthing"])

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def bbox(self) -> list[int]:
        """COCO box [x, y, width, height] of the mask's pixels (a 1-pixel mask has width 1)."""
        rows = np.flatnonzero(self.mask.any(axis=1))
        cols = np.flatnonzero(self.mask.any(axis=0))
        return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    segments: list[Segment] = field(default_factory=list)

    @property
    def things(self) -> list[Segment]:
        return [s for s in self.segments if s.isthing]

    @property
    def stuff(self) -> list[Segment]:
        return [s for s in self.segments if not s.isthing]

    @property
    def label_map(self) -> np.ndarray:
        """(H, W) uint8: each pixel's label (category position, see vocabulary), VOID_LABEL if none."""
        labels = np.full(self.image.shape[:2], VOID_LABEL, dtype=np.uint8)
        for segment in self.segments:
            labels[segment.mask] = label_of(segment.category_id)
        return labels

    @property
    def segment_ids(self) -> np.ndarray:
        """(H, W) int64: each pixel's panoptic segment id, 0 (void) if none."""
        ids = np.zeros(self.image.shape[:2], dtype=np.int64)
        for segment in self.segments:
            ids[segment.mask] = segment.id
        return ids

    @property
    def caption(self) -> str:
        return scene_caption(self.segments)


def scene_caption(segments: list[Segment]) -> str:
    """"a photo of a red dotted object and a blue solid object on grass and sand." for a scene's segments."""
    return caption_of([(s.category_id, s.area) for s in segments])


def caption_of(parts: list[tuple[int, int]]) -> str:
    """Caption of (category id, pixel count) parts: distinct thing classes then stuff, largest first."""
    def distinct(isthing):
        names = []
        for category_id, _ in sorted(parts, key=lambda part: -part[1]):
            name = phrase(category_id)
            if CATEGORY_BY_ID[category_id]["isthing"] == isthing and name not in names:
                names.append(name)
        return names

    def join(names):
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

    things, stuff = distinct(1), distinct(0)
    if not things:
        return f"a photo of {join(stuff)}."
    if not stuff:
        return f"a photo of {join(things)}."
    return f"a photo of {join(things)} on {join(stuff)}."


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of a split seeded ``seed`` (independent of generation order)."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def render_scene(rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> Scene:
    """Draw one scene; identical generator states give identical scenes."""
    size = config.image_size
    stuff_ids, regions = _stuff_layout(rng, config)
    image = np.zeros((size, size, 3), dtype=np.float32)
    for index, stuff_id in enumerate(stuff_ids):
        texture = TEXTURES[CATEGORY_BY_ID[stuff_id]["name"]](rng, size)
        image[regions == index] = texture[regions == index]

    objects: list[tuple[int, str, np.ndarray, np.ndarray]] = []  # (category id, shape, full mask, visible mask)
    for _ in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
        placed = _place_object(rng, config, objects)
        if placed is None:
            continue
        category_id, shape, mask, angle, diameter = placed
        for i, (*other, other_visible) in enumerate(objects):
            objects[i] = (*other, other_visible & ~mask)
        objects.append((category_id, shape, mask, mask.copy()))
        category = CATEGORY_BY_ID[category_id]
        appearance = _object_appearance(rng, COLOURS[category["colour"]], mask)
        marks = _pattern_marks(rng, category["pattern"], mask, angle, diameter)
        appearance[marks] *= MARK_DARKNESS
        image[mask] = appearance[mask]

    covered = np.zeros((size, size), dtype=bool)
    pieces = []
    for category_id, shape, _, visible in objects:
        pieces.append((category_id, visible, shape))
        covered |= visible
    for index, stuff_id in enumerate(stuff_ids):
        visible = (regions == index) & ~covered
        if visible.any():
            pieces.append((stuff_id, visible, None))
    ids = rng.choice(MAX_SEGMENT_ID, size=len(pieces), replace=False) + 1
    segments = [Segment(int(i), *piece) for i, piece in zip(ids, pieces)]
    return Scene(np.clip(np.rint(image), 0, 255).astype(np.uint8), segments)


# ------------------------------------------------------------------------------------ layout
def _stuff_layout(rng: np.random.Generator, config: SceneConfig) -> tuple[list[int], np.ndarray]:
    """1..max_stuff distinct stuff classes and an (H, W) map of region indices (warped Voronoi cells)."""
    size = config.image_size
    count = int(rng.integers(1, config.max_stuff + 1))
    stuff_ids = [STUFF_ID[STUFF[i]] for i in rng.choice(len(STUFF), size=count, replace=False)]
    if count == 1:
        return stuff_ids, np.zeros((size, size), dtype=np.int64)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(100):
        centres = rng.uniform(0, size, size=(count, 2))
        warp_x = _value_noise(rng, size, cells=3) * 0.25 * size
        warp_y = _value_noise(rng, size, cells=3) * 0.25 * size
        distance = [(xs + warp_x - cx) ** 2 + (ys + warp_y - cy) ** 2 for cx, cy in centres]
        regions = np.argmin(np.stack(distance), axis=0)
        fractions = np.bincount(regions.ravel(), minlength=count) / regions.size
        if fractions.min() >= config.min_stuff_fraction:
            return stuff_ids, regions
    raise RuntimeError(f"could not split the background into {count} regions of at least "
                       f"{config.min_stuff_fraction:.0%} each in 100 tries; lower min_stuff_fraction")


def _place_object(rng, config: SceneConfig, objects) -> tuple[int, str, np.ndarray, float, float] | None:
    """A random object (category id, shape, mask, angle, diameter) whose mask leaves each earlier
    object ``min_visible`` visible, or None."""
    size = config.image_size
    shape = SHAPES[rng.integers(len(SHAPES))]
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    for _ in range(config.placement_tries):
        diameter = rng.uniform(config.min_object_size, config.max_object_size)
        angle = math.radians(rng.uniform(-config.max_rotation, config.max_rotation))
        margin = 0.35 * diameter
        centre = rng.uniform(margin, size - margin, size=2)
        mask = _shape_mask(shape, centre, diameter, angle, size)
        if not mask.any():
            continue
        if all((visible & ~mask).sum() >= config.min_visible * full.sum() for *_, full, visible in objects):
            return THING_ID[(pattern, colour)], shape, mask, angle, diameter
    return None


# ------------------------------------------------------------------------------------ shapes
def _regular_polygon(sides: int, radius: float = 1.0, phase: float = math.pi / 2, offset=(0.0, 0.0)):
    return [(offset[0] + radius * math.cos(phase + 2 * math.pi * k / sides),
             offset[1] - radius * math.sin(phase + 2 * math.pi * k / sides)) for k in range(sides)]


def _star(points: int = 5, outer: float = 1.0, inner: float = 0.42):
    vertices = []
    for k in range(2 * points):
        radius = outer if k % 2 == 0 else inner
        theta = math.pi / 2 + math.pi * k / points
        vertices.append((radius * math.cos(theta), -radius * math.sin(theta)))
    return vertices


def _cross(arm: float = 0.32):
    a = arm
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]


# Each shape: polygons in a unit frame (radius 1, y down), drawn in order; True fills, False erases.
SHAPE_POLYGONS = {
    "circle": [(_regular_polygon(48), True)],
    "square": [([(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)], True)],
    "triangle": [(_regular_polygon(3, offset=(0.0, 0.15)), True)],
    "star": [(_star(), True)],
    "hexagon": [(_regular_polygon(6, phase=0.0), True)],
    "cross": [(_cross(), True)],
    "ring": [(_regular_polygon(48), True), (_regular_polygon(48, radius=0.55), False)],
    "crescent": [(_regular_polygon(48), True), (_regular_polygon(48, radius=0.85, offset=(0.45, -0.1)), False)],
}


def _shape_mask(shape: str, centre, diameter: float, angle: float, size: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cos, sin, half = math.cos(angle), math.sin(angle), diameter / 2
    for polygon, fill in SHAPE_POLYGONS[shape]:
        points = [(centre[0] + half * (cos * x - sin * y), centre[1] + half * (sin * x + cos * y))
                  for x, y in polygon]
        draw.polygon(points, fill=1 if fill else 0)
    return np.asarray(canvas, dtype=bool)


def _object_appearance(rng, rgb, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) float colour field for an object: jittered base colour, linear shading, pixel noise."""
    hue, saturation, value = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    hue = (hue + rng.uniform(-0.02, 0.02)) % 1.0
    saturation *= rng.uniform(0.8, 1.0)
    value *= rng.uniform(0.75, 1.0)
    base = np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32) * 255
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    extent = max(np.ptp(ys), np.ptp(xs), 1)
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction) + 1e-8
    size = mask.shape[0]
    grid_y, grid_x = np.mgrid[0:size, 0:size].astype(np.float32)
    shading = 1.0 + rng.uniform(0.0, 0.25) * ((grid_x - cx) * direction[0] + (grid_y - cy) * direction[1]) / extent
    noise = rng.normal(0.0, 6.0, size=(size, size, 3)).astype(np.float32)
    return base * shading[..., None] + noise


# ---------------------------------------------------------------------------------- patterns
MARK_DARKNESS = 0.35  # a pattern's marks are the object's own colour at this brightness
MARKS_PER_OBJECT = (5.5, 7.5)  # pattern periods across the object's diameter: marks scale with the object


def _pattern_marks(rng, pattern: str, mask: np.ndarray, angle: float, diameter: float) -> np.ndarray:
    """(H, W) bool: the pixels of a pattern's marks, in the object's rotated frame with a random phase.

    The period is the object's diameter over ``MARKS_PER_OBJECT`` (4-13 px at the default sizes), so
    every 8 x 8 patch of an object shows its pattern and a crop resized to the CLIP's input shows it
    at about the same scale whatever the object's size.
    """
    if pattern == "solid":
        return np.zeros_like(mask)
    period = diameter / rng.uniform(*MARKS_PER_OBJECT)
    size = mask.shape[0]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    cos, sin = math.cos(angle), math.sin(angle)
    u = (cos * xs + sin * ys) / period + rng.uniform(0, 1)  # period units along the object's own axes
    v = (-sin * xs + cos * ys) / period + rng.uniform(0, 1)
    frac_u, frac_v = u - np.floor(u), v - np.floor(v)
    if pattern == "striped":
        return frac_u < 0.5
    if pattern == "dotted":
        return (frac_u - 0.5) ** 2 + (frac_v - 0.5) ** 2 < 0.3 ** 2
    if pattern == "checkered":
        return (np.floor(2 * u) + np.floor(2 * v)) % 2 == 0
    if pattern == "zigzag":
        chevron = u + np.abs(frac_v - 0.5)
        return chevron - np.floor(chevron) < 0.45
    if pattern == "hatched":
        diagonal_a, diagonal_b = (u + v) / 1.414, (u - v) / 1.414
        return (diagonal_a - np.floor(diagonal_a) < 0.22) | (diagonal_b - np.floor(diagonal_b) < 0.22)
    raise KeyError(f"unknown pattern {pattern!r} (expected one of {PATTERNS})")


# ---------------------------------------------------------------------------------- textures
def _value_noise(rng, size: int, cells: float, stretch: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Smooth noise in [-1, 1]: a random (cells x cells) grid upsampled bicubically to size x size."""
    grid_h = max(2, int(round(cells * stretch[0])))
    grid_w = max(2, int(round(cells * stretch[1])))
    grid = rng.uniform(-1.0, 1.0, size=(grid_h, grid_w)).astype(np.float32)
    smooth = Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC)
    return np.clip(np.asarray(smooth), -1.0, 1.0)


def _tint(base, field_by_channel) -> np.ndarray:
    return np.stack([b + f for b, f in zip(base, field_by_channel)], axis=-1)


def _grass(rng, size):
    blades = _value_noise(rng, size, cells=size / 2, stretch=(0.15, 1.0)) * 35
    patches = _value_noise(rng, size, cells=4) * 20
    fine = rng.normal(0, 8, size=(size, size)).astype(np.float32)
    shade = blades + patches + fine
    return _tint((70, 140, 50), (0.5 * shade, shade, 0.4 * shade))


def _water(rng, size):
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    frequency = rng.uniform(0.15, 0.3)
    tilt = rng.uniform(-0.3, 0.3)
    warp = _value_noise(rng, size, cells=3) * 6
    waves = np.sin(frequency * (ys + tilt * xs + warp) + rng.uniform(0, 2 * math.pi)) * 22
    fine = rng.normal(0, 5, size=(size, size)).astype(np.float32)
    shade = waves + fine
    return _tint((40, 100, 180), (0.4 * shade, 0.8 * shade, shade))


def _sand(rng, size):
    dunes = _value_noise(rng, size, cells=3, stretch=(1.0, 0.5)) * 18
    grain = rng.normal(0, 10, size=(size, size)).astype(np.float32)
    shade = dunes + grain
    return _tint((215, 190, 140), (shade, shade, 0.8 * shade))


def _bricks(rng, size):
    height = int(rng.integers(8, 14))
    width = 2 * height
    ys, xs = np.mgrid[0:size, 0:size]
    row = ys // height
    shifted = xs + (row % 2) * (width // 2)
    column = shifted // width
    brick_shade = rng.normal(0, 14, size=(row.max() + 2, column.max() + 2)).astype(np.float32)
    shade = brick_shade[row, column] + rng.normal(0, 6, size=(size, size)).astype(np.float32)
    image = _tint((165, 70, 50), (shade, 0.6 * shade, 0.5 * shade))
    mortar = (ys % height == 0) | (shifted % width == 0)
    image[mortar] = np.array([200, 195, 185], dtype=np.float32)
    return image


def _gravel(rng, size):
    stones = _value_noise(rng, size, cells=size / 6) * 40
    grain = rng.normal(0, 10, size=(size, size)).astype(np.float32)
    shade = stones + grain
    return _tint((130, 130, 125), (shade, shade, shade))


TEXTURES = {"grass": _grass, "water": _water, "sand": _sand, "bricks": _bricks, "gravel": _gravel}
