"""Evaluation: zero-shot region classification (CLIPSelf protocol) and training-free open-vocabulary
semantic segmentation (SCLIP protocol), their text classifiers, dataset readers and metrics.

See docs/evaluation.md for the protocols and ``denserc eval --help`` for the command line.
"""
from ..lazy import lazy_exports

# name -> the submodule that defines it (imported on first use: docs/architecture.md, "Start-up")
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "SEGMENTATION_DATASETS": ".datasets", "DatasetLayoutError": ".datasets", "PanopticRegions": ".panoptic",
    "SegmentationDataset": ".datasets", "SegmentationLayout": ".datasets", "decode_panoptic_png": ".panoptic",
    "detect_segmentation_dataset": ".datasets", "segmentation_layout": ".datasets", "confusion_matrix": ".metrics",
    "region_metrics": ".metrics", "segmentation_metrics": ".metrics", "evaluate_regions": ".region",
    "DEFAULT_PROTOCOLS": ".segmentation", "SegmentationProtocol": ".segmentation", "evaluate_segmentation": ".segmentation",
    "predict_labels": ".segmentation", "protocol_for": ".segmentation",
    "register_segmentation_dataset": ".segmentation", "sliding_window_logits": ".sliding",
    "window_starts": ".sliding", "TextClassifier": ".text", "build_text_classifier": ".text",
    "load_class_names": ".text", "load_templates": ".text",
})
