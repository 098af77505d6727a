"""The frozen teacher: the student's initial image tower, embedding grid cells (or proposals' crops).

Where its crops come from is ``data.teacher_crops`` (docs/training.md#recipe-choices). With ``batch`` they
are cut here, on the device, with ``torchvision.ops.roi_align`` straight from the (normalised) batch tensor
and resized in the same call, batched over all cells of all images, so the data loader never handles
crops. With ``source`` the loader cuts them from the source image with PIL, as the peers do
(``data/regions.py``), and the task hands them to ``Teacher.embed``. Either way each crop is letterboxed as
CLIPSelf and DeCLIP do (``ResizeMaxSize(224, fill=0)`` in their src/open_clip/transform.py, applied by
``_obtain_image_crops`` in src/training/data.py): the cell's longer side is resized to the native input
size, keeping its aspect ratio, the result centred and the rest filled with black (the normalised value of
a zero pixel). The next paragraph is about ``batch`` alone:

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
that the activations held at once do not grow with the number of grid cells. Of the last block only
the tokens the pooling reads are computed (``Tower.run_block_leading``: keys and values of every token,
the rest for the class token alone) when the tower pools its class token; an attention-pool ("map")
head or a patch average reads every token and gets the whole block. The task calls the
teacher under the training's autocast, so it runs in the training precision.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from ..images import centred_letterbox
from ..models import DenseRCModel
from ..models import normalize_images
from ..models.towers import Workspace, run_block

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


def letterbox_crops(images: torch.Tensor, boxes: Sequence[torch.Tensor], size: tuple[int, int],
                    fill: torch.Tensor, sampling_ratio: int = CROP_SAMPLING_RATIO) -> torch.Tensor:
    """(sum Ki, C, *size) crops of per-image boxes, each resized keeping its aspect, centred, padded with ``fill``.

    A w x h box is resized to ``centred_letterbox``'s size and offsets (``denserc.images``, shared with
    the loader's ``LetterboxResize``: ``ResizeMaxSize``'s rounding and centring).
    One ``roi_align`` over boxes widened to the whole output square gives exactly that resize inside the
    valid rectangle (same sample positions and, with ``sampling_ratio=-1``, the same samples per output
    pixel as resizing the box alone); ``fill`` (C,) replaces everything outside it.
    """
    out_h, out_w = size
    counts = [len(b.reshape(-1, 4)) for b in boxes]
    cells = torch.cat([b.reshape(-1, 4) for b in boxes]).to(device=images.device, dtype=torch.float64)
    x1, y1, x2, y2 = cells.unbind(-1)
    width, height = x2 - x1, y2 - y1
    fitted, offsets = centred_letterbox(torch.stack([height, width], dim=-1), (out_h, out_w))
    (new_h, new_w), (top, left) = fitted.unbind(-1), offsets.unbind(-1)
    step_x, step_y = width / new_w, height / new_h  # input pixels per output pixel
    widened = torch.stack([x1 - left * step_x, y1 - top * step_y,
                           x1 + (out_w - left) * step_x, y1 + (out_h - top) * step_y], dim=-1)
    crops = crop_and_resize(images, widened.split(counts), size, sampling_ratio)
    columns = torch.arange(out_w, device=images.device)
    rows = torch.arange(out_h, device=images.device)
    inside_x = (columns >= left[:, None]) & (columns < (left + new_w)[:, None])
    inside_y = (rows >= top[:, None]) & (rows < (top + new_h)[:, None])
    inside = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]
    return torch.where(inside, crops, fill.to(crops.dtype).view(1, -1, 1, 1))


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
        black = normalize_images(torch.zeros(3, 1, 1), student.preprocess_cfg, white=1.0).flatten()
        self.register_buffer("black", black, persistent=False)  # letterbox padding: a zero pixel, normalised
        self.train(False)

    def train(self, mode: bool = True) -> "Teacher":
        """The teacher stays in eval mode whatever its parent does."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """L2-normalised global embeddings (sum Ki, E) of every box's letterboxed crop at the native size."""
        return self.embed(letterbox_crops(images, boxes, self.native_size, self.black))

    @torch.no_grad()
    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """L2-normalised global embeddings (K, E) of ready-made crops (K, C, *native_size), already normalised.

        The entry point of ``data.teacher_crops: source``, where the loader cuts and letterboxes each crop
        from the source image (``data.regions``); ``forward`` cuts them from the batch and calls this.
        """
        workspace = Workspace()  # one set of buffers for every block of every chunk of this call
        embeddings = [self.encode(chunk, workspace) for chunk in crops.split(self.crops_per_chunk)]
        return F.normalize(torch.cat(embeddings).float(), dim=-1)

    def encode(self, crops: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        """Global embeddings (K, E) of native-size crops: ``encode_image``, blocks as ``run_block`` runs them.

        Without autograd, a family may write the blocks' outputs into ``workspace``'s reused buffers
        (``Tower.run_block_inference``: open_clip blocks do).
        """
        tower = self.tower
        workspace = workspace if workspace is not None else Workspace()
        x, rope = tower.embed(crops, tower.pos_embed)  # the native grid: position embedding as it is
        *blocks, last = tower.blocks
        for block in blocks:
            x = tower.run_block_inference(block, x, rope, workspace)
        pooled = tower.pooled_tokens()
        if pooled is None:  # an attention-pool head or a patch average reads every token
            return tower.pool_global(run_block(last, x, rope))
        return tower.pool_global(tower.run_block_leading(last, x, rope, pooled))
