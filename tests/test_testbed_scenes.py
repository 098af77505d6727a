"""The testbed's scene generator: deterministic per seed, exact annotations, real COCO/panoptic files."""
import colorsys
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from denserc.eval.panoptic import panoptic_ids_to_rgb, panoptic_rgb_to_ids
from denserc_testbed.coco import crop_caption, write_split
from denserc_testbed.scenes import SceneConfig, Segment, render_scene, scene_caption, scene_rng
from denserc_testbed.vocabulary import CATEGORIES, CATEGORY_BY_ID, COLOURS, STUFF_ID, THING_ID

SEEDS = [(0, i) for i in range(12)]


def scenes():
    return [render_scene(scene_rng(seed, index)) for seed, index in SEEDS]


def test_scene_is_a_function_of_its_seed():
    first, again, other = (render_scene(scene_rng(*key)) for key in [(3, 5), (3, 5), (3, 6)])
    assert np.array_equal(first.image, again.image)
    assert [(s.id, s.category_id) for s in first.segments] == [(s.id, s.category_id) for s in again.segments]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(first.segments, again.segments))
    assert not np.array_equal(first.image, other.image)


def test_segments_partition_the_image_and_agree_with_boxes_and_label_map():
    for scene in scenes():
        coverage = np.sum([s.mask for s in scene.segments], axis=0)
        assert (coverage == 1).all(), "every pixel must belong to exactly one segment"
        assert len({s.id for s in scene.segments}) == len(scene.segments)
        labels = scene.label_map
        for segment in scene.segments:
            assert (labels[segment.mask] == segment.category_id - 1).all()
            x, y, w, h = segment.bbox
            rows, cols = np.nonzero(segment.mask)
            assert (x, y, x + w - 1, y + h - 1) == (cols.min(), rows.min(), cols.max(), rows.max())
            assert segment.area == len(rows)
        assert 1 <= len(scene.things) <= SceneConfig().max_objects
        assert 1 <= len(scene.stuff) <= SceneConfig().max_stuff


def test_objects_are_painted_in_their_class_colour():
    """The image agrees with the masks: each object's mean hue is nearest its own colour's hue."""
    hues = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in COLOURS.items()}

    def hue_distance(a, b):
        return min(abs(a - b), 1 - abs(a - b))

    checked = 0
    for scene in scenes():
        for segment in scene.things:
            mean_rgb = scene.image[segment.mask].mean(axis=0) / 255
            hue = colorsys.rgb_to_hsv(*mean_rgb)[0]
            nearest = min(hues, key=lambda name: hue_distance(hue, hues[name]))
            assert nearest == CATEGORY_BY_ID[segment.category_id]["colour"]
            checked += 1
    assert checked >= 20


def test_objects_never_hide_more_than_allowed_of_an_earlier_object():
    """With min_visible=1 no two objects may overlap, so each thing keeps its whole drawn shape:
    a circle's visible area then matches pi r^2 of its box (within the pixelation error)."""
    config = SceneConfig(min_visible=1.0, max_rotation=0.0)
    circles = 0
    for index in range(20):
        for segment in render_scene(scene_rng(9, index), config).things:
            if segment.shape == "circle":
                _, _, w, h = segment.bbox
                assert segment.area == pytest.approx(np.pi * w * h / 4, rel=0.12)
                circles += 1
    assert circles >= 3


def test_scene_caption_lists_distinct_things_then_stuff_largest_first():
    def seg(category_id, area):
        mask = np.zeros((4, 8), dtype=bool)
        mask.flat[:area] = True
        return Segment(id=category_id, category_id=category_id, mask=mask)

    segments = [seg(THING_ID[("dotted", "red")], 3), seg(THING_ID[("zigzag", "orange")], 6),
                seg(THING_ID[("dotted", "red")], 2), seg(STUFF_ID["sand"], 5), seg(STUFF_ID["grass"], 9)]
    assert scene_caption(segments) == ("a photo of an orange zigzag object and a red dotted object "
                                       "on grass and sand.")
    assert scene_caption(segments[3:]) == "a photo of grass and sand."
    assert crop_caption(THING_ID[("hatched", "blue")]) == "a photo of a blue hatched object."


def test_every_patch_of_an_object_shows_its_pattern():
    """The class is visible in every part of an object: each 8 x 8 patch wholly inside a patterned
    object holds both its dark marks and its plain colour; a solid object has no marks at all."""
    patches = {"solid": 0, "patterned": 0}
    for index in range(30):
        scene = render_scene(scene_rng(7, index))
        brightness = scene.image.astype(np.float32).max(axis=2)
        for segment in scene.things:
            category = CATEGORY_BY_ID[segment.category_id]
            values = brightness[segment.mask]
            dark = values < 0.6 * np.median(values[values >= np.percentile(values, 60)])
            if category["pattern"] == "solid":
                assert dark.mean() < 0.02
                patches["solid"] += 1
                continue
            for top in range(0, 121, 8):
                for left in range(0, 121, 8):
                    if segment.mask[top:top + 8, left:left + 8].all():
                        patch = brightness[top:top + 8, left:left + 8]
                        reference = np.median(values[values >= np.percentile(values, 60)])
                        marks = (patch < 0.6 * reference).mean()
                        assert 0.05 < marks < 0.95, (index, category["name"], top, left, marks)
                        patches["patterned"] += 1
    assert patches["solid"] >= 5 and patches["patterned"] >= 100


def test_panoptic_id_colour_encoding():
    ids = np.array([[0, 1, 256], [65536, 0x030201, 2 ** 24 - 1]])
    rgb = panoptic_ids_to_rgb(ids)
    assert rgb[1, 1].tolist() == [1, 2, 3]
    assert rgb[0, 2].tolist() == [0, 1, 0]
    assert rgb[1, 0].tolist() == [0, 0, 1]
    assert np.array_equal(panoptic_rgb_to_ids(rgb), ids)


def test_invalid_config_names_the_problem():
    with pytest.raises(ValueError, match="min_objects <= max_objects"):
        SceneConfig(min_objects=4, max_objects=2)


def test_written_split_reads_back_as_coco_and_coco_panoptic(tmp_path):
    paths = write_split(tmp_path, "val", num_images=3, seed=7, progress=False)
    expected = [render_scene(scene_rng(7, i)) for i in range(3)]
    coco = COCO(str(paths["instances"]))
    assert len(coco.getCatIds()) == 48 and coco.getImgIds() == [1, 2, 3]
    panoptic = json.loads(paths["panoptic"].read_text())
    assert sum(c["isthing"] for c in panoptic["categories"]) == 48
    assert len(panoptic["categories"]) == len(CATEGORIES)
    captions = json.loads(paths["captions"].read_text())["annotations"]
    for image_id, scene in enumerate(expected, start=1):
        info = coco.loadImgs(image_id)[0]
        image = np.asarray(Image.open(paths["images"] / info["file_name"]))
        assert np.array_equal(image, scene.image)
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(annotations) == len(scene.things)
        for ann, thing in zip(annotations, scene.things):
            assert ann["category_id"] == thing.category_id
            assert np.array_equal(coco.annToMask(ann).astype(bool), thing.mask)
            assert ann["bbox"] == mask_utils.toBbox(ann["segmentation"]).tolist() == thing.bbox
            assert ann["caption"] == crop_caption(thing.category_id)
        rgb = np.asarray(Image.open(paths["panoptic_masks"] / f"{image_id:012d}.png")).astype(np.int64)
        segment_ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 ** 2 * rgb[..., 2]
        record = panoptic["annotations"][image_id - 1]
        assert record["image_id"] == image_id
        assert (segment_ids != 0).all()
        for info_ in record["segments_info"]:
            assert (segment_ids == info_["id"]).sum() == info_["area"]
        by_id = {s["id"]: s["category_id"] for s in record["segments_info"]}
        semantic = np.asarray(Image.open(paths["semantic"] / f"{image_id:012d}.png"))
        assert np.array_equal(semantic, np.vectorize(lambda i: by_id[i] - 1)(segment_ids))
        assert captions[image_id - 1]["caption"] == scene.caption
