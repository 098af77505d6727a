"""CAT-Seg trained open-vocabulary segmentation on a DenseRC (or plain) CLIP; see docs/segmentation.md."""
from .aggregator import CostAggregator, cost_volume
from .model import CATSeg, HeadConfig, class_tokens, fine_tuned_clip_parameters, segmentation_loss

__all__ = ["CATSeg", "CostAggregator", "HeadConfig", "class_tokens", "cost_volume", "fine_tuned_clip_parameters",
           "segmentation_loss"]
