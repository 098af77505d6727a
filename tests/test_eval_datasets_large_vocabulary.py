"""ADE20K-847 and PASCAL Context-459 readers (16-bit TIFF labels) and COCO-Stuff's training split."""
import numpy as np
import pytest
import torch
from PIL import Image

from denserc.eval.datasets import SegmentationDataset, detect_segmentation_dataset
from denserc.eval.text import load_class_names
from eval_fixtures import save_png


def _tiff(array: np.ndarray, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint16)).save(path, "TIFF")


def test_ade847_keeps_class_ids_above_255_and_ignores_65535(tmp_path):
    root = tmp_path / "ADE20K_2021_17_01"
    (root / "images_detectron2" / "validation").mkdir(parents=True)
    Image.new("RGB", (3, 2)).save(root / "images_detectron2" / "validation" / "a.jpg")
    _tiff(np.array([[0, 300, 846], [65535, 255, 1]]), root / "annotations_detectron2" / "validation" / "a.tif")
    label = SegmentationDataset("ade847", root)[0]["label"]
    assert label.dtype == torch.int32
    assert label.tolist() == [[0, 300, 846], [65535, 255, 1]]
    assert detect_segmentation_dataset(root) == "ade847"


def test_context459_maps_value_459_to_ignore_and_rejects_stray_values(tmp_path):
    root = tmp_path / "VOC2010"
    (root / "JPEGImages").mkdir(parents=True)
    Image.new("RGB", (2, 2)).save(root / "JPEGImages" / "2008_000001.jpg")
    _tiff(np.array([[0, 458], [459, 65535]]), root / "annotations_detectron2" / "pc459_val" / "2008_000001.tif")
    assert SegmentationDataset("context459", root)[0]["label"].tolist() == [[0, 458], [65535, 65535]]
    _tiff(np.array([[0, 460], [1, 1]]), root / "annotations_detectron2" / "pc459_val" / "2008_000001.tif")
    with pytest.raises(ValueError, match=r"2008_000001.tif: label value\(s\) \[460\] are not class ids 0\.\.458"):
        SegmentationDataset("context459", root)[0]


def test_eight_bit_png_where_a_16_bit_tiff_is_expected_is_named(tmp_path):
    root = tmp_path / "ADE20K_2021_17_01"
    (root / "images_detectron2" / "validation").mkdir(parents=True)
    Image.new("RGB", (2, 2)).save(root / "images_detectron2" / "validation" / "a.jpg")
    save_png(np.zeros((2, 2), np.uint8), root / "annotations_detectron2" / "validation" / "a.png")
    (root / "annotations_detectron2" / "validation" / "a.png").rename(
        root / "annotations_detectron2" / "validation" / "a.tif")
    with pytest.raises(ValueError, match="a.tif: label image has mode L, expected a 16-bit"):
        SegmentationDataset("ade847", root)[0]


def test_bundled_class_lists_have_the_benchmark_sizes():
    assert len(load_class_names("ade847")) == 847
    assert len(load_class_names("context459")) == 459
    assert load_class_names("ade847")[1] == ["building", "edifice"]
    assert len(load_class_names("voc20b")) == 59


def test_coco_stuff_training_split_and_datasets_without_one(tmp_path):
    root = tmp_path / "coco_stuff164k"
    for split in ("train2017", "val2017"):
        (root / "images" / split).mkdir(parents=True)
        Image.new("RGB", (2, 2)).save(root / "images" / split / f"{split}.jpg")
        save_png(np.zeros((2, 2), np.uint8), root / "annotations" / split / f"{split}_labelTrainIds.png")
    assert SegmentationDataset("coco-stuff", root, train=True).samples[0][0].name == "train2017.jpg"
    assert SegmentationDataset("coco-stuff", root).samples[0][0].name == "val2017.jpg"
    with pytest.raises(ValueError, match=r"ADE20K-847 has no training split here; datasets with one: \['coco-stuff'"):
        SegmentationDataset("ade847", tmp_path, train=True)
