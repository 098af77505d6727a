"""Zero-shot classification of held-out single-class crops with the tiny CLIP's global embedding."""
from __future__ import annotations

import torch

from denserc.eval.text import build_text_classifier
from denserc.models import normalize_images

from .crops import ScenePool, crop, square_boxes
from .vocabulary import CATEGORIES, TEMPLATES, phrase

EVAL_CROP_SCALE = 1.3  # held-out object crops: a square 1.3x the object's longer side, centred


def class_embeddings(model, tokenizer, category_ids: list[int]) -> torch.Tensor:
    """(C, E) normalised text classifiers: each class phrase's prompt ensemble over the pretraining templates."""
    return build_text_classifier(model, tokenizer, [[phrase(c)] for c in category_ids], TEMPLATES).embeddings


def eval_crops(pool: ScenePool, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic crops (uint8 range) of every indexed region and their category ids."""
    boxes = pool.regions[:, 2:]
    is_thing = torch.tensor([CATEGORIES[int(c) - 1]["isthing"] == 1 for c in pool.regions[:, 1]])
    boxes = torch.where(is_thing[:, None], square_boxes(boxes, EVAL_CROP_SCALE, pool.image_size), boxes)
    images = pool.images[pool.regions[:, 0].long()]
    return crop(images, boxes, size), pool.regions[:, 1].long()


@torch.no_grad()
def crop_predictions(model, tokenizer, pool: ScenePool, isthing: int, batch_size: int = 256
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted, true) category ids of the pool's object (``isthing=1``) or stuff (0) crops,
    classified by the global embedding among the classes of that kind."""
    was_training = model.training
    model.eval()
    crops, labels = eval_crops(pool, model.native_size[0])
    ids = [c["id"] for c in CATEGORIES if c["isthing"] == isthing]
    rows = torch.isin(labels, torch.tensor(ids))
    features = torch.cat([model.encode_image(normalize_images(chunk, model.preprocess_cfg), normalize=True)
                          for chunk in crops[rows].split(batch_size)])
    predicted = torch.tensor(ids)[(features @ class_embeddings(model, tokenizer, ids).T).argmax(dim=1)]
    model.train(was_training)
    return predicted, labels[rows]


def crop_accuracy(model, tokenizer, pool: ScenePool, batch_size: int = 256) -> dict[str, float]:
    """Top-1 zero-shot accuracy on the pool's crops: objects among the thing classes, stuff among stuff."""
    results = {}
    for kind, isthing in (("things", 1), ("stuff", 0)):
        predicted, labels = crop_predictions(model, tokenizer, pool, isthing, batch_size)
        results[f"{kind}_top1"] = (predicted == labels).float().mean().item()
        results[f"{kind}_crops"] = len(labels)
    return results
