"""DenseRC: dense, text-aligned CLIP features by self-distillation (CVPR 2026)."""
__version__ = "0.1.0"

from .lazy import lazy_exports  # noqa: E402

# imported on first use, so the `denserc` command's help and argument errors do not load torch
__getattr__, __dir__, _exports = lazy_exports(__name__, {
    "DenseRCModel": ".models", "create_model": ".models", "get_tokenizer": ".models", "load": ".models",
    "segment": ".viz"})
__all__ = ["__version__", *_exports]
