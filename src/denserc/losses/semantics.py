"""L_semantics: pooled student dense features should match the teacher's embedding of each region."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..models.dense import pool_boxes


def semantics_loss(dense: torch.Tensor, boxes: Sequence[torch.Tensor], teacher_embeddings: torch.Tensor,
                   patch_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over regions of ``1 - cos(region feature, teacher embedding)`` (docs/method.md#losses).

    dense: (B, E, h, w) student features (not normalised). boxes: one (Ki, 4) tensor of input-pixel
    (x1, y1, x2, y2) per image. teacher_embeddings: (sum Ki, E) in the same order. Region features
    are RoIAlign 1x1 (aligned) averages of the L2-normalised dense features. ``valid`` (B,) bool: the
    regions of images marked False (placeholders of unreadable files) are left out of the mean.
    """
    regions = pool_boxes(F.normalize(dense.float(), dim=1), boxes, patch_size)
    if regions.shape != teacher_embeddings.shape:
        raise ValueError(f"{regions.shape[0]} regions but teacher embeddings of shape "
                         f"{tuple(teacher_embeddings.shape)}")
    if valid is None:
        return region_cosine_loss(regions, teacher_embeddings)
    counts = torch.tensor([len(b) for b in boxes], device=valid.device)
    weights = torch.repeat_interleave(valid.float(), counts)
    losses = 1 - F.cosine_similarity(regions.float(), teacher_embeddings.float(), dim=-1)
    return (losses * weights).sum() / weights.sum().clamp(min=1)


def region_cosine_loss(regions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean(1 - cos)`` between matching rows of two (K, E) tensors."""
    return (1 - F.cosine_similarity(regions.float(), targets.float(), dim=-1)).mean()
