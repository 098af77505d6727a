"""The dense-construction variants by name (no torch here: the command line offers them as choices)."""

PRECISIONS = ("fp32", "bf16", "fp16")  # model weights / autocast: float32, bfloat16, float16
CONSTRUCTIONS = ("multi-v", "v", "x+v", "cls+v")  # cls+v: CAT-Seg's own last block, not a Table 5 row
GATINGS = ("hsg", "none", "qk", "qq", "declip")  # declip: DeCLIP's content attention, not a Table 5 row
# The paper's Table 5 by the names its rows use: what to extract (x+v, v, multi-v, all without gating),
# then how multi-v combines its heads. "multi-v" is multi-v with gating "none".
TABLE5_VARIANTS = {"x+v": ("x+v", "none"), "v": ("v", "none"), "multi-v": ("multi-v", "none"),
                   "qk": ("multi-v", "qk"), "qq": ("multi-v", "qq"), "hsg": ("multi-v", "hsg")}

# What a plain CLIP (an open_clip NAME[:TAG|:FILE], not a DenseRC folder) runs in a downstream task when no
# construction is named: that task's peer computation (docs/detection.md, docs/segmentation.md).
#   F-ViT:   CLIPSelf F-ViT/models/evaclip_vit.py, ``forward``: last block ``forward_without_attn`` (x+v)
#   CAT-Seg: cvlab-kaist/CAT-Seg cat_seg/third_party/model_vpt.py, ``forward_dense``: value path + the class
#            token's residual, then the MLP residual (cls+v)
PEER_PATHS = {"F-ViT": {"construction": "x+v", "gating": "none"},
              "CAT-Seg": {"construction": "cls+v", "gating": "none"}}
