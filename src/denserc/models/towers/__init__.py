"""CLIP image towers that DenseRC can decompose: one small adapter per family.

Dense construction (``dense.py``) is written once against the pieces every pre-LN ViT block has
(first norm, per-head values, q/k, output projection, LayerScale, MLP branch) and the tower's final
norm and projection; a ``Tower`` says where each piece lives in its family and how the family
computes it (RoPE, inner attention norms, pooling heads). Families:

- open_clip ViT (``VisionTransformer``: OpenAI CLIP, LAION/DataComp ViTs): values from rows [2D:3D] of
  ``attn.in_proj``, ``out_proj``, ``ls_1``; ``ln_post`` and ``proj``.
- EVA-02-CLIP (open_clip ``TimmModel`` over timm ``Eva``): values from ``v_proj`` (or the fused ``qkv``
  with ``v_bias``); the gates act per head *before* ``attn.norm``, which mixes heads; RoPE on q and k
  of the patch tokens; ``gamma_1``/``gamma_2`` LayerScale when present; ``trunk.norm`` and ``trunk.head``.
- SigLIP / SigLIP2 and other timm ViTs (``TimmModel`` over timm ``VisionTransformer``): values from
  rows [2D:3D] of ``attn.qkv``, ``attn.norm``, ``proj``, ``ls1``; ``trunk.norm``, then the pooling head
  applied to each token on its own. For the attention-pool ("map") head of SigLIP that is what the head
  computes when all attention falls on that one token: its value and output projections, then its
  norm + MLP residual (docs/models.md).

One module per family (``openai``, ``timm_vit`` for SigLIP and other timm ViTs, ``eva``) on the shared
``base`` (the ``Tower`` API, ``run_block``, position-embedding resampling); this module picks the adapter
(``tower_for``).
"""
from __future__ import annotations

from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn

from .base import Tower, UnsupportedModelError, Workspace, resample_pos_embed, run_block
from .eva import EvaTower
from .openai import OpenCLIPTower, run_open_clip_block_into, text_attention_weights
from .timm_vit import TimmViTTower, attention_pool_one_token

SUPPORTED_FAMILIES = (
    "open_clip ViTs (open_clip VisionTransformer with token pooling: ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336, "
    "the -quickgelu variants and custom configs of that form); EVA-02-CLIP (EVA02-B-16, EVA02-L-14, "
    "EVA02-L-14-336: open_clip TimmModel over timm Eva); SigLIP/SigLIP2 and other timm ViTs "
    "(ViT-B-16-SigLIP, ViT-B-16-SigLIP2, ViT-L-16-SigLIP-256, ...: open_clip TimmModel over timm "
    "VisionTransformer)")


def tower_for(clip: nn.Module, model_name: str) -> "Tower":
    """The adapter for ``clip``'s image tower; UnsupportedModelError (naming what is supported) otherwise."""
    visual = getattr(clip, "visual", None)
    if isinstance(visual, VisionTransformer):
        adapter = OpenCLIPTower
    elif isinstance(visual, TimmModel) and isinstance(visual.trunk, Eva):
        adapter = EvaTower
    elif isinstance(visual, TimmModel) and isinstance(visual.trunk, TimmVisionTransformer):
        adapter = TimmViTTower
    else:
        kind = type(visual).__name__ if visual is not None else "no image tower"
        if isinstance(visual, TimmModel):
            kind += f" over timm {type(visual.trunk).__name__}"
        raise UnsupportedModelError(
            f"model '{model_name}' has an image tower of type {kind}; DenseRC supports {SUPPORTED_FAMILIES}. "
            "Convolutional trunks (ConvNeXt, ModifiedResNet, ...) have no per-head value paths.")
    problems = adapter.problems(visual)
    if problems:
        raise UnsupportedModelError(
            f"model '{model_name}' has an image tower DenseRC cannot decompose ({'; '.join(problems)}); "
            f"DenseRC supports {SUPPORTED_FAMILIES}.")
    return adapter(visual)


__all__ = ["SUPPORTED_FAMILIES", "EvaTower", "OpenCLIPTower", "TimmViTTower", "Tower", "UnsupportedModelError",
           "Workspace", "attention_pool_one_token", "resample_pos_embed", "run_block", "run_open_clip_block_into",
           "text_attention_weights", "tower_for"]
