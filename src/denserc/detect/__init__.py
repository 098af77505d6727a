"""Open-vocabulary detection: F-ViT on a frozen DenseRC/CLIP tower, with the OV-COCO and OV-LVIS protocols.

    detector = denserc.detect.load("runs/fvit_b16_ovcoco/final")
    result = detector.predict("image.jpg", ["person", "umbrella", "kite"])

See docs/detection.md; the model is in ``model``, the protocols and scoring in ``protocols`` and
``evaluation``, training (a task on ``denserc.train.engine``) in ``task``.
"""
from .detector import Detector, load
from .evaluation import evaluate_detections, markdown_row
from .model import DetectorConfig, FViT, FViTHeads, ensemble_scores
from .protocols import PROTOCOLS, Protocol, Split, get_protocol, register_protocol

__all__ = ["PROTOCOLS", "Detector", "DetectorConfig", "FViT", "FViTHeads", "Protocol", "Split", "ensemble_scores",
           "evaluate_detections", "get_protocol", "load", "markdown_row", "register_protocol"]
