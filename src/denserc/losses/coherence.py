"""L_coherence: the student's patch-to-patch similarity should match the VFM's (docs/method.md#losses)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def coherence_loss(student_patches: torch.Tensor, vfm_patches: torch.Tensor,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """``MSE(F F^T, G G^T)`` with F, G the L2-normalised patch features of each image.

    student_patches: (B, N, E) or dense (B, E, h, w); vfm_patches: (B, N, C) on the same N patches
    in the same (row-major) order. The mean runs over all B * N * N entries, or over those of the images
    marked True in ``valid`` (B,) bool (placeholders of unreadable files are left out).
    """
    student = _as_patch_rows(student_patches)
    vfm = _as_patch_rows(vfm_patches)
    if student.shape[:2] != vfm.shape[:2]:
        raise ValueError(f"student has {tuple(student.shape[:2])} (batch, patches) but the VFM "
                         f"{tuple(vfm.shape[:2])}; the VFM grid must equal the student's")
    student = F.normalize(student.float(), dim=-1)
    vfm = F.normalize(vfm.float(), dim=-1)
    if valid is None:
        return F.mse_loss(student @ student.transpose(1, 2), vfm @ vfm.transpose(1, 2))
    per_image = (student @ student.transpose(1, 2) - vfm @ vfm.transpose(1, 2)).pow(2).mean(dim=(1, 2))
    weights = valid.to(per_image.dtype)
    return (per_image * weights).sum() / weights.sum().clamp(min=1)


def _as_patch_rows(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) maps become (B, h*w, C) rows; (B, N, C) passes through."""
    if features.ndim == 4:
        return features.flatten(2).transpose(1, 2)
    if features.ndim != 3:
        raise ValueError(f"expected (B, N, C) patches or (B, C, h, w) maps, got {tuple(features.shape)}")
    return features
