"""OV-COCO / OV-LVIS scoring: ground truth given as detections is perfect; the split's rules hold."""
import json

import pytest

from denserc.detect.evaluation import evaluate_detections, markdown_row
from denserc.detect.protocols import OV_COCO_BASE, OV_COCO_IDS, OV_COCO_NOVEL, get_protocol


def _coco_ground_truth(categories, per_class=2, images=4):
    annotations = []
    for image_id in range(1, images + 1):
        for k, category in enumerate(categories):
            if (k + image_id) % 3:
                continue
            for j in range(per_class):
                x, y = 10 + 70 * j, 10 + (k % 5) * 60
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category["id"],
                                    "bbox": [x, y, 40, 30], "area": 1200, "iscrowd": 0,
                                    "segmentation": [[x, y, x + 40, y, x + 40, y + 30, x, y + 30]]})
    return {"images": [{"id": i, "file_name": f"{i}.jpg", "height": 400, "width": 400} for i in range(1, images + 1)],
            "annotations": annotations, "categories": categories}


def _as_detections(ground_truth, score=1.0):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": score}
            for a in ground_truth["annotations"]]


def _write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


def test_ov_coco_split_is_48_base_17_novel_by_coco_id():
    assert len(OV_COCO_BASE) == 48 and len(OV_COCO_NOVEL) == 17 and len(OV_COCO_IDS) == 65
    categories = [{"id": cid, "name": name} for name, cid in OV_COCO_IDS.items()]
    split = get_protocol("ov-coco").split(categories)
    assert split.novel_ids == [5, 6, 17, 18, 21, 22, 28, 32, 36, 41, 47, 49, 61, 63, 76, 81, 87]
    assert len(split.base_ids) == 48


def test_ground_truth_as_detections_scores_100_on_novel_and_base_and_ignores_other_classes(tmp_path):
    categories = [{"id": cid, "name": name} for name, cid in OV_COCO_IDS.items()]
    categories.append({"id": 10, "name": "traffic light"})  # COCO class outside the OV-COCO split
    ground_truth = _coco_ground_truth(categories)
    path = _write(tmp_path, "gt.json", ground_truth)
    detections = _as_detections(ground_truth)
    report = evaluate_detections(path, detections, "ov-coco")
    assert report["ap50_novel"] == pytest.approx(100.0)
    assert report["ap50_base"] == pytest.approx(100.0)
    assert report["ap50_all"] == pytest.approx(100.0)
    assert report["ignored_detections"] == sum(d["category_id"] == 10 for d in detections) > 0
    assert "| 100.0 | 100.0 | 100.0 |" in markdown_row(report)


def test_missing_novel_detections_drop_novel_ap_only(tmp_path):
    categories = [{"id": cid, "name": name} for name, cid in OV_COCO_IDS.items()]
    ground_truth = _coco_ground_truth(categories)
    path = _write(tmp_path, "gt.json", ground_truth)
    novel = {OV_COCO_IDS[name] for name in OV_COCO_NOVEL}
    report = evaluate_detections(path, [d for d in _as_detections(ground_truth) if d["category_id"] not in novel],
                                 "ov-coco")
    assert report["ap50_novel"] == pytest.approx(0.0)
    assert report["ap50_base"] == pytest.approx(100.0)


def test_ov_coco_needs_coco_ids_and_detections_must_name_known_images(tmp_path):
    path = _write(tmp_path, "gt.json", _coco_ground_truth([{"id": 1, "name": "person"}]))
    with pytest.raises(ValueError, match=r"lacks 64 OV-COCO categories: bicycle \(id 2\)"):
        evaluate_detections(path, [], "ov-coco")
    categories = [{"id": cid, "name": name} for name, cid in OV_COCO_IDS.items()]
    path = _write(tmp_path, "gt.json", _coco_ground_truth(categories))
    with pytest.raises(ValueError, match=r"1 detected image ids are not in the annotation file \(e.g. \[99\]\)"):
        evaluate_detections(path, [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}], "ov-coco")
    with pytest.raises(ValueError, match="unknown detection protocol 'ov-voc'"):
        evaluate_detections(path, [], "ov-voc")


def test_lvis_ground_truth_as_detections_scores_100_for_rare_common_frequent(tmp_path):
    categories = [{"id": i, "name": f"thing_{i}", "frequency": "rcf"[i % 3], "synonyms": [], "def": "",
                   "synset": f"s{i}", "image_count": 1, "instance_count": 1} for i in range(1, 10)]
    ground_truth = _coco_ground_truth(categories)
    for image in ground_truth["images"]:
        image.update(neg_category_ids=[], not_exhaustive_category_ids=[])
    path = _write(tmp_path, "lvis.json", ground_truth)
    report = evaluate_detections(path, _as_detections(ground_truth), "ov-lvis")
    assert report["headline"] == "box"
    for key in ("apr", "apc", "apf", "ap"):
        assert report[key] == pytest.approx(100.0)
    assert get_protocol("ov-lvis").split(categories).novel_ids == [3, 6, 9]


def test_lvis_masks_are_scored_and_become_the_headline(tmp_path):
    from pycocotools import mask as mask_utils
    categories = [{"id": i, "name": f"thing_{i}", "frequency": "rcf"[i % 3]} for i in range(1, 4)]
    ground_truth = _coco_ground_truth(categories)
    for image in ground_truth["images"]:
        image.update(neg_category_ids=[], not_exhaustive_category_ids=[])
    path = _write(tmp_path, "lvis.json", ground_truth)
    detections = _as_detections(ground_truth)
    for detection, annotation in zip(detections, ground_truth["annotations"]):
        rle = mask_utils.merge(mask_utils.frPyObjects(annotation["segmentation"], 400, 400))
        detection["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    report = evaluate_detections(path, detections, "ov-lvis")
    assert report["headline"] == "mask" and report["mask"]["apr"] == pytest.approx(100.0)
    assert report["apr"] == report["mask"]["apr"] and report["box"]["ap"] == pytest.approx(100.0)
