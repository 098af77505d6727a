"""Scenes held in memory as tensors, and the crops the tiny CLIP learns from.

A ``ScenePool`` renders scenes once and indexes one crop region per class occurrence: every object's
box, and for every stuff segment a window that is mostly (>= ``STUFF_PURITY``) that stuff. It also
keeps each scene's segment map, so that any box can be captioned by what it shows
(``region_caption``): DenseRC's teacher embeds arbitrary grid cells, and a CLIP that has only
seen object-centred crops misreads them. Crops are cut and resized with the teacher's RoIAlign
cropping (``denserc.train.teacher.crop_and_resize``), the way DenseRC's teacher crops grid cells.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from denserc.train.teacher import crop_and_resize

from .scenes import SceneConfig, caption_of, render_scene, scene_rng
from .vocabulary import CATEGORIES

STUFF_PURITY = 0.8
STUFF_WINDOW_FRACTION = (0.2, 0.45)  # side of a stuff window, as a fraction of the image side
STUFF_WINDOW_TRIES = 12
REGION_SHARE = 0.15  # a region's caption names every segment covering this share of the region ...
REGION_THING_INSIDE = 0.6  # ... and every object with this share of its own pixels inside


@dataclass
class ScenePool:
    """Rendered scenes and their crop regions; ``regions`` rows are (scene, category_id, x1, y1, x2, y2)."""

    images: torch.Tensor  # (N, 3, S, S) uint8
    captions: list[str]
    regions: torch.Tensor  # (K, 6) float: scene index, category id, box in pixel-edge coordinates
    segment_maps: np.ndarray  # (N, S, S) uint8: index of each pixel's segment in ``segment_parts``
    segment_parts: list[list[tuple[int, int]]]  # per scene: (category id, pixel count) per segment

    @classmethod
    def render(cls, seed: int, num_scenes: int, config: SceneConfig = SceneConfig(),
               progress: bool = False) -> "ScenePool":
        images, captions, regions, maps, parts = [], [], [], [], []
        for index in tqdm(range(num_scenes), desc=f"rendering scenes (seed {seed})", disable=not progress):
            scene = render_scene(scene_rng(seed, index), config)
            images.append(torch.from_numpy(scene.image).permute(2, 0, 1))
            captions.append(scene.caption)
            segment_map = np.zeros(scene.image.shape[:2], dtype=np.uint8)
            for number, segment in enumerate(scene.segments):
                segment_map[segment.mask] = number
            maps.append(segment_map)
            parts.append([(segment.category_id, segment.area) for segment in scene.segments])
            for thing in scene.things:
                x, y, w, h = thing.bbox
                regions.append((index, thing.category_id, x, y, x + w, y + h))
            window_rng = np.random.default_rng([seed, index, 1])
            for stuff in scene.stuff:
                window = _pure_window(stuff.mask, window_rng)
                if window is not None:
                    regions.append((index, stuff.category_id, *window))
        return cls(torch.stack(images), captions, torch.tensor(regions, dtype=torch.float32), np.stack(maps), parts)

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def regions_of(self, category_id: int) -> torch.Tensor:
        return torch.nonzero(self.regions[:, 1] == category_id).flatten()

    def region_caption(self, scene: int, box: tuple[int, int, int, int], salient: bool = False) -> str:
        """Caption of what integer box (x1, y1, x2, y2) of a scene shows: every segment covering at
        least REGION_SHARE of it and every object with at least REGION_THING_INSIDE of its pixels
        inside; if none qualifies, the segment with most pixels inside. ``salient``: only the objects
        among those, when there are any (the ``salient`` caption rule of ``PretrainConfig``)."""
        x1, y1, x2, y2 = box
        parts = self.segment_parts[scene]
        inside = np.bincount(self.segment_maps[scene, y1:y2, x1:x2].ravel(), minlength=len(parts))
        named = []
        for (category_id, area), count in zip(parts, inside):
            mostly_inside = CATEGORIES[category_id - 1]["isthing"] and count >= REGION_THING_INSIDE * area
            if count and (count >= REGION_SHARE * inside.sum() or mostly_inside):
                named.append((category_id, int(count)))
        if salient and any(CATEGORIES[category_id - 1]["isthing"] for category_id, _ in named):
            named = [part for part in named if CATEGORIES[part[0] - 1]["isthing"]]
        if not named:
            dominant = int(inside.argmax())
            named = [(parts[dominant][0], int(inside[dominant]))]
        return caption_of(named)

    def missing_categories(self) -> list[str]:
        present = set(self.regions[:, 1].long().tolist())
        return [c["name"] for c in CATEGORIES if c["id"] not in present]


def square_boxes(boxes: torch.Tensor, scale: torch.Tensor | float, image_size: int,
                 shift: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Square boxes of side ``scale * max(w, h)`` around ``boxes`` (+ ``shift`` * side), kept inside the image."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = ((boxes[:, 2:] - boxes[:, :2]).amax(dim=1) * scale).clamp(max=image_size)
    centre = centre + side[:, None] * shift
    low = (centre - side[:, None] / 2).clamp(min=0)
    low = torch.minimum(low, image_size - side[:, None])
    return torch.cat([low, low + side[:, None]], dim=1)


def crop(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Cut box i from image i and resize it to size x size (bilinear, 2 x 2 samples a bin: the pretraining's)."""
    return crop_and_resize(images.float(), list(boxes[:, None]), (size, size), sampling_ratio=2)


def _pure_window(mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    """A random square window (x1, y1, x2, y2) that is >= STUFF_PURITY inside ``mask``, or None."""
    size = mask.shape[0]
    ys, xs = np.nonzero(mask)
    for _ in range(STUFF_WINDOW_TRIES):
        side = int(rng.uniform(*STUFF_WINDOW_FRACTION) * size)
        pick = rng.integers(len(ys))
        x1 = int(np.clip(xs[pick] - side // 2, 0, size - side))
        y1 = int(np.clip(ys[pick] - side // 2, 0, size - side))
        if mask[y1:y1 + side, x1:x1 + side].mean() >= STUFF_PURITY:
            return x1, y1, x1 + side, y1 + side
    return None
