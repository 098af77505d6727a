"""Open-vocabulary segmentation and text-similarity maps of whole images from dense features.

Both run the sliding-window dense inference of training-free OVSS (``denserc.eval.sliding``) on the
image resized to a working resolution, then bring the per-pixel scores back to the image's own size.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..eval.sliding import sliding_window_logits
from ..eval.text import build_text_classifier
from ..models.factory import get_tokenizer
from ..images import load_image
from .defaults import CLASS_TEMPLATES, QUERY_TEMPLATES, SHORT_SIDE_PER_NATIVE
from .image import to_model_input

# Upsampling C score maps to a 12-megapixel photo at once would take C * 48 MB; classes are taken in
# groups whose upsampled scores fit this many elements (256 MB in float32).
UPSAMPLE_ELEMENTS = 1 << 26


def text_embeddings(model, texts: Sequence[str], *, tokenizer=None,
                    templates: Sequence[str] = CLASS_TEMPLATES) -> torch.Tensor:
    """L2-normalised (len(texts), E) float32 embeddings: each text's prompt ensemble over ``templates``
    (``denserc.eval``'s text classifier, one name per class, no disk cache)."""
    if not texts:
        raise ValueError("need at least one class name or query")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"every prompt template must contain '{{}}', got {list(templates)}")
    tokenizer = tokenizer or get_tokenizer(model.model_name)
    return build_text_classifier(model, tokenizer, [[text] for text in texts], templates).embeddings


def segment(model, images, class_names: Sequence[str], *, tokenizer=None,
            templates: Sequence[str] = CLASS_TEMPLATES, short_side: int | None = None,
            window: int | None = None, stride: int | None = None, batch_size: int = 16):
    """Per-pixel class index (int64, on the model's device) into ``class_names``.

    ``images``: an image file path or PIL image -> an (H, W) label map at that image's own size
    (inference runs at a short side of ``short_side``, default twice the model's native size); a
    list of those -> a list of label maps; or a (B, 3, H, W) tensor already normalised with
    ``model.preprocess_cfg`` -> (B, H, W), not resized. ``window``/``stride`` default to the model's
    native size and half of it.
    """
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class names must be distinct, got {list(class_names)}")
    text = text_embeddings(model, class_names, tokenizer=tokenizer, templates=templates)
    return _per_image(model, images, text, _argmax_at_size, short_side=short_side, window=window,
                      stride=stride, batch_size=batch_size)


def similarity_map(model, images, query: str, *, tokenizer=None,
                   templates: Sequence[str] = QUERY_TEMPLATES, short_side: int | None = None,
                   window: int | None = None, stride: int | None = None, batch_size: int = 16):
    """Per-pixel cosine similarity (float32) between the dense features and the text ``query``.

    Accepts ``images`` like ``segment`` and returns (H, W), a list of those, or (B, H, W).
    """
    text = text_embeddings(model, [query], tokenizer=tokenizer, templates=templates)
    return _per_image(model, images, text, _upsample_single, short_side=short_side, window=window,
                      stride=stride, batch_size=batch_size)


def _per_image(model, images, text: torch.Tensor, reduce, *, short_side: int | None,
               window: int | None, stride: int | None, batch_size: int):
    """Score ``images`` (see ``segment``) against ``text`` and ``reduce(scores, (H, W))`` them."""
    native = min(model.native_size)
    short_side = SHORT_SIDE_PER_NATIVE * native if short_side is None else short_side
    window = native if window is None else window
    stride = max(1, window // 2) if stride is None else stride
    weight = next(model.parameters())
    slide = dict(window=window, stride=stride, batch_size=batch_size)
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"expected a normalised (B, 3, H, W) image tensor, got shape {tuple(images.shape)}")
        scores = sliding_window_logits(model, images.to(weight.device, weight.dtype), text, **slide)
        return reduce(scores, tuple(images.shape[-2:]))
    if isinstance(images, (list, tuple)):
        return [_per_image(model, image, text, reduce, short_side=short_side, window=window,
                           stride=stride, batch_size=batch_size) for image in images]
    image = images if isinstance(images, Image.Image) else load_image(images)
    pixels = to_model_input(image, model.preprocess_cfg, short_side)
    scores = sliding_window_logits(model, pixels.to(weight.device, weight.dtype), text, **slide)
    return reduce(scores, (image.height, image.width))[0]


def _argmax_at_size(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """argmax over classes of the scores upsampled (bilinear) to ``size``: (B, C, h, w) -> (B, H, W)."""
    batch, classes = scores.shape[:2]
    group = max(1, UPSAMPLE_ELEMENTS // (batch * size[0] * size[1]))
    best = scores.new_full((batch, *size), float("-inf"))
    labels = torch.zeros(batch, *size, dtype=torch.long, device=scores.device)
    for first in range(0, classes, group):
        upsampled = _resize(scores[:, first:first + group], size)
        group_best, group_labels = upsampled.max(dim=1)
        better = group_best > best
        best = torch.where(better, group_best, best)
        labels = torch.where(better, group_labels + first, labels)
    return labels


def _upsample_single(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w) scores -> (B, H, W) at ``size`` (bilinear)."""
    return _resize(scores, size)[:, 0]


def _resize(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
