"""Metrics as sums (so shards add up with one all_reduce) and the scores computed from them.

Segmentation: a (C, C) confusion matrix, rows = ground truth, columns = prediction, pixels labelled
255 ignored. IoU_c = TP / (TP + FP + FN); a class with no ground-truth and no predicted pixel has
an undefined IoU and is left out of the mean (mmseg's nan-mean); a class predicted but absent from
the ground truth counts with IoU 0.

Region classification: per class, how many segments were classified correctly at top-1 and top-5,
out of how many; "mean" scores average the per-class accuracies over classes that have segments
(CLIPSelf's mAcc), plain scores divide total hits by total segments.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

IGNORE_INDEX = 255
REGION_POOLINGS = ("boxes", "masks")


def confusion_matrix(prediction: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(C, C) int64 counts of (ground truth, prediction) pairs over the pixels not labelled ``ignore_index``."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    valid = target != ignore_index
    target = target[valid].long()
    prediction = prediction[valid].long()
    for name, values in (("ground-truth", target), ("predicted", prediction)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} labels must be in 0..{num_classes - 1} (or {ignore_index} = ignore), "
                             f"found {int(values.min())}..{int(values.max())}")
    pairs = torch.bincount(target * num_classes + prediction, minlength=num_classes * num_classes)
    return pairs.reshape(num_classes, num_classes)


def segmentation_metrics(confusion: torch.Tensor, class_names: Sequence[str]) -> dict:
    """mIoU, mean class accuracy (mAcc) and pixel accuracy (aAcc) in percent, plus per-class IoU/Acc (a list).

    Undefined values (a class absent from both ground truth and prediction) are None in the output.
    """
    if confusion.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix {tuple(confusion.shape)} does not match {len(class_names)} class names")
    confusion = confusion.double().cpu()
    true_positive = confusion.diagonal()
    ground_truth = confusion.sum(dim=1)
    predicted = confusion.sum(dim=0)
    iou = true_positive / (ground_truth + predicted - true_positive)  # 0/0 = nan: class absent from both
    accuracy = true_positive / ground_truth
    return {
        "mIoU": _percent(iou.nanmean()),
        "mAcc": _percent(accuracy.nanmean()),
        "aAcc": _percent(true_positive.sum() / confusion.sum()),
        "per_class": [{"name": name, "IoU": _percent(iou[c]), "Acc": _percent(accuracy[c]),
                       "pixels": int(ground_truth[c])} for c, name in enumerate(class_names)],
    }


def region_counts(num_classes: int, device=None) -> torch.Tensor:
    """Zeroed counters (poolings, [top-1 hits, top-5 hits, segments], classes)."""
    return torch.zeros(len(REGION_POOLINGS), 3, num_classes, dtype=torch.long, device=device)


def add_region_predictions(counts: torch.Tensor, pooling: str, scores: torch.Tensor, labels: torch.Tensor) -> None:
    """Count the top-1/top-5 hits of class ``scores`` (K, C) against ``labels`` (K,) into ``counts``."""
    row = counts[REGION_POOLINGS.index(pooling)]
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    labels = labels.to(top.device)
    row[0].index_add_(0, labels, (top[:, 0] == labels).long())
    row[1].index_add_(0, labels, (top == labels[:, None]).any(dim=1).long())
    row[2].index_add_(0, labels, torch.ones_like(labels))


def region_metrics(counts: torch.Tensor, is_thing: torch.Tensor, class_names: Sequence[str]) -> dict:
    """Accuracies (percent) per pooling over all/thing/stuff segments, and per-class top-1 (a list)."""
    counts = counts.cpu()
    is_thing = is_thing.cpu().bool()
    subsets = {"": torch.ones_like(is_thing), "_thing": is_thing, "_stuff": ~is_thing}
    metrics = {}
    for p, pooling in enumerate(REGION_POOLINGS):
        hits1, hits5, segments = counts[p].double()
        for suffix, selected in subsets.items():
            present = selected & (segments > 0)
            total = segments[selected].sum()
            metrics[pooling + suffix] = {
                "top1": _percent(hits1[selected].sum() / total),
                "top5": _percent(hits5[selected].sum() / total),
                "mean_top1": _percent((hits1[present] / segments[present]).mean()),
                "mean_top5": _percent((hits5[present] / segments[present]).mean()),
                "segments": int(total),
                "classes": int(present.sum()),
            }
    metrics["per_class"] = [
        {"name": name, "thing": bool(is_thing[c]), "segments": int(counts[0, 2, c]),
         **{f"{pooling}_top1": _percent(counts[p, 0, c].double() / counts[p, 2, c])
            for p, pooling in enumerate(REGION_POOLINGS)}}
        for c, name in enumerate(class_names)]
    return metrics


def _percent(value: torch.Tensor) -> float | None:
    value = float(value)
    return None if math.isnan(value) else 100.0 * value
