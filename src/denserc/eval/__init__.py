"""Evaluation: zero-shot region classification (CLIPSelf protocol) and training-free open-vocabulary
semantic segmentation (SCLIP protocol), their text classifiers, dataset readers and metrics.

See docs/evaluation.md for the protocols and ``denserc eval --help`` for the command line.
"""
from .datasets import (SEGMENTATION_DATASETS, DatasetLayoutError, PanopticRegions, SegmentationDataset,
                       SegmentationLayout, decode_panoptic_png, detect_segmentation_dataset, segmentation_layout)
from .metrics import confusion_matrix, region_metrics, segmentation_metrics
from .region import evaluate_regions
from .segmentation import (PROTOCOLS, SegmentationProtocol, evaluate_segmentation, predict_labels, protocol_for,
                           register_segmentation_dataset)
from .sliding import sliding_window_logits, window_starts
from .text import TextClassifier, build_text_classifier, load_class_names, load_templates

__all__ = ["PROTOCOLS", "SEGMENTATION_DATASETS", "DatasetLayoutError", "PanopticRegions", "SegmentationDataset",
           "SegmentationLayout", "SegmentationProtocol", "TextClassifier", "build_text_classifier",
           "confusion_matrix", "decode_panoptic_png", "detect_segmentation_dataset", "evaluate_regions",
           "evaluate_segmentation", "load_class_names", "load_templates", "predict_labels", "protocol_for",
           "region_metrics", "register_segmentation_dataset", "segmentation_layout", "segmentation_metrics",
           "sliding_window_logits", "window_starts"]
