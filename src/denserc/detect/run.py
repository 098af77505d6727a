"""Evaluating a detector on a protocol's validation set: detections -> COCO results -> report."""
from __future__ import annotations

import os

from torch.utils.data import DataLoader
from tqdm import tqdm

from .data import DetectionDataset, collate_samples, letterbox
from .detector import Detector, to_coco_results
from .evaluation import evaluate_detections, read_json
from .protocols import get_protocol


def detect_dataset(detector: Detector, annotations: str | os.PathLike, images: str | os.PathLike, protocol: str,
                   *, batch_size: int = 8, num_workers: int = 0, max_images: int | None = None,
                   progress: bool = True) -> list[dict]:
    """COCO results of ``detector`` on every image of ``annotations`` over the protocol's whole split."""
    split = get_protocol(protocol).split(read_json(annotations, "annotation")["categories"])
    dataset = DetectionDataset(annotations, images, split, base_only=False, max_images=max_images)
    detector.set_classes(split.names, novel=split.novel)
    size = detector.config.data.image_size
    mean, std = detector.model.tower.preprocess_cfg["mean"], detector.model.tower.preprocess_cfg["std"]
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_samples)
    results = []
    for samples in tqdm(loader, desc="denserc detect eval", disable=not progress):
        batch = letterbox(samples, size, mean, std, detector.device)
        results.extend(to_coco_results(detector.detect(batch), batch.image_ids, split.category_ids))
    return results


def evaluate_detector(detector: Detector, annotations: str | os.PathLike, images: str | os.PathLike, protocol: str,
                      **options) -> tuple[dict, list[dict]]:
    """(report, COCO results) of ``detector`` on the protocol's validation set."""
    max_images = options.get("max_images")
    image_ids = None
    if max_images is not None:  # score against the evaluated images only (the dataset's first ones by id)
        image_ids = sorted(image["id"] for image in read_json(annotations, "annotation")["images"])[:max_images]
    detections = detect_dataset(detector, annotations, images, protocol, **options)
    return evaluate_detections(annotations, detections, protocol, image_ids=image_ids), detections
