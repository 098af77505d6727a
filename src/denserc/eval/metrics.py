"""Metrics as sums (so shards add up with one all_reduce) and the scores computed from them.

Segmentation: a (C, C) confusion matrix, rows = ground truth, columns = prediction, pixels labelled
255 ignored. IoU_c = TP / (TP + FP + FN). Which classes the mean runs over is the protocol's rule
(``MIOU_RULES``):

- ``mmseg`` (training-free OVSS: mmseg's ``IoUMetric``, which SCLIP and its successors report): every
  class with a non-empty union; a class predicted but absent from the ground truth counts with IoU 0;
- ``detectron2`` (CAT-Seg: detectron2's ``SemSegEvaluator.evaluate``, ``acc_valid = pos_gt > 0``,
  ``iou_valid = acc_valid & (union > 0)``, lines 192-198 of ``detectron2/evaluation/sem_seg_evaluation.py``
  at facebookresearch/detectron2@02b5c4e; CAT-Seg's ``train_net.py`` line 103 builds it): only the
  classes present in the ground truth; a class that is only predicted lowers the IoU of the classes
  whose pixels it took, not the mean's count. With hundreds of names (A-847, PC-459), many of them absent
  from the ground truth, the mmseg rule's zeros for names that are only predicted lower the mean.

Region classification: per class, how many segments were classified correctly at top-1 and top-5,
out of how many; "mean" scores average the per-class accuracies over classes that have segments
(CLIPSelf's mAcc), plain scores divide total hits by total segments.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

IGNORE_INDEX = 255
MIOU_RULES = ("mmseg", "detectron2")
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


def segmentation_metrics(confusion: torch.Tensor, class_names: Sequence[str], miou_rule: str = "mmseg") -> dict:
    """mIoU (averaged under ``miou_rule``, see the module docstring), mean class accuracy (mAcc) and pixel
    accuracy (aAcc) in percent, plus per-class IoU/Acc (a list) and the rule's name.

    Classes outside the rule's mean have IoU None in the output (mmseg: absent from both ground truth and
    prediction; detectron2: absent from the ground truth), as does the accuracy of a class without pixels.
    """
    if confusion.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix {tuple(confusion.shape)} does not match {len(class_names)} class names")
    if miou_rule not in MIOU_RULES:
        raise ValueError(f"unknown mIoU rule {miou_rule!r}; known: {', '.join(MIOU_RULES)}")
    confusion = confusion.double().cpu()
    true_positive = confusion.diagonal()
    ground_truth = confusion.sum(dim=1)
    predicted = confusion.sum(dim=0)
    iou = true_positive / (ground_truth + predicted - true_positive)  # 0/0 = nan: class absent from both
    if miou_rule == "detectron2":
        iou = torch.where(ground_truth > 0, iou, torch.nan)
    accuracy = true_positive / ground_truth
    return {
        "mIoU": _percent(iou.nanmean()),
        "miou_rule": miou_rule,
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
