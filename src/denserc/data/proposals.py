"""Region proposals instead of grids: CLIPSelf's region-proposal recipe (docs/training.md#clipselfs-recipes).

``data.type: proposals`` reads a COCO-format file of proposals (CLIPSelf's ``coco_proposals.json``: the
``images`` with ``file_name``, ``width``, ``height``, and one ``annotations`` entry per proposal box with
``image_id`` and ``bbox`` [x, y, w, h] in the image's pixels; categories are not used). Per image and epoch,
as CLIPSelf's ``ProposalDistillDataset.__getitem__`` (``src/training/data.py``) draws them:

- the proposals are shuffled and the first ``max_boxes`` (20) kept, then those whose area is below
  ``min_side**2`` (8 px) or above ``max_side**2`` (1024 px) dropped (so fewer than 20 may remain);
- the student pools each kept box as it is; the teacher embeds the box enlarged 1.5x about its centre
  (``cx +- 0.75 w``, ``cy +- 0.75 h``), clipped to the image;
- an image left with no box gets its top-left quarter, for both.

Boxes come back in input pixels of the resized image (``SquareResize``), the convention of the grids, and
the draw is seeded by (seed, epoch, image index) like theirs.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .datasets import FileListSource, register_source
from .grid import DEFAULT_MAX_BOXES, draw_seed

logger = logging.getLogger(__name__)

MIN_SIDE, MAX_SIDE = 8, 1024  # CLIPSelf src/training/params.py --min-size / --max-size
CONTEXT = 1.5  # the teacher's crop: the box enlarged 1.5x about its centre


class ProposalSource(FileListSource):
    """Images of a COCO-format proposals file, each with its (K, 4) proposal boxes (x, y, w, h) and size."""

    def __init__(self, files: list[Path], boxes: list[torch.Tensor], sizes: list[tuple[int, int]]):
        super().__init__(files)
        self.boxes = boxes
        self.sizes = sizes  # (width, height) of the original image, from the file

    def proposals(self, index: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """(K, 4) boxes (x, y, w, h) in original pixels and the original (width, height)."""
        return self.boxes[index], self.sizes[index]


@register_source("proposals")
def build_proposal_source(data_config) -> ProposalSource:
    """``data.annotations``: the proposals file; ``data.root``: the image folder (e.g. coco/train2017)."""
    if not data_config.root or not data_config.annotations:
        raise ValueError("data.type='proposals' needs data.root (the image folder) and data.annotations "
                         "(a COCO-format proposals file such as CLIPSelf's coco_proposals.json)")
    root, path = Path(data_config.root), Path(data_config.annotations)
    if not path.is_file():
        raise FileNotFoundError(f"data.annotations: proposals file {path} does not exist")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        images, annotations = content["images"], content.get("annotations", [])
        by_image: dict[int, list] = {}
        for annotation in annotations:
            by_image.setdefault(annotation["image_id"], []).append(annotation["bbox"])
        entries = [(root / _file_name(image), by_image.get(image["id"], []), (image["width"], image["height"]))
                   for image in sorted(images, key=lambda image: image["id"])]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"data.annotations: {path} is not a COCO-format proposals file (images with id, "
                         f"file_name, width, height; annotations with image_id, bbox): {type(error).__name__}: "
                         f"{error}") from error
    present = [entry for entry in entries if entry[0].is_file()]
    if not present:
        raise FileNotFoundError(f"none of the {len(entries)} images listed in {path} exist under {root}")
    if len(present) < len(entries):
        first = next(entry[0] for entry in entries if not entry[0].is_file())
        if data_config.strict:
            raise FileNotFoundError(f"{len(entries) - len(present)} images listed in {path} are missing under "
                                    f"{root}, e.g. {first} (set data.strict=false to train on the {len(present)} present)")
        logger.warning("%d of %d images listed in %s are missing under %s (e.g. %s); training on the %d present",
                       len(entries) - len(present), len(entries), path, root, first, len(present))
    return ProposalSource([entry[0] for entry in present],
                          [torch.tensor(entry[1], dtype=torch.float64).reshape(-1, 4) for entry in present],
                          [entry[2] for entry in present])


def _file_name(image: dict) -> str:
    """``file_name``, or the last two parts of ``coco_url`` (LVIS-style entries), as CLIPSelf reads them."""
    if "file_name" in image:
        return image["file_name"]
    return "/".join(image["coco_url"].split("/")[-2:])


def sample_proposal_boxes(source: ProposalSource, indices, sizes, *, epoch: int, seed: int,
                          max_boxes: int | None = DEFAULT_MAX_BOXES, min_side: float = MIN_SIDE,
                          max_side: float = MAX_SIDE) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image: the student's boxes and the teacher's enlarged crops, (K, 4) x1y1x2y2 in input pixels.

    ``indices`` are dataset indices, ``sizes`` (B, 2) the valid (h, w) of each resized image.
    """
    students, teachers = [], []
    for index, (height, width) in zip(torch.as_tensor(indices).tolist(), torch.as_tensor(sizes).tolist()):
        boxes, (image_width, image_height) = source.proposals(index)
        generator = torch.Generator().manual_seed(draw_seed(seed, epoch, index))
        boxes = boxes[torch.randperm(len(boxes), generator=generator)]
        if max_boxes is not None:
            boxes = boxes[:max_boxes]
        area = boxes[:, 2] * boxes[:, 3]
        boxes = boxes[(area >= min_side ** 2) & (area <= max_side ** 2)]
        x, y, w, h = boxes.unbind(1)
        student = torch.stack([x, y, x + w, y + h], dim=1)
        cx, cy, half_w, half_h = x + w / 2, y + h / 2, CONTEXT * w / 2, CONTEXT * h / 2
        teacher = torch.stack([(cx - half_w).clamp(min=0), (cy - half_h).clamp(min=0),
                               (cx + half_w).clamp(max=image_width), (cy + half_h).clamp(max=image_height)], dim=1)
        if not len(student):
            student = teacher = torch.tensor([[0.0, 0.0, image_width / 4, image_height / 4]], dtype=torch.float64)
        scale = torch.tensor([width / image_width, height / image_height] * 2, dtype=torch.float64)
        students.append((student * scale).float())
        teachers.append((teacher * scale).float())
    return students, teachers
