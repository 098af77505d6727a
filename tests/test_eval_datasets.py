"""Each segmentation reader on a 2-image fixture in its real layout; clear errors for broken datasets."""
import numpy as np
import pytest
import torch
from PIL import Image

from denserc.eval.datasets import (DatasetLayoutError, SegmentationDataset,
                                   detect_segmentation_dataset, resize_short_side)
from eval_fixtures import save_png, write_segmentation_dataset

# The standard benchmarks this module reads (other modules, e.g. the testbed, register more).
DATASETS = ["ade20k", "cityscapes", "coco-stuff", "context59", "context60", "voc20", "voc21"]


def _fixture(name, root):
    """Two images (40x56 landscape, 48x40 portrait) with labels 0, 5, 18 and 255 in bands."""
    rng = np.random.default_rng(0)
    labels = [np.array([0, 5, 255, 18], dtype=np.uint8)[np.arange(40) // 10][:, None].repeat(56, 1),
              np.array([18, 255, 0], dtype=np.uint8)[np.arange(48) // 16][:, None].repeat(40, 1)]
    images = [rng.integers(0, 256, (*label.shape, 3), dtype=np.uint8) for label in labels]
    return write_segmentation_dataset(name, root, labels, images), labels


@pytest.mark.parametrize("name", DATASETS)
def test_reader_decodes_labels_and_resizes_images(name, tmp_path):
    root, labels = _fixture(name, tmp_path / name)
    dataset = SegmentationDataset(name, root, short_side=32)
    assert len(dataset) == 2
    first, second = dataset[0], dataset[1]
    for sample, label in ((first, labels[0]), (second, labels[1])):
        assert sample["label"].dtype == torch.uint8
        assert np.array_equal(sample["label"].numpy(), label)
        assert sample["image"].dtype == torch.uint8 and sample["image"].shape[0] == 3
    # short side 40 -> 32 (scale 0.8): 56 -> round(44.8) = 45; portrait 40 -> 32, 48 -> 38
    assert first["image"].shape[1:] == (32, 45)
    assert second["image"].shape[1:] == (38, 32)
    assert SegmentationDataset(name, root)[0]["image"].shape[1:] == (40, 56)


def test_stored_labels_are_decoded_per_dataset_convention(tmp_path):
    """ADE20K stores 0 = unlabelled, k = class k-1; VOC-21 keeps 0 = background and 255 boundaries."""
    root = tmp_path / "ade"
    (root / "images" / "validation").mkdir(parents=True)
    Image.new("RGB", (4, 2)).save(root / "images" / "validation" / "a.jpg")
    save_png(np.array([[0, 1, 150, 0], [2, 2, 2, 2]], np.uint8), root / "annotations" / "validation" / "a.png")
    label = SegmentationDataset("ade20k", root)[0]["label"]
    assert label.tolist() == [[255, 0, 149, 255], [1, 1, 1, 1]]


@pytest.mark.parametrize("name, expected", [("ade20k", "ade20k"), ("coco-stuff", "coco-stuff"),
                                            ("cityscapes", "cityscapes")])
def test_dataset_is_detected_from_its_layout(name, expected, tmp_path):
    root, _ = _fixture(name, tmp_path / name)
    assert detect_segmentation_dataset(root) == expected


@pytest.mark.parametrize("name, message", [("voc21", "voc20 and voc21"), ("context60", "context59 and context60")])
def test_ambiguous_layout_asks_for_the_dataset(name, message, tmp_path):
    root, _ = _fixture(name, tmp_path / name)
    with pytest.raises(ValueError, match=f"{message}: choose one with --dataset"):
        detect_segmentation_dataset(root)


def test_unknown_layout_lists_the_expected_ones(tmp_path):
    with pytest.raises(DatasetLayoutError, match=rf"{tmp_path} has none of the known segmentation layouts"
                                                 r"(.|\n)*ADEChallengeData2016/(.|\n)*gtFine/val"):
        detect_segmentation_dataset(tmp_path)


def test_missing_dataset_names_the_path_and_the_layout(tmp_path):
    with pytest.raises(DatasetLayoutError, match=rf"ADE20K-150: {tmp_path / 'nowhere'} does not exist\. "
                                                 r"Expected layout(.|\n)*annotations/validation/<name>\.png"):
        SegmentationDataset("ade20k", tmp_path / "nowhere")
    (tmp_path / "voc").mkdir()
    with pytest.raises(DatasetLayoutError, match=rf"file {tmp_path / 'voc' / 'ImageSets/Segmentation/val.txt'} "
                                                 r"does not exist(.|\n)*SegmentationClass/<id>\.png"):
        SegmentationDataset("voc20", tmp_path / "voc")


def test_missing_label_file_is_named(tmp_path):
    root, _ = _fixture("cityscapes", tmp_path / "city")
    label = root / "gtFine/val/frankfurt/frankfurt_000000_000001_gtFine_labelTrainIds.png"
    label.unlink()
    with pytest.raises(DatasetLayoutError, match=rf"Cityscapes-19: file {label} does not exist"):
        SegmentationDataset("cityscapes", root)


def test_split_listing_a_missing_image_is_named(tmp_path):
    root, _ = _fixture("context59", tmp_path / "context")
    with open(root / "ImageSets/SegmentationContext/val.txt", "a") as f:
        f.write("2008_999999\n")
    with pytest.raises(DatasetLayoutError, match=rf"file {root / 'JPEGImages' / '2008_999999.jpg'} does not exist"):
        SegmentationDataset("context59", root)


def test_malformed_labels_are_rejected_with_the_file(tmp_path):
    root, _ = _fixture("coco-stuff", tmp_path / "stuff")
    label = root / "annotations/val2017/000000000001_labelTrainIds.png"
    save_png(np.full((40, 56), 200, np.uint8), label)
    with pytest.raises(ValueError, match=rf"{label}: label value\(s\) \[200\] are not class ids 0\.\.170"):
        SegmentationDataset("coco-stuff", root)[0]
    save_png(np.zeros((40, 56, 3), np.uint8), label)
    with pytest.raises(ValueError, match=rf"{label}: label PNG has mode RGB, expected a single-channel"):
        SegmentationDataset("coco-stuff", root)[0]
    save_png(np.zeros((10, 10), np.uint8), label)
    with pytest.raises(ValueError, match=rf"{label}: label size \(10, 10\) differs from image"):
        SegmentationDataset("coco-stuff", root)[0]


def test_resize_caps_the_long_side():
    image = torch.zeros(3, 10, 100, dtype=torch.uint8)
    # short side 10 -> 336 would make the long side 3360 > 2048: the long side wins
    assert resize_short_side(image, 336, 2048).shape == (3, 205, 2048)
