"""Open-vocabulary detection: F-ViT on a frozen DenseRC/CLIP tower, with the OV-COCO and OV-LVIS protocols.

    detector = denserc.detect.load("runs/fvit_b16_ovcoco/final")
    result = detector.predict("image.jpg", ["person", "umbrella", "kite"])

See docs/detection.md; the model is in ``model``, the protocols and scoring in ``protocols`` and
``evaluation``, training (a task on ``denserc.engine.loop``) in ``task``.
"""
from ..lazy import lazy_exports

# name -> the submodule that defines it (imported on first use: docs/architecture.md, "Start-up")
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "Detector": ".detector", "load": ".detector", "evaluate_detections": ".evaluation", "markdown_row": ".evaluation",
    "DetectorConfig": ".model", "FViT": ".model", "FViTHeads": ".model", "ensemble_scores": ".model",
    "PROTOCOLS": ".protocols", "Protocol": ".protocols", "Split": ".protocols", "get_protocol": ".protocols",
    "register_protocol": ".protocols",
})
