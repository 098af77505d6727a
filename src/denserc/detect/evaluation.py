"""Score COCO-format detections under an open-vocabulary protocol.

    coco evaluator: pycocotools box AP over the split's classes (categories outside the split are
        ignored, as OVR-CNN's protocol does: COCOeval restricted to the split's category ids), up to
        1000 detections per image (``maxDets`` 100/300/1000, the peer's mmdet ``CocoDataset.evaluate``).
        With novel classes (OV-COCO): AP50 (and AP 0.5:0.95) averaged over the novel, the base and all
        classes; without (the transfer protocols ``coco``, ``objects365``): AP, AP50, AP75 over all.
    lvis evaluator (OV-LVIS): the ``lvis`` package's AP, APr, APc, APf (300 detections per image) for
        boxes, and for masks when the detections carry ``segmentation``; the top-level numbers are the
        masks' when present (the paper's OV-LVIS mAP_r is mask AP of the rare classes), else the boxes'.

A protocol with ``images_with_split_classes_only`` (OV-COCO) is scored on the images holding an
annotation of a split class, whichever file is given: ``instances_val2017.json`` then counts the 4,836
images of OVR-CNN's ``instances_val2017_all_2.json``. Detections are COCO results: dicts with
``image_id``, ``category_id``, ``bbox`` ([x, y, w, h]), ``score`` and optionally ``segmentation`` (RLE),
from this library's detector or any other.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from pathlib import Path

import numpy as np

from ..io import read_json
from ..reports import markdown_table
from .protocols import Protocol, Split, get_protocol

LVIS_MAX_DETECTIONS = 300
COCO_MAX_DETECTIONS = (100, 300, 1000)  # COCOeval maxDets; AP counts the last


def read_split(annotations: str | os.PathLike, protocol: Protocol, *, scoring: bool,
               what: str = "annotation") -> tuple[dict, Split]:
    """The COCO-style file and the protocol's split of its categories; a file that does not fit is refused
    in one line naming it. ``scoring``: the file must hold every class of the split (not a training file
    without the novel classes)."""
    ground_truth = read_json(annotations, what)
    if not isinstance(ground_truth, dict) or "categories" not in ground_truth or "images" not in ground_truth:
        raise ValueError(f"{what} file {annotations} is not COCO-style: expected a JSON object with "
                         "'images', 'annotations' and 'categories'")
    try:
        split = protocol.split(ground_truth["categories"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{what} file {annotations}: {error}") from error
    if scoring:
        present = {c["id"] for c in ground_truth["categories"]}
        absent = [name for cid, name in zip(split.category_ids, split.names) if cid not in present]
        if absent:
            raise ValueError(f"{what} file {annotations} lacks {len(absent)} {protocol.name} classes "
                             f"({', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}): a training file? "
                             "Scoring needs every class of the split")
    return ground_truth, split


def scored_image_ids(ground_truth: dict, split: Split, protocol: Protocol) -> list[int]:
    """The images a protocol scores, by id: all of the file's, or (``images_with_split_classes_only``) those
    with an annotation of a split class, crowd ones included (OVR-CNN's rule for
    ``instances_val2017_all_2.json``; mmdet's ``tools/dataset_converters/coco2ovd.py`` writes it the same way)."""
    if not protocol.images_with_split_classes_only:
        return sorted(image["id"] for image in ground_truth["images"])
    categories = set(split.category_ids)
    return sorted({a["image_id"] for a in ground_truth.get("annotations", []) if a["category_id"] in categories})


def evaluate_detections(annotations: str | os.PathLike, detections: list[dict] | str | os.PathLike,
                        protocol: str | Protocol, image_ids: list[int] | None = None) -> dict:
    """The protocol's report for ``detections`` against the ground truth file ``annotations``, on the
    images the protocol scores (``scored_image_ids``; of those, only ``image_ids`` if given)."""
    protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
    ground_truth, split = read_split(annotations, protocol, scoring=True)
    if not isinstance(detections, list):
        detections = read_json(detections, "detections")
        if not isinstance(detections, list):
            raise ValueError("the detections file must hold a JSON list of COCO results "
                             "({'image_id', 'category_id', 'bbox', 'score'})")
    _check_detections(detections, ground_truth)
    scored = scored_image_ids(ground_truth, split, protocol)
    if image_ids is not None:
        scored = sorted(set(scored) & set(image_ids))
    categories, images = set(split.category_ids), set(scored)
    kept = [d for d in detections if d["category_id"] in categories and d["image_id"] in images]
    if protocol.evaluator == "coco":
        report = _coco_report(ground_truth, kept, split, scored)
    else:
        report = _lvis_report(Path(annotations), kept, split, scored)
    return {"protocol": protocol.name, "num_images": len(scored),
            "num_detections": len(kept), "ignored_detections": len(detections) - len(kept), **report}


def markdown_row(report: dict, label: str = "") -> str:
    """One Markdown table row: the protocol's headline numbers, in percent."""
    if "ap50_novel" in report:
        cells = [report["ap50_novel"], report["ap50_base"], report["ap50_all"]]
        header = ["model", "AP50 novel", "AP50 base", "AP50 all"]
    elif "apr" in report:
        cells = [report["apr"], report["apc"], report["apf"], report["ap"]]
        header = ["model", "APr", "APc", "APf", "AP"]
    else:
        cells = [report["ap"], report["ap50"], report["ap75"]]
        header = ["model", "AP", "AP50", "AP75"]
    return markdown_table(header, [[label or report["protocol"], *(f"{value:.1f}" for value in cells)]])


def _check_detections(detections: list[dict], ground_truth: dict) -> None:
    required = ("image_id", "category_id", "bbox", "score")
    for index, detection in enumerate(detections):
        missing = [key for key in required if key not in detection]
        if missing:
            raise ValueError(f"detection {index} lacks {missing}; COCO results need {list(required)}")
    image_ids = {image["id"] for image in ground_truth["images"]}
    unknown = sorted({d["image_id"] for d in detections} - image_ids)
    if unknown:
        raise ValueError(f"{len(unknown)} detected image ids are not in the annotation file (e.g. {unknown[:5]})")


def _coco_report(ground_truth: dict, detections: list[dict], split: Split, image_ids: list[int]) -> dict:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    per_class = {iou: {c: math.nan for c in split.category_ids} for iou in ("ap", "ap50", "ap75")}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        if detections:
            dt = gt.loadRes([dict(d) for d in detections])
            evaluator = COCOeval(gt, dt, "bbox")
            evaluator.params.catIds = list(split.category_ids)
            evaluator.params.imgIds = list(image_ids)
            evaluator.params.maxDets = list(COCO_MAX_DETECTIONS)
            evaluator.evaluate()
            evaluator.accumulate()
            precision = evaluator.eval["precision"]  # (iou thresholds, recall, class, area, max dets)
            at = {0.5: 0, 0.75: int(np.argmin(np.abs(evaluator.params.iouThrs - 0.75)))}
            for k, category_id in enumerate(evaluator.params.catIds):
                per_class["ap"][category_id] = _mean_valid(precision[:, :, k, 0, -1])
                per_class["ap50"][category_id] = _mean_valid(precision[at[0.5], :, k, 0, -1])
                per_class["ap75"][category_id] = _mean_valid(precision[at[0.75], :, k, 0, -1])
    if not detections:  # nothing detected: every class with ground truth scores 0
        images = set(image_ids)
        with_gt = {a["category_id"] for a in ground_truth["annotations"] if a["image_id"] in images}
        for category_id in with_gt & set(split.category_ids):
            for values in per_class.values():
                values[category_id] = 0.0

    def group_mean(values: dict, ids) -> float:
        scored = [values[c] for c in ids if not math.isnan(values[c])]
        return 100.0 * float(np.mean(scored)) if scored else math.nan

    name = dict(zip(split.category_ids, split.names))
    if not split.novel_ids:
        return {**{key: group_mean(values, split.category_ids) for key, values in per_class.items()},
                "per_class_ap": {name[c]: 100.0 * v for c, v in per_class["ap"].items() if not math.isnan(v)}}
    ap50, ap = per_class["ap50"], per_class["ap"]
    return {"ap50_novel": group_mean(ap50, split.novel_ids),
            "ap50_base": group_mean(ap50, split.base_ids),
            "ap50_all": group_mean(ap50, split.category_ids),
            "ap_novel": group_mean(ap, split.novel_ids),
            "ap_base": group_mean(ap, split.base_ids),
            "ap_all": group_mean(ap, split.category_ids),
            "per_class_ap50": {name[c]: 100.0 * v for c, v in ap50.items() if not math.isnan(v)}}


def _mean_valid(precision: np.ndarray) -> float:
    """COCOeval's convention: -1 marks 'no ground truth'; a class without any scores NaN."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else math.nan


@contextlib.contextmanager
def _numpy_float_alias():
    """``lvis`` 0.5.3 (its latest release) calls ``np.float``, which NumPy 1.24 removed: alias it to
    ``float`` while the evaluation runs, and remove the alias afterwards."""
    added = not hasattr(np, "float")
    if added:
        np.float = float
    try:
        yield
    finally:
        if added:
            del np.float


def _lvis_report(annotations: Path, detections: list[dict], split: Split, image_ids: list[int]) -> dict:
    from lvis import LVIS, LVISEval, LVISResults

    logging.getLogger("lvis").setLevel(logging.WARNING)
    if not detections:
        raise ValueError("no detections of the split's categories to evaluate")
    gt = LVIS(str(annotations))
    results = {}
    iou_types = ["bbox"] + (["segm"] if all("segmentation" in d for d in detections) else [])
    for iou_type in iou_types:
        with contextlib.redirect_stdout(io.StringIO()), _numpy_float_alias():
            dt = LVISResults(gt, [dict(d) for d in detections], max_dets=LVIS_MAX_DETECTIONS)
            evaluator = LVISEval(gt, dt, iou_type)
            evaluator.params.img_ids = list(image_ids)
            evaluator.run()
        numbers = evaluator.get_results()
        results["box" if iou_type == "bbox" else "mask"] = {
            key.lower(): 100.0 * float(numbers[key]) for key in ("AP", "AP50", "APr", "APc", "APf")}
    headline = results.get("mask", results["box"])
    return {"apr": headline["apr"], "apc": headline["apc"], "apf": headline["apf"], "ap": headline["ap"],
            "headline": "mask" if "mask" in results else "box", **results}
