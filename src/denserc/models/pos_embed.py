"""Position embeddings for any input grid: bicubic interpolation of the patch part, cls kept.

Same interpolation as open_clip's ``resize_pos_embed`` (bicubic, antialiased, align_corners=False),
so a model run here at 448 px equals open_clip created with ``force_image_size=448``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def interpolate_pos_embed(pos_embed: torch.Tensor, native_grid: tuple[int, int],
                          grid: tuple[int, int]) -> torch.Tensor:
    """(1 + gh*gw, D) -> (1 + h*w, D). The native grid is returned unchanged (bit-exact open_clip)."""
    if tuple(grid) == tuple(native_grid):
        return pos_embed
    gh, gw = native_grid
    h, w = grid
    width = pos_embed.shape[-1]
    cls_pos, patch_pos = pos_embed[:1], pos_embed[1:]
    patch_pos = patch_pos.reshape(1, gh, gw, width).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=(h, w), mode="bicubic", antialias=True,
                              align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(h * w, width).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)
