"""See what dense features see: open-vocabulary segmentation and text heatmaps of an image.

``segment`` and ``similarity_map`` return tensors; ``draw`` turns them into pictures; ``cli`` adds the
``denserc segment`` / ``denserc heatmap`` commands.
"""
from ..images import ImageReadError, load_image
from .predict import segment, similarity_map, text_embeddings

__all__ = ["ImageReadError", "load_image", "segment", "similarity_map", "text_embeddings"]
