"""Evaluating a detector on a protocol's validation set: detections -> COCO results -> report.

A run applies the protocol's ``inference_settings`` (the transfer protocols' CLIPSelf head settings) and
then ``settings`` (overrides, e.g. from the command line), for its duration only.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from torch.utils.data import DataLoader
from tqdm import tqdm

from .data import DetectionDataset, collate_samples, letterbox, normalisation
from .detector import Detector, to_coco_results
from .evaluation import evaluate_detections, read_split, scored_image_ids
from .protocols import Protocol, get_protocol


def detect_dataset(detector: Detector, annotations: str | os.PathLike, images: str | os.PathLike,
                   protocol: str | Protocol, *, batch_size: int = 8, num_workers: int = 0,
                   max_images: int | None = None, settings: Mapping[str, Any] | None = None,
                   progress: bool = True) -> list[dict]:
    """COCO results of ``detector`` over the protocol's whole split, on the images the protocol scores
    (the first ``max_images`` of them by id, if given)."""
    protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
    ground_truth, split = read_split(annotations, protocol, scoring=True)
    image_ids = scored_image_ids(ground_truth, split, protocol)[:max_images]
    dataset = DetectionDataset(annotations, images, split, base_only=False, image_ids=image_ids,
                               ground_truth=ground_truth)
    detector.set_classes(split.names, novel=split.novel)
    size = detector.config.data.image_size
    mean, std = normalisation(detector.config.data, detector.model.tower)
    with_masks = protocol.evaluator == "lvis"  # the coco evaluator scores boxes only
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_samples)
    results = []
    with detector.settings(**{**protocol.inference_settings, **(settings or {})}):
        for samples in tqdm(loader, desc="denserc detect eval", disable=not progress):
            batch = letterbox(samples, size, mean, std, detector.device)
            results.extend(to_coco_results(detector.detect(batch, with_masks=with_masks), batch.image_ids,
                                           split.category_ids))
    return results


def evaluate_detector(detector: Detector, annotations: str | os.PathLike, images: str | os.PathLike,
                      protocol: str | Protocol, **options) -> tuple[dict, list[dict]]:
    """(report, COCO results) of ``detector`` on the protocol's validation set (``detect_dataset``'s options)."""
    detections = detect_dataset(detector, annotations, images, protocol, **options)
    image_ids = None
    if options.get("max_images") is not None:  # score the evaluated images only
        protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
        ground_truth, split = read_split(annotations, protocol, scoring=True)
        image_ids = scored_image_ids(ground_truth, split, protocol)[:options["max_images"]]
    return evaluate_detections(annotations, detections, protocol, image_ids=image_ids), detections
