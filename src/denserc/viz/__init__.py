"""See what dense features see: open-vocabulary segmentation and text heatmaps of an image.

``segment`` and ``similarity_map`` return tensors; ``draw`` turns them into pictures; ``cli`` adds the
``denserc segment`` / ``denserc heatmap`` commands.
"""
from ..lazy import lazy_exports

# name -> the submodule that defines it (imported on first use: docs/architecture.md, "Start-up")
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "ImageReadError": "..images", "load_image": "..images", "segment": ".predict", "similarity_map": ".predict",
    "text_embeddings": ".predict",
})
