"""CAT-Seg trained open-vocabulary segmentation on a DenseRC (or plain) CLIP; see docs/segmentation.md."""
from ..lazy import lazy_exports

# name -> the submodule that defines it (imported on first use: docs/architecture.md, "Start-up")
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "CostAggregator": ".aggregator", "cost_volume": ".aggregator", "CATSeg": ".model", "HeadConfig": ".model",
    "class_tokens": ".model", "fine_tuned_clip_parameters": ".model", "segmentation_loss": ".model",
})
