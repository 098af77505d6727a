"""COCO panoptic segments as regions to classify (CLIPSelf's zero-shot region protocol), and the panoptic PNG id
encoding (``id = R + 256 G + 256^2 B``)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..images import ImageReadError, load_image
from .datasets import DatasetLayoutError


PANOPTIC_LAYOUT = """COCO/
  {split}/<file_name>                       images (file names from the JSON)
  annotations/panoptic_{split}.json         images, annotations (segments_info), categories (isthing)
  annotations/panoptic_{split}/<file>.png   segment id = R + 256 G + 256^2 B, 0 = void
                                            (the PNG folder may also sit at COCO/panoptic_{split}/)"""


def panoptic_ids_to_rgb(segment_ids: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> (H, W, 3) uint8 with id = R + 256 G + 256^2 B (the COCO-panoptic PNG encoding)."""
    return np.stack([(segment_ids >> shift) & 255 for shift in (0, 8, 16)], axis=-1).astype(np.uint8)


def panoptic_rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """Inverse of ``panoptic_ids_to_rgb``: (H, W, 3) -> (H, W) int64 segment ids."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def decode_panoptic_png(path: str | os.PathLike) -> np.ndarray:
    """(H, W) int64 segment ids of a COCO-panoptic PNG: id = R + 256 G + 256^2 B."""
    with Image.open(path) as png:
        if png.mode != "RGB":
            raise ValueError(f"{path}: panoptic PNG has mode {png.mode}, expected RGB with segment id = "
                             "R + 256 G + 256^2 B")
        rgb = np.array(png)
    return panoptic_rgb_to_ids(rgb)


class PanopticRegions(Dataset):
    """Every segment of a COCO-panoptic split as a region to classify (CLIPSelf's protocol).

    The image is resized so its longer side is ``image_size`` (bicubic) and padded with black on the
    bottom/right to ``image_size`` x ``image_size``. Per segment: its box (the mask's pixel extent,
    x1, y1, x2, y2 in input pixels) and its mask's coverage of each patch of the padded input
    (``image_size / patch_size`` squared, the fraction of the patch's pixels inside the mask).
    Segments whose box is under ``min_box_area`` original pixels are skipped, as CLIPSelf does (8 x 8).
    """

    def __init__(self, root: str | os.PathLike, split: str = "val2017", *, image_size: int, patch_size: int,
                 min_box_area: int = 64):
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of the patch size {patch_size}")
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.patch_size = patch_size
        self.min_box_area = min_box_area
        self.json_path = self.root / "annotations" / f"panoptic_{split}.json"
        self.image_dir = self.root / split
        if not self.json_path.is_file():
            raise DatasetLayoutError(self._message(f"{self.json_path} does not exist"))
        png_dirs = [self.root / "annotations" / f"panoptic_{split}", self.root / f"panoptic_{split}"]
        existing = [d for d in png_dirs if d.is_dir()]
        if not existing:
            raise DatasetLayoutError(self._message(f"no panoptic PNG folder: neither {png_dirs[0]} nor {png_dirs[1]} "
                                                   "exists"))
        self.png_dir = existing[0]
        if not self.image_dir.is_dir():
            raise DatasetLayoutError(self._message(f"image folder {self.image_dir} does not exist"))
        content = self._read_json()
        try:
            self._index(content)
        except KeyError as error:
            raise ValueError(self._message(f"{self.json_path}: an entry lacks the key {error}")) from error

    def _index(self, content: dict) -> None:
        categories = sorted(content["categories"], key=lambda category: category["id"])
        self.category_names = [category["name"] for category in categories]
        self.is_thing = torch.tensor([bool(category["isthing"]) for category in categories])
        self.label_of_category = {category["id"]: label for label, category in enumerate(categories)}
        images = {image["id"]: image for image in content["images"]}
        self.entries = []
        for annotation in content["annotations"]:
            image_id = annotation["image_id"]
            if image_id not in images:
                raise ValueError(f"{self.json_path}: annotation for image id {image_id} has no entry in 'images'")
            for segment in annotation["segments_info"]:
                if segment["category_id"] not in self.label_of_category:
                    raise ValueError(f"{self.json_path}: segment {segment['id']} of image {image_id} has "
                                     f"category_id {segment['category_id']}, which is not in 'categories'")
            self.entries.append((images[image_id]["file_name"], annotation["file_name"], image_id,
                                 [(segment["id"], self.label_of_category[segment["category_id"]])
                                  for segment in annotation["segments_info"]]))

    def __len__(self) -> int:
        return len(self.entries)

    def _paths(self, index: int) -> tuple[Path, Path]:
        image_name, png_name, _, _ = self.entries[index]
        return self.image_dir / image_name, self.png_dir / png_name

    def check_files(self, indices: Sequence[int]) -> None:
        """Stop before any image is evaluated if an image or panoptic PNG of ``indices`` is missing, naming
        the first and counting them all, rather than after the images before it (minutes to hours in)."""
        missing = [path for index in indices for path in self._paths(index) if not path.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more file(s) listed in {self.json_path})" if len(missing) > 1 else ""
            raise DatasetLayoutError(self._message(f"{missing[0]} does not exist{more}"))

    def __getitem__(self, index: int) -> dict:
        _, _, image_id, segments = self.entries[index]
        image_path, png_path = self._paths(index)
        self.check_files([index])
        try:
            image = load_image(image_path, upright=False)
        except ImageReadError as error:
            return {"unreadable": str(error), "name": image_path.stem}
        segment_ids = decode_panoptic_png(png_path)
        width, height = image.size
        if segment_ids.shape != (height, width):
            raise ValueError(f"{png_path}: size {segment_ids.shape[::-1]} differs from image {image_path} size "
                             f"{(width, height)}")
        scale = self.image_size / max(height, width)
        new_height, new_width = round(height * scale), round(width * scale)
        canvas = np.zeros((self.image_size, self.image_size, 3), dtype=np.uint8)
        canvas[:new_height, :new_width] = np.array(image.resize((new_width, new_height), Image.BICUBIC))
        ids, index_map = np.unique(segment_ids, return_inverse=True)
        index_map = index_map.reshape(segment_ids.shape)
        coverage_of_index = self._patch_coverage(index_map, len(ids), new_height, new_width)
        boxes, coverage, labels, skipped = [], [], [], 0
        for segment_id, label in segments:
            index = int(np.searchsorted(ids, segment_id))
            if index == len(ids) or ids[index] != segment_id:
                raise ValueError(f"{png_path}: segment id {segment_id} listed in {self.json_path} "
                                 f"(image {image_id}) has no pixels")
            rows, cols = np.nonzero(index_map == index)
            box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float64)
            if (box[2] - box[0]) * (box[3] - box[1]) < self.min_box_area or not coverage_of_index[index].any():
                skipped += 1
                continue
            boxes.append(box * scale)
            coverage.append(coverage_of_index[index])
            labels.append(label)
        grid = self.image_size // self.patch_size
        return {
            "image": torch.from_numpy(canvas).permute(2, 0, 1).contiguous(),
            "boxes": torch.tensor(np.array(boxes), dtype=torch.float32).reshape(-1, 4),
            "coverage": torch.tensor(np.array(coverage), dtype=torch.float32).reshape(-1, grid, grid),
            "labels": torch.tensor(labels, dtype=torch.long),
            "skipped": skipped,
        }

    def _patch_coverage(self, index_map: np.ndarray, count: int, new_height: int, new_width: int) -> np.ndarray:
        """(count, grid, grid): the fraction of each patch's pixels that carry each index of ``index_map``.

        The map is resized to the image's new size by nearest neighbour (pixel centres) and padded
        like the image (the padding carries no index); all coverages come from one bincount.
        """
        height, width = index_map.shape
        rows = np.minimum(((np.arange(new_height) + 0.5) * height / new_height).astype(np.int64), height - 1)
        cols = np.minimum(((np.arange(new_width) + 0.5) * width / new_width).astype(np.int64), width - 1)
        padded = np.full((self.image_size, self.image_size), count, dtype=np.int64)
        padded[:new_height, :new_width] = index_map[rows[:, None], cols[None, :]]
        grid = self.image_size // self.patch_size
        cell = np.arange(self.image_size) // self.patch_size
        patch_index = (cell[:, None] * grid + cell[None, :]).ravel()
        counts = np.bincount(padded.ravel() * grid * grid + patch_index, minlength=(count + 1) * grid * grid)
        return counts.reshape(count + 1, grid, grid)[:count] / float(self.patch_size ** 2)

    def _read_json(self) -> dict:
        try:
            with open(self.json_path, encoding="utf-8") as f:
                content = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(self._message(f"{self.json_path} is not valid JSON: {error}")) from error
        missing = [key for key in ("images", "annotations", "categories") if key not in content]
        if missing:
            raise ValueError(self._message(f"{self.json_path} lacks the key(s) {missing}"))
        return content

    def _message(self, problem: str) -> str:
        return f"COCO panoptic: {problem}. Expected layout under {self.root}:\n" + \
            PANOPTIC_LAYOUT.format(split=self.split)
