"""Sliding-window dense inference (the mmseg/SCLIP ``slide`` mode used by training-free OVSS).

Windows of ``window`` pixels step by ``stride``; the last window in each direction is shifted back
to end at the border, so every pixel is covered and no window is partial. Each window's cosine
logits against the class embeddings are upsampled (bilinear) to the window's pixels and the
overlaps averaged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis of ``size`` pixels (mmseg's slide rule)."""
    if window <= 0 or stride <= 0:
        raise ValueError(f"window and stride must be positive, got window={window}, stride={stride}")
    if size <= window:
        return [0]
    steps = (size - window + stride - 1) // stride + 1
    return [min(i * stride, size - window) for i in range(steps)]


@torch.no_grad()
def sliding_window_logits(model, images: torch.Tensor, text_embeddings: torch.Tensor, *,
                          window: int = 224, stride: int = 112, batch_size: int = 16) -> torch.Tensor:
    """Per-pixel cosine similarity (B, C, H, W) between dense features and C class embeddings.

    ``images`` are normalised (B, 3, H, W) tensors of any size; windows smaller than the image are
    padded on the bottom/right to a multiple of the patch size and the padding is cut off again.
    """
    batch, _, height, width = images.shape
    text = F.normalize(text_embeddings.to(images.dtype), dim=-1)
    win_h, win_w = min(window, height), min(window, width)
    patch = model.patch_size
    pad_h, pad_w = -win_h % patch, -win_w % patch
    places = [(y, x) for y in window_starts(height, window, stride) for x in window_starts(width, window, stride)]
    crops = torch.stack([images[:, :, y:y + win_h, x:x + win_w] for y, x in places], dim=1)
    crops = crops.flatten(0, 1)  # (B * windows, 3, win_h, win_w), image-major
    total = images.new_zeros(batch, text.shape[0], height, width, dtype=torch.float32)
    count = images.new_zeros(1, 1, height, width, dtype=torch.float32)
    for y, x in places:
        count[:, :, y:y + win_h, x:x + win_w] += 1
    for first, chunk in zip(range(0, len(crops), batch_size), crops.split(batch_size)):
        chunk = F.pad(chunk, (0, pad_w, 0, pad_h))
        dense = F.normalize(model.encode_dense(chunk), dim=1)
        logits = torch.einsum("nehw,ce->nchw", dense, text.to(dense.dtype))
        logits = F.interpolate(logits.float(), size=chunk.shape[-2:], mode="bilinear", align_corners=False)
        for offset, window_logits in enumerate(logits[:, :, :win_h, :win_w]):
            image_index, place = divmod(first + offset, len(places))
            y, x = places[place]
            total[image_index, :, y:y + win_h, x:x + win_w] += window_logits
    return total / count
