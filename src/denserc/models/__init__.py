"""DenseRC models: dense construction on CLIP image towers (and, for training, the frozen teacher/VFM)."""
from ..lazy import lazy_exports

# name -> the submodule that defines it (imported on first use: docs/architecture.md, "Start-up")
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "CONSTRUCTIONS": ".variants", "GATINGS": ".variants", "TABLE5_VARIANTS": ".variants", "PEER_PATHS": ".variants",
    "PRECISIONS": ".variants", "precision_dtype": ".factory", "DenseRCModel": ".dense",
    "pool_boxes": ".dense", "pool_masks": ".dense", "create_model": ".factory", "from_spec": ".factory",
    "get_tokenizer": ".factory", "load": ".factory", "random_weights": ".factory", "register_pretrained": ".factory",
    "HeadSelectionGate": ".gating", "normalize_images": ".preprocess", "load_state_dict_checked": ".serialization",
    "SUPPORTED_FAMILIES": ".towers", "UnsupportedModelError": ".towers",
    "text_attention_weights": ".towers",
})
