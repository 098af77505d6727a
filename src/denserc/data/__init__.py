"""Training data: image sources (COCO, image folder, generated), square resizing and grid sampling."""
from .datasets import (IMAGE_EXTENSIONS, GeneratedSource, ImageSource, TrainingImages, UnreadableImageError,
                       build_source, list_images, register_source, source_types)
from .grid import GRID_RULES, grid_boxes, sample_grid_boxes, sample_grid_shape
from .transforms import ASPECT_MODES, SquareResize

__all__ = ["ASPECT_MODES", "GRID_RULES", "IMAGE_EXTENSIONS", "GeneratedSource", "ImageSource", "SquareResize",
           "TrainingImages", "UnreadableImageError", "build_source", "grid_boxes", "list_images",
           "register_source", "sample_grid_boxes", "sample_grid_shape", "source_types"]
