"""DenseRC models: dense construction on open_clip ViTs (and, for training, the frozen teacher/VFM)."""
from .dense import CONSTRUCTIONS, GATINGS, DenseRCModel, UnsupportedModelError, pool_boxes, pool_masks
from .factory import create_model, from_spec, get_tokenizer, load, load_state_dict_checked
from .gating import HeadSelectionGate

__all__ = ["CONSTRUCTIONS", "GATINGS", "DenseRCModel", "HeadSelectionGate", "UnsupportedModelError",
           "create_model", "from_spec", "get_tokenizer", "load", "load_state_dict_checked", "pool_boxes", "pool_masks"]
