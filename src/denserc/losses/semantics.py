"""L_semantics: pooled student dense features should match the teacher's embedding of each region."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..models.dense import pool_boxes


def semantics_loss(dense: torch.Tensor, boxes: Sequence[torch.Tensor], teacher_embeddings: torch.Tensor,
                   patch_size: int) -> torch.Tensor:
    """Mean over regions of ``1 - cos(region feature, teacher embedding)`` (docs/method.md#losses).

    dense: (B, E, h, w) student features (not normalised). boxes: one (Ki, 4) tensor of input-pixel
    (x1, y1, x2, y2) per image. teacher_embeddings: (sum Ki, E) in the same order. Region features
    are RoIAlign 1x1 (aligned) averages of the L2-normalised dense features.
    """
    regions = pool_boxes(F.normalize(dense.float(), dim=1), boxes, patch_size)
    if regions.shape != teacher_embeddings.shape:
        raise ValueError(f"{regions.shape[0]} regions but teacher embeddings of shape "
                         f"{tuple(teacher_embeddings.shape)}")
    return region_cosine_loss(regions, teacher_embeddings)


def region_cosine_loss(regions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean(1 - cos)`` between matching rows of two (K, E) tensors."""
    return (1 - F.cosine_similarity(regions.float(), targets.float(), dim=-1)).mean()
