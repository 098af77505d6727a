"""Random m x n grids over each image: the regions whose teacher embeddings L_semantics distils.

A grid has ``rows`` x ``cols`` cells tiling the valid image area exactly (cell edges are shared
floats, so cells neither overlap nor leave gaps). Boxes are (x1, y1, x2, y2) in input pixels, the
convention of ``DenseRCModel.encode_regions`` and ``torchvision.ops.roi_align``.

Rules for the grid shape (docs/method.md#losses):
    uniform   rows and cols independently uniform in 1..max_cells
    clipself  rows uniform in 1..max_cells, cols uniform in ceil(rows/2)..min(2*rows, max_cells)
              (CLIPSelf's rule, which avoids very elongated cells)

Each image's grid is drawn from a generator seeded by (seed, epoch, image index), so it does not
depend on the number of processes, data-loader workers or where a run was resumed.
"""
from __future__ import annotations

import math

import torch

GRID_RULES = ("uniform", "clipself")


def sample_grid_shape(rule: str, max_cells: int, generator: torch.Generator) -> tuple[int, int]:
    """Draw (rows, cols) under ``rule``."""
    if rule not in GRID_RULES:
        raise ValueError(f"grid rule must be one of {GRID_RULES}, got {rule!r}")
    if max_cells < 1:
        raise ValueError(f"max_cells must be at least 1, got {max_cells}")
    rows = _uniform_int(1, max_cells, generator)
    if rule == "uniform":
        cols = _uniform_int(1, max_cells, generator)
    else:
        cols = _uniform_int(math.ceil(rows / 2), min(2 * rows, max_cells), generator)
    return rows, cols


def grid_boxes(rows: int, cols: int, height: float, width: float) -> torch.Tensor:
    """(rows * cols, 4) boxes tiling a height x width image, row-major (x1, y1, x2, y2)."""
    ys = torch.linspace(0, height, rows + 1, dtype=torch.float64)
    xs = torch.linspace(0, width, cols + 1, dtype=torch.float64)
    y1, x1 = torch.meshgrid(ys[:-1], xs[:-1], indexing="ij")
    y2, x2 = torch.meshgrid(ys[1:], xs[1:], indexing="ij")
    return torch.stack([x1, y1, x2, y2], dim=-1).reshape(-1, 4).float()


def image_grid_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one image's grid in one epoch (distinct for every (seed, epoch, index))."""
    mixed = (seed * 1_000_003 + epoch) * 2_147_483_647 + index
    return mixed % (2**63 - 1)


def sample_grid_boxes(indices, sizes, *, epoch: int, seed: int, rule: str = "uniform",
                      max_cells: int = 6) -> list[torch.Tensor]:
    """One random grid per image: ``indices`` are dataset indices, ``sizes`` (B, 2) valid (h, w)."""
    boxes = []
    for index, (height, width) in zip(torch.as_tensor(indices).tolist(), torch.as_tensor(sizes).tolist()):
        generator = torch.Generator().manual_seed(image_grid_seed(seed, epoch, index))
        rows, cols = sample_grid_shape(rule, max_cells, generator)
        boxes.append(grid_boxes(rows, cols, height, width))
    return boxes


def _uniform_int(low: int, high: int, generator: torch.Generator) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=generator))
