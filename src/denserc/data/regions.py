"""The regions L_semantics distils in one epoch, and where the teacher's crops of them come from.

``RegionDraw`` is the one draw of an image's regions for an epoch: its grid cells (``data/grid.py``) or, for a
``ProposalSource``, its proposals with the teacher's 1.5x crops (``data/proposals.py``), seeded by
(seed, epoch, image index) through ``draw_seed``. The draw does not depend on the pixel size it is
expressed in: ``draw(indices, sizes, epoch)`` gives the same cells (the same grid shape, the same kept cells in
the same order; the same proposals) in the pixels of whatever (height, width) ``sizes`` holds, so one call in
input pixels gives the student's boxes and another in source pixels the boxes the teacher's crops are cut
from.

``data.teacher_crops`` (``TEACHER_CROPS``) says where those crops come from:

- ``batch``: the task cuts every crop from the resized batch on the device (``train.teacher.letterbox_crops``,
  RoIAlign, bilinear/area sampling); the loader only returns the image.
- ``source``: the loader cuts every crop from the source image at its own resolution, as both peers do:
  CLIPSelf (``wusize/CLIPSelf`` @1c7fe9c, src/training/data.py) ``GridDistillDataset._obtain_image_crops``
  (lines 226-245: the normalised grid template times the source size, ``image.crop((x0, y0, x1, y1))`` on the
  source PIL image, then ``self.transforms[1]``) and ``ProposalDistillDataset.__getitem__`` (lines 107-118:
  the proposal enlarged 1.5x about its centre and clipped to the source image, cropped the same way; line 124
  for an image without a usable proposal); DeCLIP (``xiaomoguhz/DeCLIP`` @2c0b3de, src/training/data.py)
  lines 261-280 and 133/139, the same code. ``transforms[1]`` is their ``ResizeMaxSize(224, fill=0)`` (longer
  side to the native size with PIL bicubic, centred, zero padding), then ToTensor and the CLIP normalisation:
  ``LetterboxResize`` here, the normalisation in the task. ``SourceCrops`` returns the crops as uint8 with the
  student's boxes; ``collate_regions`` keeps the per-image lists (each image has its own number of regions).

PIL's ``Image.crop`` rounds a float box to whole pixels (``round``, half to even); ``cut`` does the same and
only makes an empty crop one pixel wide or high, where the peers' ``ResizeMaxSize`` would divide by zero. The
boxes in source pixels are drawn over the size of the opened image; for proposals they are the proposals file's
boxes scaled by (opened size / the size the file states), 1 when they agree. An image without a usable proposal
gets its top-left quarter, (0, 0, w / 4, h / 4) rounded, where CLIPSelf crops (0, 0, w // 4, h // 4): they
differ by a source pixel when w or h is not a multiple of 4.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import default_collate

from .grid import DEFAULT_MAX_BOXES, sample_grid_boxes
from .proposals import ProposalSource, sample_proposal_boxes
from .transforms import LetterboxResize

TEACHER_CROPS = ("batch", "source")
REGION_KEYS = ("boxes", "crops", "crop_boxes")  # per-image entries of a ``source`` sample, collated as lists


@dataclass(frozen=True)
class RegionDraw:
    """One image's regions in one epoch: grid cells (``rule``, ``max_cells``) or ``proposals``; ``max_boxes`` each."""
    seed: int
    rule: str = "clipself"
    max_cells: int = 6
    max_boxes: int | None = DEFAULT_MAX_BOXES
    proposals: ProposalSource | None = None

    def __call__(self, indices, sizes, epoch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image: (K, 4) student boxes and (K, 4) teacher crop boxes, x1y1x2y2 in the pixels of ``sizes``.

        ``indices`` are dataset indices, ``sizes`` (B, 2) the (height, width) the boxes are expressed in (the
        valid area of the resized input, or the source image). Grid cells are both.
        """
        if self.proposals is not None:
            return sample_proposal_boxes(self.proposals, indices, sizes, epoch=epoch, seed=self.seed,
                                         max_boxes=self.max_boxes)
        boxes = sample_grid_boxes(indices, sizes, epoch=epoch, seed=self.seed, rule=self.rule,
                                  max_cells=self.max_cells, max_boxes=self.max_boxes)
        return boxes, boxes


def cut(image: Image.Image, box) -> Image.Image:
    """``image.crop(box)`` with the box rounded as PIL rounds it, at least one pixel wide and high."""
    x1, y1, x2, y2 = (round(value) for value in box)
    return image.crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))


class SourceCrops:
    """The loader's half of ``data.teacher_crops: source``: one image's regions and its teacher crops.

    ``size``: the teacher's native (height, width). Picklable (a loader worker holds a copy).
    """

    def __init__(self, draw: RegionDraw, size: tuple[int, int]):
        self.draw = draw
        self.letterbox = LetterboxResize(size)

    def __call__(self, image: Image.Image, index: int, valid_size: tuple[int, int], epoch: int) -> dict:
        """``boxes`` (K, 4) float32 in input pixels (the student's), ``crops`` (K, 3, *size) uint8 letterboxed
        crops of the source image ``image``, ``crop_boxes`` (K, 4) the boxes they were cut from, in source pixels.

        ``valid_size``: the (height, width) of ``image`` once resized to the input (``SquareResize``).
        """
        boxes, _ = self.draw([index], [valid_size], epoch)
        _, crop_boxes = self.draw([index], [(image.height, image.width)], epoch)
        crops = torch.stack([self.letterbox(cut(image, box)) for box in crop_boxes[0].tolist()])
        return {"boxes": boxes[0], "crops": crops, "crop_boxes": crop_boxes[0]}


def collate_regions(samples: list[dict]) -> dict:
    """``default_collate`` for the images, a list per key of ``REGION_KEYS`` (their lengths differ per image)."""
    batch = default_collate([{k: v for k, v in sample.items() if k not in REGION_KEYS} for sample in samples])
    for key in REGION_KEYS:
        if key in samples[0]:
            batch[key] = [sample[key] for sample in samples]
    return batch
