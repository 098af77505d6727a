"""Training-free open-vocabulary semantic segmentation (the SCLIP protocol, used by its successors).

Per image: resize so the short side is ``short_side`` (long side at most 2048), slide ``window``
crops with ``stride`` over it, take cosine logits between the L2-normalised dense features and
every class query, average overlapping windows, upsample the logits (bilinear) to the label's
size, then

    probabilities = softmax(logit_scale * logits) over the queries
    class score   = max over the class's queries (synonyms)
    area filter   (datasets with a background class) a non-background class winning less than
                  ``area_threshold`` of the non-background pixels gets score 0 everywhere
    prediction    = argmax class; pixels whose best score is under ``prob_threshold`` become
                  background (class 0)

and accumulate a confusion matrix that ignores label 255.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..distributed import DistributedEnv, all_reduce
from ..models import normalize_images
from .datasets import (SEGMENTATION_DATASETS, SegmentationDataset, SegmentationLayout, drop_unreadable,
                       segmentation_layout)
from .defaults import SEGMENTATION_TEMPLATES
from .metrics import confusion_matrix, segmentation_metrics
from .sliding import sliding_window_logits
from .text import TextClassifier, build_text_classifier, load_class_names, load_templates

BACKGROUND = 0
DEFAULT_TEMPLATES = SEGMENTATION_TEMPLATES


@dataclass(frozen=True)
class SegmentationProtocol:
    """Inference settings of training-free OVSS (defaults: SCLIP's, see ``DEFAULT_PROTOCOLS``)."""

    short_side: int = 336
    max_long_side: int = 2048
    window: int = 224
    stride: int = 112
    logit_scale: float = 40.0
    prob_threshold: float = 0.0
    area_threshold: float = 0.0

    def __post_init__(self):
        problems = [f"{name} must be positive, got {getattr(self, name)}"
                    for name in ("short_side", "max_long_side", "window", "stride", "logit_scale")
                    if getattr(self, name) <= 0]
        problems += [f"{name} must be in [0, 1), got {getattr(self, name)}"
                     for name in ("prob_threshold", "area_threshold") if not 0 <= getattr(self, name) < 1]
        if problems:
            raise ValueError("invalid segmentation protocol: " + "; ".join(problems))


# SCLIP's per-dataset settings (configs/cfg_*.py of wangf3014/SCLIP): window 224, stride 112, logit
# scale 40; short side 336, 448 for COCO-Stuff, 560 for Cityscapes; the background settings
# (VOC-21: scale 65, probability 0.1, area 0.1; Context-60: scale 50, probability 0.1).
DEFAULT_PROTOCOLS = {
    "ade20k": SegmentationProtocol(),
    "voc20": SegmentationProtocol(),
    "voc21": SegmentationProtocol(logit_scale=65.0, prob_threshold=0.1, area_threshold=0.1),
    "context59": SegmentationProtocol(),
    "context60": SegmentationProtocol(logit_scale=50.0, prob_threshold=0.1),
    "coco-stuff": SegmentationProtocol(short_side=448),
    "cityscapes": SegmentationProtocol(short_side=560),
    "ade847": SegmentationProtocol(),
    "context459": SegmentationProtocol(),
}


def register_segmentation_dataset(layout: SegmentationLayout,
                                  protocol: SegmentationProtocol = SegmentationProtocol()) -> None:
    """Extension point: evaluate a dataset by name (``denserc eval seg --dataset NAME``, ``SegmentationDataset``).

    ``layout`` says where its images and labels are (``layout.list_pairs(layout, root)`` lists the
    (image, label PNG) pairs) and how labels are encoded; ``protocol`` is its default inference setting.
    """
    SEGMENTATION_DATASETS.register(layout.name, layout)
    DEFAULT_PROTOCOLS[layout.name] = protocol


def protocol_for(dataset: str, **overrides) -> SegmentationProtocol:
    """The dataset's default protocol with ``overrides`` (None values keep the default)."""
    default = DEFAULT_PROTOCOLS[segmentation_layout(dataset).name]
    return replace(default, **{k: v for k, v in overrides.items() if v is not None})


def predict_labels(query_logits: torch.Tensor, classifier: TextClassifier,
                   protocol: SegmentationProtocol) -> torch.Tensor:
    """(Q, H, W) cosine logits -> (H, W) class ids by the rule in the module docstring."""
    probabilities = torch.softmax(protocol.logit_scale * query_logits.float(), dim=0)
    scores = classifier.class_scores(probabilities, dim=0)
    if protocol.area_threshold > 0:
        winners = torch.bincount(scores.argmax(dim=0).flatten(), minlength=classifier.num_classes).float()
        winners[BACKGROUND] = 0
        keep = winners > protocol.area_threshold * winners.sum()
        keep[BACKGROUND] = True
        scores = scores * keep[:, None, None]
    best, prediction = scores.max(dim=0)
    if protocol.prob_threshold > 0:
        prediction[best < protocol.prob_threshold] = BACKGROUND
    return prediction


def evaluation_loop(data: SegmentationDataset, layout: SegmentationLayout,
                    make_predictor: Callable[[], tuple[Callable, torch.device]], *, workers: int, limit: int | None,
                    shard: DistributedEnv, progress: bool, description: str | None,
                    skip_unreadable: bool) -> tuple[torch.Tensor, dict]:
    """The one segmentation evaluation loop, for ``denserc eval seg`` and ``denserc catseg eval`` alike.

    The label maps of this rank's share (the first ``limit`` images) are checked before anything else, the
    model included; ``make_predictor()`` (which may embed the class names, the costly part) is called next and
    returns ``predict(image, size)`` (uint8 (3, H, W) pixels on the device -> (size) class ids) and the device.
    An unreadable image stops the run naming it, or with ``skip_unreadable`` is counted and left out. Returns
    the confusion matrix summed over ranks and ``{"num_images": ..., "unreadable_images": ...}``.
    """
    count = len(data) if limit is None else min(limit, len(data))
    indices = shard.indices(count)
    data.check_labels(indices, workers, progress=progress and shard.is_main)
    predict, device = make_predictor()
    loader = DataLoader(Subset(data, indices), batch_size=None, num_workers=workers)
    confusion = torch.zeros(layout.num_classes, layout.num_classes, dtype=torch.long, device=device)
    images = torch.zeros(2, dtype=torch.long, device=device)  # evaluated, unreadable
    for sample in tqdm(loader, desc=description or layout.title, disable=not (progress and shard.is_main)):
        if drop_unreadable([sample], skip_unreadable)[1]:
            images[1] += 1
            continue
        label = sample["label"].to(device)
        confusion += confusion_matrix(predict(sample["image"].to(device), tuple(label.shape)), label,
                                      layout.num_classes, layout.ignore_index)
        images[0] += 1
    all_reduce(confusion, op="sum")
    all_reduce(images, op="sum")
    return confusion, {"num_images": int(images[0]), "unreadable_images": int(images[1])}


@torch.no_grad()
def evaluate_segmentation(model, tokenizer, root: str | os.PathLike, dataset: str, *,
                          protocol: SegmentationProtocol | None = None, class_names: str | None = None,
                          templates: str = DEFAULT_TEMPLATES, batch_size: int = 16, workers: int = 4,
                          limit: int | None = None, shard: DistributedEnv = DistributedEnv(),
                          cache_dir: str | os.PathLike | None = None, progress: bool = True,
                          description: str | None = None, skip_unreadable: bool = False) -> dict:
    """mIoU / mAcc / aAcc and per-class IoU of ``model`` on one dataset (this rank's shard, then summed).

    ``class_names`` defaults to the dataset's bundled list; ``batch_size`` is windows per forward pass.
    The label maps to be used are checked before the first image; an image file that cannot be decoded
    stops the evaluation with its name, or with ``skip_unreadable`` is left out and counted.
    """
    layout = segmentation_layout(dataset)
    protocol = protocol or DEFAULT_PROTOCOLS[layout.name]
    if not layout.has_background and (protocol.prob_threshold > 0 or protocol.area_threshold > 0):
        raise ValueError(f"{layout.title} has no background class: prob_threshold and area_threshold must be 0 "
                         f"(got {protocol.prob_threshold}, {protocol.area_threshold})")
    data = SegmentationDataset(dataset, root, protocol.short_side, protocol.max_long_side)
    names = load_class_names(class_names or layout.class_names)
    if len(names) != layout.num_classes:
        raise ValueError(f"{layout.title} has {layout.num_classes} classes but the class-name list "
                         f"{class_names or layout.class_names!r} has {len(names)}")

    def make_predictor():
        model.eval()
        parameter = next(model.parameters())
        classifier = build_text_classifier(model, tokenizer, names, load_templates(templates), cache_dir=cache_dir,
                                           progress=progress and shard.is_main)

        def predict(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
            image = normalize_images(pixels, model.preprocess_cfg).to(parameter.dtype)[None]
            logits = sliding_window_logits(model, image, classifier.embeddings, window=protocol.window,
                                           stride=protocol.stride, batch_size=batch_size)
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0]
            return predict_labels(logits, classifier, protocol)
        return predict, parameter.device
    confusion, counts = evaluation_loop(data, layout, make_predictor, workers=workers, limit=limit, shard=shard,
                                        progress=progress, description=description, skip_unreadable=skip_unreadable)
    return {"dataset": layout.name, "layout": data.layout.convention, **counts,
            "protocol": asdict(protocol), "templates": templates,
            "class_names": class_names or layout.class_names,
            **segmentation_metrics(confusion, [", ".join(synonyms) for synonyms in names], miou_rule="mmseg")}
