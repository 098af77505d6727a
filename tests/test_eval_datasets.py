"""Each segmentation reader on a 2-image fixture in its real layout; clear errors for broken datasets."""
import numpy as np
import pytest
import torch
from PIL import Image

from denserc.eval.datasets import (DatasetLayoutError, SegmentationDataset, detect_segmentation_dataset,
                                   resize_short_side, segmentation_layout)
from eval_fixtures import save_png, write_segmentation_dataset

# The standard benchmarks this module reads (other modules, e.g. the testbed, register more).
DATASETS = ["ade20k", "cityscapes", "coco-stuff", "context59", "context60", "voc20", "voc21"]


def _fixture(name, root, layout="mmseg"):
    """Two images (40x56 landscape, 48x40 portrait) with labels 0, 5, 18 and 255 in bands."""
    rng = np.random.default_rng(0)
    labels = [np.array([0, 5, 255, 18], dtype=np.uint8)[np.arange(40) // 10][:, None].repeat(56, 1),
              np.array([18, 255, 0], dtype=np.uint8)[np.arange(48) // 16][:, None].repeat(40, 1)]
    images = [rng.integers(0, 256, (*label.shape, 3), dtype=np.uint8) for label in labels]
    return write_segmentation_dataset(name, root, labels, images, layout=layout), labels


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
    with pytest.raises(DatasetLayoutError) as error:
        SegmentationDataset("voc20", tmp_path / "voc")
    assert str(error.value).splitlines() == [
        f"PASCAL VOC-20: no complete layout under {tmp_path / 'voc'} (docs/evaluation.md):",
        f"  mmseg layout (VOCtrainval_11-May-2012.tar as released): file "
        f"{tmp_path / 'voc' / 'ImageSets/Segmentation/val.txt'} does not exist",
        f"  detectron2 layout (CAT-Seg's datasets/prepare_voc.py): folder "
        f"{tmp_path / 'voc' / 'annotations_detectron2/val'} does not exist"]
    (tmp_path / "ctx").mkdir()  # a dataset with one layout keeps that layout's message
    with pytest.raises(DatasetLayoutError, match=rf"file {tmp_path / 'ctx' / 'ImageSets/SegmentationContext/val.txt'}"
                                                 r" does not exist(.|\n)*SegmentationClassContext/<id>\.png"):
        SegmentationDataset("context60", tmp_path / "ctx")


# The datasets CAT-Seg's datasets/prepare_*.py write in the layout detectron2 reads (annotations_detectron2).
CATSEG_LAYOUTS = {"ade20k": "ade20k", "coco-stuff": "coco-stuff", "context59": "context59", "voc20": "voc20",
                  "voc21": "voc21"}


@pytest.mark.parametrize("name", CATSEG_LAYOUTS)
def test_catseg_layout_alone_is_detected_and_decoded_to_the_same_labels(name, tmp_path):
    root, labels = _fixture(name, tmp_path / name, layout="detectron2")
    assert detect_segmentation_dataset(root) == CATSEG_LAYOUTS[name]
    for prefer in ("mmseg", "detectron2"):  # the only complete layout is read whatever the preference
        dataset = SegmentationDataset(name, root, short_side=32, prefer=prefer)
        assert dataset.layout.convention == "detectron2" and len(dataset) == 2
        for index, label in enumerate(labels):
            assert dataset[index]["label"].dtype == torch.uint8
            assert np.array_equal(dataset[index]["label"].numpy(), label)


def test_voc21_background_last_is_moved_to_class_0(tmp_path):
    """CAT-Seg's annotations_detectron2_bg: classes 0..19, background 20 -> VOC-21's background 0, classes 1..20."""
    root = tmp_path / "VOC2012"
    save_png(np.array([[20, 0, 19, 255]], np.uint8), root / "annotations_detectron2_bg" / "val" / "a.png")
    (root / "JPEGImages").mkdir()
    Image.new("RGB", (4, 1)).save(root / "JPEGImages" / "a.jpg")
    assert SegmentationDataset("voc21", root)[0]["label"].tolist() == [[0, 1, 20, 255]]


def test_with_both_layouts_each_command_reads_its_own(tmp_path):
    root, labels = _fixture("context59", tmp_path / "VOC2010")
    _fixture("context59", root, layout="detectron2")
    assert SegmentationDataset("context59", root).layout.convention == "mmseg"  # eval seg (mmseg protocol)
    catseg = SegmentationDataset("context59", root, prefer="detectron2")  # catseg train|eval
    assert catseg.layout.convention == "detectron2"
    assert np.array_equal(catseg[1]["label"].numpy(), labels[1])
    with pytest.raises(ValueError, match="unknown layout convention 'catseg'; known: mmseg, detectron2"):
        SegmentationDataset("context59", root, prefer="catseg")


def test_catseg_coco_stuff_tree_with_raw_maps_is_read_through_annotations_detectron2(tmp_path):
    """A CAT-Seg COCO-Stuff tree keeps the raw stuffthingmaps (0..181 ids) in annotations/: that folder no longer
    makes the tree look like a half-converted mmseg one."""
    root, labels = _fixture("coco-stuff", tmp_path / "coco-stuff", layout="detectron2")
    for stem in ("000000000001", "000000000002"):
        save_png(np.full((4, 4), 181, np.uint8), root / "annotations" / "val2017" / f"{stem}.png")
    (root / "images" / "train2017").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "images" / "train2017" / "000000000009.jpg")
    save_png(np.full((4, 4), 170, np.uint8), root / "annotations_detectron2" / "train2017" / "000000000009.png")
    assert detect_segmentation_dataset(root) == "coco-stuff"
    assert np.array_equal(SegmentationDataset("coco-stuff", root)[0]["label"].numpy(), labels[0])
    train = SegmentationDataset("coco-stuff", root, train=True, prefer="detectron2")
    assert train[0]["label"].unique().tolist() == [170] and train.layout.convention == "detectron2"
    save_png(np.full((4, 4), 181, np.uint8), root / "annotations_detectron2" / "train2017" / "000000000009.png")
    with pytest.raises(ValueError, match=r"\[181\] are not class ids 0\.\.170 .*CAT-Seg's datasets/prepare_coco_stuff"):
        train[0]
    (root / "images" / "val2017" / "000000000002.jpg").unlink()
    with pytest.raises(DatasetLayoutError) as error:
        SegmentationDataset("coco-stuff", root, prefer="detectron2")
    assert str(error.value).splitlines()[1:] == [
        f"  detectron2 layout (CAT-Seg's datasets/prepare_coco_stuff.py): file "
        f"{root / 'images/val2017/000000000002.jpg'} does not exist",
        f"  mmseg layout (mmseg's tools/dataset_converters/coco_stuff164k.py): file "
        f"{root / 'annotations/val2017/000000000001_labelTrainIds.png'} does not exist"]


def test_ade150_is_another_name_for_ade20k():
    assert segmentation_layout("ade150") is segmentation_layout("ade20k")


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
