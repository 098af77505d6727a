"""DenseRC models: dense construction on CLIP image towers (and, for training, the frozen teacher/VFM)."""
from . import tiny_towers  # noqa: F401  (registers the timm trunks of the bundled tiny EVA/SigLIP configs)
from .dense import CONSTRUCTIONS, GATINGS, DenseRCModel, pool_boxes, pool_masks
from .factory import create_model, from_spec, get_tokenizer, load, load_state_dict_checked
from .gating import HeadSelectionGate
from .towers import SUPPORTED_FAMILIES, UnsupportedModelError

__all__ = ["CONSTRUCTIONS", "GATINGS", "SUPPORTED_FAMILIES", "DenseRCModel", "HeadSelectionGate",
           "UnsupportedModelError", "create_model", "from_spec", "get_tokenizer", "load", "load_state_dict_checked",
           "pool_boxes", "pool_masks"]
