"""Random m x n grids over each image: the regions whose teacher embeddings L_semantics distils.

A grid has ``rows`` x ``cols`` cells tiling the valid image area exactly (cell edges are shared
floats, so cells neither overlap nor leave gaps). Boxes are (x1, y1, x2, y2) in input pixels, the
convention of ``DenseRCModel.encode_regions`` and ``torchvision.ops.roi_align``.

Rules for the grid shape (docs/method.md#losses, docs/training.md#recipe-choices):
    clipself  (rows, cols) uniform over the pairs with cols in ceil(rows/2)..min(2*rows, max_cells):
              24 pairs for max_cells = 6, each drawn with probability 1/24 (CLIPSelf's ``_init_choices``
              + ``random.choice``, src/training/data.py; avoids very elongated cells). The default.
    uniform   rows and cols independently uniform in 1..max_cells (the paper's wording)

At most ``max_boxes`` cells of a grid are kept, chosen at random without replacement (CLIPSelf's
``--max-boxes 20`` in ``_obtain_image_crops``); None keeps them all.

Each image's grid is drawn from a generator seeded by (seed, epoch, image index), so it does not
depend on the number of processes, data-loader workers or where a run was resumed.
"""
from __future__ import annotations

import math

import torch

GRID_RULES = ("clipself", "uniform")
DEFAULT_MAX_BOXES = 20


def sample_grid_shape(rule: str, max_cells: int, generator: torch.Generator) -> tuple[int, int]:
    """Draw (rows, cols) under ``rule``."""
    if rule not in GRID_RULES:
        raise ValueError(f"grid rule must be one of {GRID_RULES}, got {rule!r}")
    if max_cells < 1:
        raise ValueError(f"max_cells must be at least 1, got {max_cells}")
    if rule == "uniform":
        return _uniform_int(1, max_cells, generator), _uniform_int(1, max_cells, generator)
    pairs = clipself_grid_shapes(max_cells)
    return pairs[_uniform_int(0, len(pairs) - 1, generator)]


def clipself_grid_shapes(max_cells: int) -> list[tuple[int, int]]:
    """The (rows, cols) pairs of the ``clipself`` rule: cols in ceil(rows/2)..min(2*rows, max_cells)."""
    return [(rows, cols) for rows in range(1, max_cells + 1)
            for cols in range(math.ceil(rows / 2), min(2 * rows, max_cells) + 1)]


def grid_boxes(rows: int, cols: int, height: float, width: float) -> torch.Tensor:
    """(rows * cols, 4) boxes tiling a height x width image, row-major (x1, y1, x2, y2)."""
    ys = torch.linspace(0, height, rows + 1, dtype=torch.float64)
    xs = torch.linspace(0, width, cols + 1, dtype=torch.float64)
    y1, x1 = torch.meshgrid(ys[:-1], xs[:-1], indexing="ij")
    y2, x2 = torch.meshgrid(ys[1:], xs[1:], indexing="ij")
    return torch.stack([x1, y1, x2, y2], dim=-1).reshape(-1, 4).float()


def draw_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one image's random draws in one epoch (distinct for every (seed, epoch, index)).

    The library's one such seed: training grids and proposals, CAT-Seg's crops, F-ViT's augmentation. It
    does not depend on the number of processes, loader workers or where a run was resumed.
    """
    mixed = (seed * 1_000_003 + epoch) * 2_147_483_647 + index
    return mixed % (2**63 - 1)


def sample_grid_boxes(indices, sizes, *, epoch: int, seed: int, rule: str = "clipself", max_cells: int = 6,
                      max_boxes: int | None = DEFAULT_MAX_BOXES) -> list[torch.Tensor]:
    """One random grid per image: ``indices`` are dataset indices, ``sizes`` (B, 2) valid (h, w).

    Each image keeps at most ``max_boxes`` of its grid's cells (a random subset, in random order).
    """
    if max_boxes is not None and max_boxes < 1:
        raise ValueError(f"max_boxes must be at least 1 or None, got {max_boxes}")
    boxes = []
    for index, (height, width) in zip(torch.as_tensor(indices).tolist(), torch.as_tensor(sizes).tolist()):
        generator = torch.Generator().manual_seed(draw_seed(seed, epoch, index))
        rows, cols = sample_grid_shape(rule, max_cells, generator)
        cells = grid_boxes(rows, cols, height, width)
        if max_boxes is not None and len(cells) > max_boxes:
            cells = cells[torch.randperm(len(cells), generator=generator)[:max_boxes]]
        boxes.append(cells)
    return boxes


def _uniform_int(low: int, high: int, generator: torch.Generator) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=generator))
