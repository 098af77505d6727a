"""L_coherence: the student's patch-to-patch similarity should match the VFM's (docs/method.md#losses).

Two forms of the distance between the (B, N, N) correlation matrices S = F F^T and T = G G^T:
    declip  mean over the B * N rows of the row's L2 norm, ``(T - S).norm(p=2, dim=-1).mean()``: DeCLIP's
            context-distillation loss (xiaomoguhz/DeCLIP src/training/declip.py), which the paper extends
            onto one stream and whose scale the paper's lambda = 0.025 goes with. The default.
    mse     mean over all B * N * N entries of the squared difference: its gradient shrinks with N (at
            N = 4096 about 40x smaller than ``declip``'s), so the same lambda weighs it far less.
Both run in float32 whatever autocast is active: in bf16 an N x N correlation of unit vectors loses
the small differences the loss is made of.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

COHERENCE_FORMS = ("declip", "mse")

def coherence_loss(student_patches: torch.Tensor, vfm_patches: torch.Tensor, form: str = "declip",
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """Distance between the patch correlations of F and G, the L2-normalised patch features of each image.

    student_patches: (B, N, E) or dense (B, E, h, w); vfm_patches: (B, N, C) on the same N patches
    in the same (row-major) order. ``form``: ``declip`` or ``mse`` (module docstring). With ``valid`` (B,)
    bool, only the images marked True count (placeholders of unreadable files are left out).
    """
    if form not in COHERENCE_FORMS:
        raise ValueError(f"coherence form must be one of {COHERENCE_FORMS}, got {form!r}")
    student = _as_patch_rows(student_patches)
    vfm = _as_patch_rows(vfm_patches)
    if student.shape[:2] != vfm.shape[:2]:
        raise ValueError(f"student has {tuple(student.shape[:2])} (batch, patches) but the VFM "
                         f"{tuple(vfm.shape[:2])}; the VFM grid must equal the student's")
    with torch.autocast(student.device.type, enabled=False):
        student = F.normalize(student.float(), dim=-1)
        vfm = F.normalize(vfm.float(), dim=-1)
        difference = vfm @ vfm.transpose(1, 2) - student @ student.transpose(1, 2)
        # per image: mean squared entry (mse) or mean over rows of the row's L2 norm (DeCLIP)
        per_image = difference.square().mean(dim=(1, 2)) if form == "mse" else difference.norm(p=2, dim=-1).mean(dim=1)
        if valid is None:
            return per_image.mean()
        weights = valid.to(per_image.dtype)
        return (per_image * weights).sum() / weights.sum().clamp(min=1)


def _as_patch_rows(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) maps become (B, h*w, C) rows; (B, N, C) passes through."""
    if features.ndim == 4:
        return features.flatten(2).transpose(1, 2)
    if features.ndim != 3:
        raise ValueError(f"expected (B, N, C) patches or (B, C, h, w) maps, got {tuple(features.shape)}")
    return features
