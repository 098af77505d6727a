"""Tiny random EVA-02-CLIP and SigLIP image trunks, registered with timm for the bundled model configs.

``EVA02-Tiny-16`` and ``ViT-Tiny-16-MAP`` (``model_configs/``) are what ``ViT-Tiny-16`` is for the
open_clip ViT family: random CLIPs small enough for tests and CPU smoke runs of every family
(``denserc train smoke model.name=EVA02-Tiny-16``). open_clip builds a timm image tower by name only, so
the trunks are registered under their own names. Each keeps its family's structure (EVA02-CLIP-B/16:
separate q/k/v projections, RoPE with ``ref_feat_shape`` 16, inner attention LayerNorm, SwiGLU with
norm, cls-token pooling; SigLIP-B/16: no cls token, attention-pool "map" head, hence the config's name:
open_clip gives any model named "*siglip*" SigLIP's Hugging Face tokenizer, which needs a download) at
width 64, 4 heads, 4 blocks, with open_clip's own tokenizer. They have no pretrained weights.
"""
from __future__ import annotations

from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

TINY = {"img_size": 224, "patch_size": 16, "embed_dim": 64, "depth": 4, "num_heads": 4}

default_cfgs = generate_default_cfgs({
    "denserc_eva02_tiny_patch16_clip": {"num_classes": 0, "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD},
    "denserc_vit_tiny_patch16_siglip": {"num_classes": 0, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
})


def _build(model_class: type, name: str, pretrained: bool, **kwargs):
    if pretrained:
        raise ValueError(f"{name} is a random tiny trunk for tests and smoke runs: it has no pretrained weights")
    return build_model_with_cfg(model_class, name, pretrained=False, **kwargs)


@register_model
def denserc_eva02_tiny_patch16_clip(pretrained: bool = False, **kwargs) -> Eva:
    """EVA02-CLIP-B/16's image trunk (eva02_base_patch16_clip_224) at tiny size."""
    args = dict(TINY, qkv_fused=False, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
                use_rot_pos_emb=True, ref_feat_shape=(16, 16), global_pool=kwargs.pop("global_pool", "token"))
    return _build(Eva, "denserc_eva02_tiny_patch16_clip", pretrained, **dict(args, **kwargs))


@register_model
def denserc_vit_tiny_patch16_siglip(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """SigLIP-B/16's image trunk (vit_base_patch16_siglip_224) at tiny size."""
    args = dict(TINY, class_token=False, global_pool=kwargs.pop("global_pool", "map"))
    return _build(VisionTransformer, "denserc_vit_tiny_patch16_siglip", pretrained, **dict(args, **kwargs))
