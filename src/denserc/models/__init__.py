"""DenseRC models: dense construction on open_clip ViTs (and, for training, the frozen teacher/VFM)."""
from .dense import (CONSTRUCTIONS, GATINGS, TABLE5_VARIANTS, DenseRCModel, UnsupportedModelError, pool_boxes,
                    pool_masks)
from .factory import create_model, from_spec, get_tokenizer, load, random_weights, register_pretrained
from .gating import HeadSelectionGate
from .preprocess import normalize_images
from .serialization import load_state_dict_checked

__all__ = ["CONSTRUCTIONS", "GATINGS", "TABLE5_VARIANTS", "DenseRCModel", "HeadSelectionGate",
           "UnsupportedModelError", "create_model", "from_spec", "get_tokenizer", "load", "load_state_dict_checked",
           "normalize_images", "pool_boxes", "pool_masks", "random_weights", "register_pretrained"]
