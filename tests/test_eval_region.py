"""COCO-panoptic region classification: id decoding, boxes and patch coverage, pooling, the oracle."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import denserc
from denserc.eval import DatasetLayoutError, PanopticRegions, decode_panoptic_png, evaluate_regions
from denserc.eval.text import load_class_names, load_templates
from denserc.models import pool_boxes, pool_masks
from denserc.eval import region
from helpers import TINY
from eval_fixtures import (grey_image, grey_levels, ids_to_rgb, make_oracle, run_as_two_ranks, save_png,
                           shifted, tiny_model, write_panoptic, write_templates)


def test_panoptic_png_ids_are_r_plus_256g_plus_65536b(tmp_path):
    ids = np.array([[0, 1, 255], [256, 7 + 256 * 2 + 65536 * 3, 2 ** 24 - 1]])
    path = tmp_path / "seg.png"
    save_png(ids_to_rgb(ids), path)
    rgb = np.array(Image.open(path))
    assert rgb[1, 1].tolist() == [7, 2, 3]
    assert np.array_equal(decode_panoptic_png(path), ids)
    save_png(np.zeros((2, 2), np.uint8), path)
    with pytest.raises(ValueError, match=rf"{path}: panoptic PNG has mode L, expected RGB"):
        decode_panoptic_png(path)


def _geometry_fixture(root):
    """One 40x80 image: segment 1 = rows 0..8 x cols 0..24, segment 2 = rows 8..20 x cols 0..10,
    segment 3 = a 4x4 speck (box area 16 < 64: skipped), segment 4 = the rest (stuff)."""
    ids = np.full((40, 80), 4)
    ids[0:8, 0:24] = 1
    ids[8:20, 0:10] = 2
    ids[30:34, 60:64] = 3
    image = np.full((40, 80, 3), 200, np.uint8)
    return write_panoptic(root, [(image, ids, {1: 0, 2: 16, 3: 2, 4: 132})])


def test_boxes_and_patch_coverage_follow_resize_and_pad(tmp_path):
    root = _geometry_fixture(tmp_path / "coco")
    dataset = PanopticRegions(root, image_size=160, patch_size=16)  # scale 2: 40x80 -> 80x160, pad to 160
    assert dataset.category_names[0] == "person" and len(dataset.category_names) == 133
    assert dataset.is_thing[:80].all() and not dataset.is_thing[80:].any()
    sample = dataset[0]
    assert sample["image"].shape == (3, 160, 160)
    assert (sample["image"][:, :80] == 200).all() and (sample["image"][:, 80:] == 0).all()
    assert sample["skipped"] == 1
    assert sample["labels"].tolist() == [0, 16, 132]
    assert sample["boxes"].tolist() == [[0, 0, 48, 16], [0, 16, 20, 40], [0, 0, 160, 80]]
    coverage = sample["coverage"]
    assert coverage.shape == (3, 10, 10)
    first = torch.zeros(10, 10)
    first[0, :3] = 1.0
    assert torch.equal(coverage[0], first)
    # segment 2 spans rows 16..40 x cols 0..20 of the input: full, quarter, half and eighth patches
    second = torch.zeros(10, 10)
    second[1, 0], second[1, 1], second[2, 0], second[2, 1] = 1.0, 0.25, 0.5, 0.125
    assert torch.equal(coverage[1], second)
    # kept segments tile the image except the skipped speck (input rows 60..68, cols 120..128: an
    # eighth of patches (3, 7) and (4, 7)); the padding rows 80..160 belong to no segment
    tiled = torch.ones(5, 10)
    tiled[3, 7] = tiled[4, 7] = 0.875
    assert torch.equal(coverage.sum(0)[:5], tiled) and coverage[:, 5:].sum() == 0


def test_box_and_mask_pooling_on_a_constructed_feature_map(tmp_path):
    sample = PanopticRegions(_geometry_fixture(tmp_path / "coco"), image_size=160, patch_size=16)[0]
    generator = torch.Generator().manual_seed(0)
    dense = F.normalize(torch.randn(1, 8, 10, 10, generator=generator), dim=1)
    boxes = pool_boxes(dense, [sample["boxes"]], 16)
    masks = pool_masks(dense, [sample["coverage"]])
    # an aligned box over patches (0, 0..2): RoIAlign samples exactly the three patch centres
    torch.testing.assert_close(boxes[0], F.normalize(dense[0, :, 0, :3].mean(dim=1), dim=0))
    # the irregular mask: coverage-weighted mean of its four patches
    weighted = (dense[0, :, 1, 0] + 0.25 * dense[0, :, 1, 1] + 0.5 * dense[0, :, 2, 0] + 0.125 * dense[0, :, 2, 1])
    torch.testing.assert_close(masks[1], F.normalize(weighted / 1.875, dim=0))


def _oracle_scenes(levels):
    """Two images of patch-aligned rectangles (things and stuff) painted with their class's grey."""
    first = np.zeros((128, 160), np.int64)
    first[:64, :64], first[:64, 64:], first[64:, :96], first[64:, 96:] = 1, 2, 3, 4
    first[70:74, 10:14] = 5  # a 4x4 speck of another class inside segment 3: skipped, painted like 3
    first_labels = {1: 0, 2: 2, 3: 80, 4: 132, 5: 16}
    second = np.zeros((96, 160), np.int64)
    second[:, :80], second[:, 80:] = 7, 9
    second_labels = {7: 2, 9: 80}
    scenes = []
    for ids, labels in ((first, first_labels), (second, second_labels)):
        label_map = np.zeros(ids.shape, np.uint8)
        for segment, label in labels.items():
            label_map[ids == segment] = label if label in levels else 80
        scenes.append((grey_image(label_map, levels), ids, labels))
    return scenes


def test_oracle_gets_everything_right_and_a_shuffled_oracle_nothing(tmp_path):
    levels = grey_levels([0, 2, 80, 132])  # person, car (things); banner, rug (stuff)
    root = write_panoptic(tmp_path / "coco", _oracle_scenes(levels))
    tokenizer = denserc.get_tokenizer(TINY)
    templates = write_templates(tmp_path / "templates.txt", "a photo of {article} {}.")
    names = load_class_names("coco_panoptic")
    settings = dict(templates=str(templates), image_size=160, workers=0, cache_dir=tmp_path / "cache",
                    progress=False)
    oracle = make_oracle(tiny_model(), tokenizer, names, load_templates(templates), levels, tmp_path / "cache")
    result = evaluate_regions(oracle, tokenizer, root, **settings)
    assert (result["num_images"], result["segments_skipped"]) == (2, 1)
    for key in ("boxes", "masks", "boxes_thing", "masks_thing", "masks_stuff"):
        assert result[key]["top1"] == 100.0 and result[key]["mean_top1"] == 100.0, key
    assert result["boxes"]["segments"] == 6 and result["masks_stuff"]["segments"] == 3
    shuffled = make_oracle(tiny_model(), tokenizer, names, load_templates(templates), levels,
                           tmp_path / "cache", answers=shifted(levels))
    result = evaluate_regions(shuffled, tokenizer, root, **settings)
    assert result["boxes"]["top1"] == 0.0 and result["masks"]["top1"] == 0.0


def test_sharded_region_counts_sum_to_the_one_process_result(tmp_path, monkeypatch):
    levels = grey_levels([0, 2, 80, 132])
    root = write_panoptic(tmp_path / "coco", _oracle_scenes(levels))
    tokenizer = denserc.get_tokenizer(TINY)
    templates = write_templates(tmp_path / "templates.txt", "{}")
    # wrong about rug only: the two images score differently
    model = make_oracle(tiny_model(), tokenizer, load_class_names("coco_panoptic"), load_templates(templates),
                        levels, tmp_path / "cache", answers={132: 80})
    settings = dict(templates=str(templates), image_size=160, workers=0, cache_dir=tmp_path / "cache",
                    progress=False)
    single = evaluate_regions(model, tokenizer, root, **settings)
    assert 0 < single["boxes"]["top1"] < 100 and single["segments_skipped"] == 1
    sharded = run_as_two_ranks(monkeypatch, region, lambda shard: evaluate_regions(
        model, tokenizer, root, shard=shard, **settings))
    assert sharded == single


def test_missing_files_stop_the_evaluation_before_any_image(tmp_path, monkeypatch):
    """Three images; the last one's PNG and the second one's image are gone: the run stops up front, naming the
    first missing file and counting the rest, unless ``limit`` leaves those images out."""
    ids = np.full((32, 32), 1)
    root = write_panoptic(tmp_path / "coco", [(np.full((32, 32, 3), 100 * i, np.uint8), ids, {1: 0}) for i in range(3)])
    (root / "val2017" / "000000000140.jpg").unlink()
    (root / "annotations" / "panoptic_val2017" / "000000000141.png").unlink()
    model, tokenizer = tiny_model(), denserc.get_tokenizer(TINY)
    monkeypatch.setattr(region, "build_text_classifier", lambda *args, **kwargs: pytest.fail("text encoded first"))
    with pytest.raises(DatasetLayoutError, match=rf"{root / 'val2017' / '000000000140.jpg'} does not exist "
                                                 r"\(and 1 more file\(s\) listed in .*panoptic_val2017\.json\)"):
        evaluate_regions(model, tokenizer, root, image_size=32, workers=0, progress=False)
    monkeypatch.undo()
    templates = write_templates(tmp_path / "templates.txt", "{}")
    result = evaluate_regions(model, tokenizer, root, templates=str(templates), image_size=32, workers=0,
                              progress=False, limit=1)
    assert result["num_images"] == 1


def test_class_names_must_match_the_categories(tmp_path):
    root = _geometry_fixture(tmp_path / "coco")
    model, tokenizer = tiny_model(), denserc.get_tokenizer(TINY)
    templates = write_templates(tmp_path / "templates.txt", "{}")
    with pytest.raises(ValueError, match="has 133 categories but the class-name list 'ade20k' has 150; .*"
                                         "--class-names dataset"):
        evaluate_regions(model, tokenizer, root, class_names="ade20k", templates=str(templates), workers=0)
    result = evaluate_regions(model, tokenizer, root, class_names="dataset", templates=str(templates),
                              image_size=160, workers=0, progress=False)
    assert result["per_class"][16]["name"] == "dog" and result["boxes"]["segments"] == 3


def test_missing_or_malformed_panoptic_data_is_named(tmp_path):
    with pytest.raises(DatasetLayoutError, match=rf"{tmp_path / 'annotations' / 'panoptic_val2017.json'} does not "
                                                 r"exist(.|\n)*segment id = R \+ 256 G \+ 256\^2 B"):
        PanopticRegions(tmp_path, image_size=160, patch_size=16)
    root = _geometry_fixture(tmp_path / "coco")
    json_path = root / "annotations" / "panoptic_val2017.json"
    content = json.loads(json_path.read_text())
    json_path.write_text(json.dumps({k: v for k, v in content.items() if k != "categories"}))
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['categories'\]"):
        PanopticRegions(root, image_size=160, patch_size=16)
    content["annotations"][0]["segments_info"].append({"id": 99, "category_id": 1})
    json_path.write_text(json.dumps(content))
    png = root / "annotations" / "panoptic_val2017" / "000000000139.png"
    with pytest.raises(ValueError, match=rf"{png}: segment id 99 listed in .* has no pixels"):
        PanopticRegions(root, image_size=160, patch_size=16)[0]
    png.unlink()
    with pytest.raises(DatasetLayoutError, match=rf"{png} does not exist"):
        PanopticRegions(root, image_size=160, patch_size=16)[0]
    with pytest.raises(ValueError, match="image_size 150 must be a multiple of the patch size 16"):
        PanopticRegions(root, image_size=150, patch_size=16)
