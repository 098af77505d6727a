"""DenseRC's self-distillation losses: L = L_semantics + lambda * L_coherence (docs/method.md#losses)."""
from __future__ import annotations

from typing import Sequence

import torch

from .coherence import COHERENCE_FORMS, coherence_loss
from .semantics import region_cosine_loss, semantics_loss

DEFAULT_COHERENCE_WEIGHT = 0.025
# What L_coherence correlates: the dense features (DenseRC's single stream) or the last block's patch
# queries (DeCLIP's context stream, ``DenseRCModel.encode_dense_with_queries``).
COHERENCE_FEATURES = ("dense", "queries")


def distillation_loss(dense: torch.Tensor, boxes: Sequence[torch.Tensor], teacher_embeddings: torch.Tensor,
                      vfm_patches: torch.Tensor | None, patch_size: int,
                      coherence_weight: float = DEFAULT_COHERENCE_WEIGHT, coherence_form: str = "declip",
                      valid: torch.Tensor | None = None,
                      coherence_features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Both losses and their weighted total, each returned so it can be logged on its own.

    ``valid``: (B,) bool, False for a placeholder of an unreadable image, which then has no weight.
    With ``coherence_weight`` 0 there is no L_coherence to compute (pass ``vfm_patches=None``): the total
    is L_semantics and no ``loss_coherence`` is returned. ``coherence_features`` (B, C, h, w): what
    L_coherence correlates instead of ``dense`` (DeCLIP's two streams); None: ``dense`` (one stream).
    """
    semantics = semantics_loss(dense, boxes, teacher_embeddings, patch_size, valid)
    if coherence_weight == 0:
        return {"loss": semantics, "loss_semantics": semantics}
    if vfm_patches is None:
        raise ValueError(f"coherence_weight={coherence_weight} needs the VFM's patch features (got None)")
    coherence = coherence_loss(dense if coherence_features is None else coherence_features, vfm_patches,
                               coherence_form, valid)
    return {"loss": semantics + coherence_weight * coherence, "loss_semantics": semantics,
            "loss_coherence": coherence}


__all__ = ["COHERENCE_FEATURES", "COHERENCE_FORMS", "DEFAULT_COHERENCE_WEIGHT", "coherence_loss", "distillation_loss", "region_cosine_loss",
           "semantics_loss"]
