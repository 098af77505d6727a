"""Metrics on hand-made inputs: confusion matrix with ignore 255, mIoU with absent classes, region mAcc."""
import pytest
import torch

from denserc.distributed import DistributedEnv
from denserc.eval.metrics import (add_region_predictions, confusion_matrix, region_counts, region_metrics,
                                  segmentation_metrics)


def test_confusion_matrix_counts_pairs_and_ignores_255():
    target = torch.tensor([[0, 0, 1], [1, 255, 0]])
    prediction = torch.tensor([[0, 1, 1], [0, 2, 0]])
    # rows = ground truth, columns = prediction; the pixel labelled 255 (predicted 2) is not counted
    expected = torch.tensor([[2, 1, 0], [1, 1, 0], [0, 0, 0]])
    assert torch.equal(confusion_matrix(prediction, target, 3), expected)


def test_miou_leaves_out_classes_absent_from_both_and_keeps_false_positives():
    # class 0: TP 2, FN 1, FP 1 -> IoU 2/4; class 1: TP 1, FN 1, FP 1 -> 1/3; class 2: nowhere -> excluded
    metrics = segmentation_metrics(torch.tensor([[2, 1, 0], [1, 1, 0], [0, 0, 0]]), ["a", "b", "c"])
    assert metrics["mIoU"] == pytest.approx(100 * (1 / 2 + 1 / 3) / 2)
    assert metrics["mAcc"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
    assert metrics["aAcc"] == pytest.approx(100 * 3 / 5)
    assert [c["IoU"] for c in metrics["per_class"]] == [pytest.approx(50.0), pytest.approx(100 / 3), None]
    assert [c["pixels"] for c in metrics["per_class"]] == [3, 2, 0]
    # class 2 predicted once but absent from the ground truth: IoU 0, and it counts in the mean
    metrics = segmentation_metrics(torch.tensor([[1, 0, 1], [0, 0, 0], [0, 0, 0]]), ["a", "b", "c"])
    assert [c["IoU"] for c in metrics["per_class"]] == [50.0, None, 0.0]
    assert metrics["mIoU"] == 25.0
    assert metrics["mAcc"] == 50.0


def test_both_miou_rules_on_a_hand_made_confusion_matrix():
    """mmseg averages every class with a non-empty union, detectron2 (CAT-Seg) only the classes in the ground
    truth: class 2 is predicted (2 pixels) but absent from the ground truth, class 3 is absent from both."""
    confusion = torch.tensor([[3, 0, 1, 0],   # class 0: TP 3, FN 1, FP 1 -> IoU 3/5
                              [1, 2, 1, 0],   # class 1: TP 2, FN 2, FP 0 -> IoU 2/4
                              [0, 0, 0, 0],   # class 2: TP 0, FN 0, FP 2 -> IoU 0
                              [0, 0, 0, 0]])  # class 3: nowhere
    names = ["a", "b", "c", "d"]
    mmseg = segmentation_metrics(confusion, names, miou_rule="mmseg")
    detectron2 = segmentation_metrics(confusion, names, miou_rule="detectron2")
    assert mmseg["mIoU"] == pytest.approx(100 * (3 / 5 + 2 / 4 + 0) / 3)
    assert detectron2["mIoU"] == pytest.approx(100 * (3 / 5 + 2 / 4) / 2)
    assert [c["IoU"] for c in mmseg["per_class"]] == [pytest.approx(60.0), 50.0, 0.0, None]
    assert [c["IoU"] for c in detectron2["per_class"]] == [pytest.approx(60.0), 50.0, None, None]
    assert (mmseg["miou_rule"], detectron2["miou_rule"]) == ("mmseg", "detectron2")
    for key in ("mAcc", "aAcc"):  # the rules differ only in which classes the mIoU averages
        assert mmseg[key] == detectron2[key]
    assert segmentation_metrics(confusion, names)["mIoU"] == mmseg["mIoU"]  # the training-free default
    with pytest.raises(ValueError, match="unknown mIoU rule 'coco'; known: mmseg, detectron2"):
        segmentation_metrics(confusion, names, miou_rule="coco")


def test_confusion_matrix_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"ground-truth labels must be in 0\.\.2 .*found 0\.\.7"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)


def _scores_ranking(label: int, rank: int, num_classes: int) -> torch.Tensor:
    """Scores over classes that put ``label`` at position ``rank`` (1 = best)."""
    others = [c for c in range(num_classes) if c != label]
    order = others[:rank - 1] + [label] + others[rank - 1:]
    scores = torch.empty(num_classes)
    scores[order] = torch.arange(num_classes, 0, -1, dtype=torch.float)
    return scores


def test_region_metrics_top1_top5_over_segments_and_per_class():
    num_classes = 6
    segments = [(0, 1), (0, 1), (0, 1), (0, 6), (1, 3), (2, 1), (2, 6)]  # (label, rank of the label)
    labels = torch.tensor([label for label, _ in segments])
    scores = torch.stack([_scores_ranking(label, rank, num_classes) for label, rank in segments])
    counts = region_counts(num_classes)
    add_region_predictions(counts, "boxes", scores, labels)
    add_region_predictions(counts, "masks", torch.nn.functional.one_hot(labels, num_classes).float(), labels)
    is_thing = torch.tensor([True, True, False, True, True, False])
    metrics = region_metrics(counts, is_thing, [f"c{i}" for i in range(num_classes)])
    boxes = metrics["boxes"]
    assert boxes["top1"] == pytest.approx(100 * 4 / 7) and boxes["top5"] == pytest.approx(100 * 5 / 7)
    # classes without segments (3, 4, 5) do not enter the per-class mean
    assert boxes["mean_top1"] == pytest.approx(100 * (3 / 4 + 0 + 1 / 2) / 3)
    assert boxes["mean_top5"] == pytest.approx(100 * (3 / 4 + 1 + 1 / 2) / 3)
    assert (boxes["segments"], boxes["classes"]) == (7, 3)
    thing, stuff = metrics["boxes_thing"], metrics["boxes_stuff"]
    assert thing["top1"] == pytest.approx(60.0) and thing["mean_top1"] == pytest.approx(37.5)
    assert thing["mean_top5"] == pytest.approx(87.5) and thing["segments"] == 5
    assert stuff["top1"] == 50.0 and stuff["top5"] == 50.0 and stuff["segments"] == 2
    assert metrics["masks"]["top1"] == 100.0 and metrics["masks_stuff"]["mean_top1"] == 100.0
    assert metrics["per_class"][0] == {"name": "c0", "thing": True, "segments": 4, "boxes_top1": 75.0,
                                       "masks_top1": 100.0}
    assert metrics["per_class"][3]["boxes_top1"] is None


def test_shards_partition_the_images():
    shards = [DistributedEnv(rank, 3) for rank in range(3)]
    parts = [shard.indices(8) for shard in shards]
    assert parts == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert sorted(sum(parts, [])) == list(range(8))
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        DistributedEnv(2, 2)
