"""DenseRC: dense, text-aligned CLIP features by self-distillation (CVPR 2026)."""
__version__ = "0.1.0"

from .models import DenseRCModel, create_model, get_tokenizer, load  # noqa: E402
from .viz import segment  # noqa: E402

__all__ = ["DenseRCModel", "__version__", "create_model", "get_tokenizer", "load", "segment"]
