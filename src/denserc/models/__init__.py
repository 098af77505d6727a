"""DenseRC models: dense construction on CLIP image towers (and, for training, the frozen teacher/VFM)."""
from . import tiny_towers  # noqa: F401  (registers the timm trunks of the bundled tiny EVA/SigLIP configs)
from .dense import CONSTRUCTIONS, GATINGS, TABLE5_VARIANTS, DenseRCModel, pool_boxes, pool_masks
from .factory import create_model, from_spec, get_tokenizer, load, register_pretrained
from .gating import HeadSelectionGate
from .preprocess import normalize_images
from .serialization import load_state_dict_checked
from .towers import SUPPORTED_FAMILIES, UnsupportedModelError

__all__ = ["CONSTRUCTIONS", "GATINGS", "SUPPORTED_FAMILIES", "TABLE5_VARIANTS", "DenseRCModel", "HeadSelectionGate",
           "UnsupportedModelError", "create_model", "from_spec", "get_tokenizer", "load", "load_state_dict_checked",
           "normalize_images", "pool_boxes", "pool_masks", "register_pretrained"]
