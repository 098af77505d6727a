"""The dense-construction variants the analyses compare, built on one model's weights."""
from __future__ import annotations

from ..models import DenseRCModel

# `denserc analyze gradients --variants`: gatings of multi-v, and the single-block constructions
GRADIENT_VARIANTS = {"none": ("multi-v", "none"), "qk": ("multi-v", "qk"), "qq": ("multi-v", "qq"),
                     "hsg": ("multi-v", "hsg"), "x+v": ("x+v", "none"), "v": ("v", "none")}


def same_weights(model: DenseRCModel, construction: str, gating: str, num_layers: int | None = None) -> DenseRCModel:
    """``model``'s CLIP under another construction/gating (shared, not copied). An hsg variant of an hsg model
    keeps its trained gate; otherwise a new gate starts uniform (every gate 0.5)."""
    if num_layers is None and construction == "multi-v":
        num_layers = model.num_layers if model.construction == "multi-v" else None
    if (construction, gating, num_layers) == (model.construction, model.gating, model.num_layers):
        return model
    other = DenseRCModel(model.clip, model_name=model.model_name, model_cfg=model.model_cfg,
                         preprocess_cfg=model.preprocess_cfg, construction=construction, gating=gating,
                         num_layers=num_layers)
    if other.gate is not None and model.gate is not None:
        other.gate = model.gate
    return other.to(next(model.parameters()).device).eval()
