"""OV-COCO / OV-LVIS scoring: ground truth given as detections is perfect; the split's rules hold."""
import json

import pytest

from denserc.cli import main
from denserc.detect.evaluation import evaluate_detections, markdown_row
from denserc.detect.protocols import (COCO_IDS, OV_COCO_BASE, OV_COCO_IDS, OV_COCO_NOVEL, Protocol, get_protocol,
                                      objects365_classes, prompt_name)


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


def test_ov_coco_refuses_other_files_in_one_line_and_detections_must_name_known_images(tmp_path):
    path = _write(tmp_path, "gt.json", _coco_ground_truth([{"id": 1, "name": "person"}]))
    with pytest.raises(ValueError, match=r"gt.json: the categories do not fit ov-coco: 'bicycle', 'car', 'motorcycle', "
                                         r"'train' and 43 more of its 48 base classes are not among the file's 1 "
                                         r"categories \('person'\)$"):
        evaluate_detections(path, [], "ov-coco")
    categories = [{"id": cid, "name": name} for name, cid in OV_COCO_IDS.items()]
    path = _write(tmp_path, "gt.json", _coco_ground_truth(categories))
    with pytest.raises(ValueError, match=r"1 detected image ids are not in the annotation file \(e.g. \[99\]\)"):
        evaluate_detections(path, [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}], "ov-coco")
    with pytest.raises(ValueError, match="unknown detection protocol 'ov-voc'"):
        evaluate_detections(path, [], "ov-voc")


def _lvis_like_categories():
    """An LVIS file's categories: its own names on ids that cover every COCO id (LVIS v1 has 1..1203), a few
    COCO names among them at other ids."""
    names = {1: "aerosol_can", 2: "air_conditioner", 3: "airplane", 4: "alarm_clock", 12: "apple", 40: "person"}
    return [{"id": i, "name": names.get(i, f"lvis_thing_{i}"), "frequency": "f"} for i in range(1, 96)]


def test_an_lvis_file_under_ov_coco_is_refused_naming_the_mismatch_not_a_key_error(tmp_path, capsys):
    ground_truth = _coco_ground_truth(_lvis_like_categories())
    path = _write(tmp_path, "lvis_v1_val.json", ground_truth)
    with pytest.raises(ValueError) as refused:
        evaluate_detections(path, _as_detections(ground_truth), "ov-coco")
    assert str(refused.value).count("\n") == 0
    assert "do not fit ov-coco: 'bicycle', 'car', 'motorcycle', 'train' and 42 more of its 48 base classes are " \
           "not among the file's 95 categories ('aerosol_can', 'air_conditioner', 'airplane', ...)" in str(refused.value)
    _write(tmp_path, "dets.json", _as_detections(ground_truth))
    code = main(["detect", "eval", "--annotations", str(path), "--detections", str(tmp_path / "dets.json"),
                 "--protocol", "ov-coco"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "do not fit ov-coco" in err and "Traceback" not in err


def test_ov_coco_scores_the_images_holding_a_split_class_whichever_file(tmp_path):
    """OVR-CNN's instances_val2017_all_2.json rule: an image with only an out-of-split class (5) or no
    annotation (6) is not scored, one with only a crowd region of a split class (7) is."""
    categories = [{"id": cid, "name": name} for name, cid in OV_COCO_IDS.items()] + [{"id": 10, "name": "traffic light"}]
    ground_truth = _coco_ground_truth(categories)
    ground_truth["images"] += [{"id": i, "file_name": f"{i}.jpg", "height": 400, "width": 400} for i in (5, 6, 7)]
    ground_truth["annotations"] += [
        {"id": 9001, "image_id": 5, "category_id": 10, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 0},
        {"id": 9002, "image_id": 7, "category_id": 1, "bbox": [0, 0, 90, 90], "area": 8100, "iscrowd": 1}]
    path = _write(tmp_path, "instances_val2017.json", ground_truth)
    detections = _as_detections(ground_truth, score=0.5)
    spurious = [{"image_id": i, "category_id": 1, "bbox": [200, 200, 50, 50], "score": 0.9} for i in (5, 6)]
    report = evaluate_detections(path, detections + spurious, "ov-coco")
    assert report["num_images"] == 5  # images 1-4 and 7
    assert report["ap50_all"] == pytest.approx(100.0)
    assert report["ignored_detections"] == 2 + sum(d["category_id"] == 10 for d in detections)
    everywhere = Protocol("all-images", "coco", get_protocol("ov-coco").split)  # the rule off: they count
    assert evaluate_detections(path, detections + spurious, everywhere)["per_class_ap50"]["person"] < 100


def test_split_files_of_clipself_and_ovr_cnn_work_as_they_are(tmp_path):
    """Classes are found by name: CLIPSelf's 65-category training file whatever its ids; OVR-CNN's
    48-category training file (no novel classes) splits for training but is refused for scoring."""
    renumbered = [{"id": 100 + k, "name": name} for k, name in enumerate(OV_COCO_IDS)]
    split = get_protocol("ov-coco").split(renumbered)
    assert split.category_ids == tuple(range(100, 165)) and split.names == tuple(OV_COCO_IDS)
    ground_truth = _coco_ground_truth(renumbered)
    path = _write(tmp_path, "instances_train2017_seen_2_65_cat.json", ground_truth)
    assert evaluate_detections(path, _as_detections(ground_truth), "ov-coco")["ap50_all"] == pytest.approx(100.0)
    seen = [{"id": cid, "name": name, "split": "seen"} for name, cid in OV_COCO_IDS.items() if name in OV_COCO_BASE]
    split = get_protocol("ov-coco").split(seen)
    assert len(split.names) == 65 and split.novel_ids == [OV_COCO_IDS[name] for name in OV_COCO_NOVEL]
    path = _write(tmp_path, "instances_train2017_seen_2.json", _coco_ground_truth(seen))
    with pytest.raises(ValueError, match=r"instances_train2017_seen_2.json lacks 17 ov-coco classes \(airplane, bus, "
                                         r"cat, dog, cow \.\.\.\): a training file\?"):
        evaluate_detections(path, [], "ov-coco")


def test_coco_transfer_reports_ap_ap50_ap75_over_the_80_classes(tmp_path):
    categories = [{"id": cid, "name": name} for name, cid in COCO_IDS.items()]
    ground_truth = _coco_ground_truth(categories, per_class=1)
    path = _write(tmp_path, "instances_val2017.json", ground_truth)
    report = evaluate_detections(path, _as_detections(ground_truth), "coco")
    assert report["ap"] == report["ap50"] == report["ap75"] == pytest.approx(100.0)
    assert "ap50_novel" not in report and len(report["per_class_ap"]) == 80
    assert markdown_row(report, "lvis->coco").splitlines()[0] == "| model | AP | AP50 | AP75 |"
    # a 40 x 30 box found as 40 x 20 (IoU 2/3): a hit at IoU 0.5, a miss at 0.75
    shifted = [{**d, "bbox": [d["bbox"][0], d["bbox"][1], 40, 20]} for d in _as_detections(ground_truth)]
    report = evaluate_detections(path, shifted, "coco")
    assert report["ap50"] == pytest.approx(100.0) and report["ap75"] == pytest.approx(0.0)
    assert report["ap"] == pytest.approx(100.0 * 4 / 10)  # hits at IoU 0.50, 0.55, 0.60, 0.65 of 10 thresholds


def test_coco_evaluation_counts_up_to_1000_detections_per_image_as_the_peers_mmdet(tmp_path):
    """One person, found by the 130th of 130 person detections: precision 1/130 at recall 1 (COCOeval's
    default maxDets of 100 would drop it and score 0)."""
    categories = [{"id": cid, "name": name} for name, cid in COCO_IDS.items()]
    ground_truth = {"images": [{"id": 1, "file_name": "1.jpg", "height": 1000, "width": 1000}],
                    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 30], "area": 1200,
                                     "iscrowd": 0}], "categories": categories}
    path = _write(tmp_path, "gt.json", ground_truth)
    misses = [{"image_id": 1, "category_id": 1, "bbox": [100 + 6 * k, 500, 5, 5], "score": 0.9} for k in range(129)]
    hit = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 30], "score": 0.5}
    assert evaluate_detections(path, misses + [hit], "coco")["ap50"] == pytest.approx(100.0 / 130)


def test_objects365_finds_the_v1_classes_by_name_and_prompts_the_peers_spelling(tmp_path):
    classes = objects365_classes()
    assert len(classes) == 365 and classes[6] == "cabinet / shelf" and classes[279] == "hami melon"
    in_file = [name.replace(" / ", "/").replace("hami melon", "hamimelon") for name in classes]  # the v1 file's
    categories = [{"id": k + 1, "name": name} for k, name in reversed(list(enumerate(in_file)))]
    split = get_protocol("objects365").split(categories)
    assert split.category_ids == tuple(range(1, 366)) and not any(split.novel)
    assert split.names[6] == "cabinet or shelf" and split.names[279] == "hami melon" and split.names[158] == "tissue"
    ground_truth = _coco_ground_truth(categories[:30], per_class=1)
    ground_truth["categories"] = categories
    path = _write(tmp_path, "objects365_val.json", ground_truth)
    assert evaluate_detections(path, _as_detections(ground_truth), "objects365")["ap"] == pytest.approx(100.0)
    coco = [{"id": cid, "name": name} for name, cid in COCO_IDS.items()]
    with pytest.raises(ValueError, match=r"do not fit objects365: 'sneakers', 'hat', 'lamp', 'cabinet / shelf' and "
                                         r"\d+ more of its 365 Objects365 v1 classes"):
        get_protocol("objects365").split(coco)


def test_lvis_prompts_keep_the_parenthesised_qualifier_as_clipself_renders_names():
    assert prompt_name("bow_(weapon)") == "bow (weapon)"
    assert prompt_name("Band_Aid") == "band aid" and prompt_name("tape measure / ruler") == "tape measure or ruler"
    categories = [{"id": 2, "name": "bow_(weapon)", "frequency": "r"}, {"id": 1, "name": "bow_(decorative_ribbons)",
                                                                           "frequency": "f"}]
    assert get_protocol("ov-lvis").split(categories).names == ("bow (decorative ribbons)", "bow (weapon)")


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
