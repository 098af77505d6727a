"""Detection data: novel boxes never train, augmentation is seeded per (seed, epoch, image), boxes follow pixels."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from denserc.detect.data import DetectionDataset, augment, letterbox
from denserc.detect.protocols import Split
from denserc_testbed import THING_CATEGORIES
from denserc_testbed.detection import ov_testbed_split

SPLIT = Split((1, 2, 3), ("cat", "dog", "cow"), (False, True, False))
MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


@pytest.fixture
def coco_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    records, annotations = [], []
    for image_id, (height, width) in enumerate([(60, 80), (50, 50), (40, 90)], start=1):
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[10:30, 20:50] = 255  # the white box of annotation 1
        Image.fromarray(pixels).save(images / f"{image_id}.png")
        records.append({"id": image_id, "file_name": f"{image_id}.png", "height": height, "width": width})
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 10, 30, 20], "area": 600, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 1},
        {"id": 4, "image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
        {"id": 5, "image_id": 3, "category_id": 9, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
    ]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": records, "annotations": annotations,
                                "categories": [{"id": i, "name": n} for i, n in [(1, "cat"), (2, "dog"), (3, "cow")]]}))
    return path, images


def test_training_set_drops_novel_crowd_and_out_of_split_boxes_and_empty_images(coco_folder):
    annotations, images = coco_folder
    train = DetectionDataset(annotations, images, SPLIT, base_only=True)
    assert len(train) == 1  # image 2 only has a novel box, image 3 only an out-of-split one
    sample = train[0]
    assert sample["labels"].tolist() == [0] and sample["boxes"].tolist() == [[20, 10, 50, 30]]
    evaluation = DetectionDataset(annotations, images, SPLIT, base_only=False)
    assert len(evaluation) == 3 and evaluation[0]["labels"].tolist() == [0, 1]


def test_images_missing_from_the_folder_are_named_before_any_sample_is_read(coco_folder):
    annotations, images = coco_folder
    (images / "2.png").unlink()
    (images / "3.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{annotations} lists {images / '2.png'} and 1 more of its 3 "
                                                rf"images, which do not exist under the image folder {images}"):
        DetectionDataset(annotations, images, SPLIT, base_only=False)
    assert len(DetectionDataset(annotations, images, SPLIT, base_only=True)) == 1  # needs image 1 only


def test_evaluation_set_keeps_the_given_images_only(coco_folder):
    annotations, images = coco_folder
    (images / "2.png").unlink()  # not among the kept images: not looked for
    kept = DetectionDataset(annotations, images, SPLIT, base_only=False, image_ids=[3, 1])
    assert [kept[k]["image_id"] for k in range(len(kept))] == [1, 3]


def test_augmentation_is_seeded_per_image_and_epoch_and_boxes_follow_the_pixels(coco_folder):
    annotations, images = coco_folder
    sample = DetectionDataset(annotations, images, SPLIT, base_only=True)[0]
    first = augment([sample], 64, MEAN, STD, "cpu", seed=0, epoch=0)
    again = augment([sample], 64, MEAN, STD, "cpu", seed=0, epoch=0)
    other = augment([sample], 64, MEAN, STD, "cpu", seed=0, epoch=1)
    torch.testing.assert_close(first.images, again.images, rtol=0, atol=0)
    assert not torch.equal(first.images, other.images)
    for _ in range(5):
        for epoch in range(6):
            batch = augment([sample], 64, MEAN, STD, "cpu", seed=3, epoch=epoch, scale_range=(0.8, 2.0))
            image, (height, width) = batch.images[0], batch.image_sizes[0]
            assert image[:, height:].abs().sum() == 0 and image[:, :, width:].abs().sum() == 0  # padding
            for x1, y1, x2, y2 in batch.targets[0]["boxes"].tolist():  # inside a box: white pixels
                cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
                assert image[0, cy, cx] > 0.9


def test_letterbox_keeps_ratio_and_reports_scale(coco_folder):
    annotations, images = coco_folder
    sample = DetectionDataset(annotations, images, SPLIT, base_only=False)[2]  # 40 x 90
    batch = letterbox([sample], 45, MEAN, STD, "cpu")
    assert batch.image_sizes == [(20, 45)] and batch.scales == [0.5] and batch.original_sizes == [(40, 90)]
    assert batch.images.shape == (1, 3, 45, 45)


def test_testbed_split_is_36_base_12_novel_with_every_pattern_and_colour_among_the_base():
    split = ov_testbed_split(THING_CATEGORIES)
    assert len(split.base_ids) == 36 and len(split.novel_ids) == 12
    base = [c for c in THING_CATEGORIES if c["id"] in split.base_ids]
    assert {c["pattern"] for c in base} == {c["pattern"] for c in THING_CATEGORIES}
    assert {c["colour"] for c in base} == {c["colour"] for c in THING_CATEGORIES}
    with pytest.raises(ValueError, match="ov-testbed expects the testbed's thing categories"):
        ov_testbed_split([{"id": 1, "name": "person"}])
