"""The frozen teacher: the student's initial image tower, embedding grid cells cut from the batch.

Crops are cut on the device with ``torchvision.ops.roi_align`` straight from the (normalised) batch
tensor and resized to the teacher's native input size in the same call, batched over all cells of
all images, so the data loader never handles crops.

``sampling_ratio=-1`` (adaptive): each output pixel averages ceil(cell size / native size) x ...
bilinear samples. A cell larger than the native size (downscaling, e.g. a 1024-px image's 1x1 cell
to 224) is therefore area-averaged, which is anti-aliased like a PIL resize; a smaller cell
(upscaling) gets one bilinear sample per output pixel, i.e. plain bilinear resizing.
``aligned=True`` puts pixel centres at integer + 0.5 so that a box is exactly its pixels.

The crops are embedded with ``encode_image``'s computation, through the student's tower adapter (any
family), but with the blocks run as the student's trunk runs them (``towers.run_block``): open_clip
blocks with their attention through ``scaled_dot_product_attention``, since on the CPU
``nn.MultiheadAttention``'s inference path materialises every (heads, 197, 197) attention matrix of
the batch, which was 1.7 s of a ViT-B step (issue 17). They run in chunks of ``crops_per_chunk`` so
that the activations held at once do not grow with the number of grid cells. The task calls the
teacher under the training's autocast, so it runs in the training precision.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from .dense import DenseRCModel
from .towers import run_block

CROP_SAMPLING_RATIO = -1
CROPS_PER_CHUNK = 32  # ViT-B/16: 32 x 197 tokens, 4.6 MiB per 768-wide fp32 activation, 19 MiB for the MLP's


def crop_and_resize(images: torch.Tensor, boxes: Sequence[torch.Tensor], size: tuple[int, int],
                    sampling_ratio: int = CROP_SAMPLING_RATIO) -> torch.Tensor:
    """(sum Ki, C, *size) crops of per-image input-pixel boxes (x1, y1, x2, y2), in the boxes' order.

    ``sampling_ratio``: bilinear samples per output pixel and axis; -1 (the teacher's) adapts it to the
    box size, as described above.
    """
    boxes = [b.to(device=images.device, dtype=images.dtype).reshape(-1, 4) for b in boxes]
    return roi_align(images, boxes, output_size=tuple(size), spatial_scale=1.0,
                     sampling_ratio=sampling_ratio, aligned=True)


class Teacher(nn.Module):
    """A frozen copy of a DenseRC model's image tower as it is now (call before training starts)."""

    def __init__(self, student: DenseRCModel, crops_per_chunk: int = CROPS_PER_CHUNK):
        super().__init__()
        if crops_per_chunk < 1:
            raise ValueError(f"crops_per_chunk must be at least 1, got {crops_per_chunk}")
        self.visual = copy.deepcopy(student.visual)
        self.visual.requires_grad_(False)
        self.tower = type(student.tower)(self.visual)  # the student's adapter over the frozen copy
        self.native_size = tuple(student.native_size)
        self.crops_per_chunk = crops_per_chunk
        self.train(False)

    def train(self, mode: bool = True) -> "Teacher":
        """The teacher stays in eval mode whatever its parent does."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """L2-normalised global embeddings (sum Ki, E) of every box's crop at the native size."""
        crops = crop_and_resize(images, boxes, self.native_size)
        embeddings = [self.encode(chunk) for chunk in crops.split(self.crops_per_chunk)]
        return F.normalize(torch.cat(embeddings).float(), dim=-1)

    def encode(self, crops: torch.Tensor) -> torch.Tensor:
        """Global embeddings (K, E) of native-size crops: ``encode_image``, blocks as ``run_block`` runs them."""
        tower = self.tower
        x, rope = tower.embed(crops, tower.pos_embed)  # the native grid: position embedding as it is
        for block in tower.blocks:
            x = run_block(block, x, rope)
        return tower.pool_global(x)
