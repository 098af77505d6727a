"""Training data: grids, square resizing, image folder / COCO / generated sources, unreadable files."""
import json
import logging
import math
import types
from collections import Counter

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from denserc.data import (GeneratedSource, SquareResize, TrainingImages, UnreadableImageError, build_source,
                          grid_boxes, register_source, sample_grid_boxes, sample_grid_shape, source_types)
from denserc.data.datasets import SOURCES
from denserc.data.grid import clipself_grid_shapes


def data_config(**values):
    defaults = dict(type="folder", root=None, annotations=None, num_images=0, seed=0, image_size=32,
                    strict=False, options={})
    return types.SimpleNamespace(**{**defaults, **values})


def save_image(path, size=(40, 30), colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# ----------------------------------------------------------------------------------------- grids
@pytest.mark.parametrize("rows,cols,height,width", [(1, 1, 64, 64), (3, 5, 100, 70), (6, 6, 1024, 1024),
                                                    (4, 2, 333, 517)])
def test_grid_boxes_tile_the_image_exactly(rows, cols, height, width):
    boxes = grid_boxes(rows, cols, height, width).view(rows, cols, 4)
    x1, y1, x2, y2 = boxes.unbind(-1)
    assert torch.all(x2 > x1) and torch.all(y2 > y1)
    assert torch.all(x1[:, 0] == 0) and torch.all(x2[:, -1] == width)
    assert torch.all(y1[0] == 0) and torch.all(y2[-1] == height)
    assert torch.equal(x2[:, :-1], x1[:, 1:])  # neighbours share edges: no gap, no overlap
    assert torch.equal(y2[:-1], y1[1:])
    assert torch.equal(x1, x1[:1].expand_as(x1)) and torch.equal(y1, y1[:, :1].expand_as(y1))  # aligned grid
    area = ((x2 - x1) * (y2 - y1)).sum().item()
    assert area == pytest.approx(height * width, rel=1e-6)


def test_grid_boxes_cover_every_pixel_once():
    boxes = grid_boxes(3, 4, 30, 40)  # integer cells: rasterise each box
    coverage = torch.zeros(30, 40)
    for x1, y1, x2, y2 in boxes.round().long().tolist():
        coverage[y1:y2, x1:x2] += 1
    assert torch.all(coverage == 1)


def test_uniform_rule_draws_every_shape_from_one_to_max():
    generator = torch.Generator().manual_seed(0)
    shapes = {sample_grid_shape("uniform", 6, generator) for _ in range(2000)}
    assert shapes == {(m, n) for m in range(1, 7) for n in range(1, 7)}


def test_clipself_rule_draws_each_of_its_24_pairs_uniformly():
    """CLIPSelf's ``random.choice`` over its list: every pair 1/24 ((1, 1) no more likely than (6, 6))."""
    expected = {(m, n) for m in range(1, 7) for n in range(math.ceil(m / 2), min(2 * m, 6) + 1)}
    assert len(expected) == 24 and set(clipself_grid_shapes(6)) == expected
    generator = torch.Generator().manual_seed(0)
    draws = 24_000
    counts = Counter(sample_grid_shape("clipself", 6, generator) for _ in range(draws))
    assert set(counts) == expected
    # 1000 expected per pair, standard deviation ~31: 5 sigma apart from uniform; drawing rows first gives
    # (1, 1) 1/12 of the draws (2000)
    assert all(abs(count - draws / 24) < 160 for count in counts.values()), counts
    chi_square = sum((count - draws / 24) ** 2 / (draws / 24) for count in counts.values())
    assert chi_square < 50  # 23 degrees of freedom: p < 0.001 beyond ~49.7


def test_clipself_is_the_default_rule_and_keeps_at_most_max_boxes_random_cells():
    sizes = torch.tensor([[60, 60]] * 400)
    grids = sample_grid_boxes(range(400), sizes, epoch=0, seed=0)
    assert max(len(g) for g in grids) == 20  # 6 x 6 = 36 and 6 x 5 = 30 cells are cut to 20
    shapes = Counter()
    for boxes in grids:
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        shapes[(round(60 / heights[0].item()), round(60 / widths[0].item()))] += 1
        assert len(boxes.unique(dim=0)) == len(boxes)  # distinct cells
    assert all(math.ceil(m / 2) <= n <= min(2 * m, 6) for m, n in shapes)
    full = sample_grid_boxes([3], sizes[:1], epoch=0, seed=0, max_boxes=None)[0]
    kept = grids[3]
    assert all((full == box).all(1).any() for box in kept)  # a subset of the full grid
    with pytest.raises(ValueError, match="max_boxes must be at least 1 or None, got 0"):
        sample_grid_boxes([0], sizes[:1], epoch=0, seed=0, max_boxes=0)


def test_grid_rule_and_max_are_validated():
    generator = torch.Generator()
    with pytest.raises(ValueError, match="grid rule must be one of"):
        sample_grid_shape("random", 6, generator)
    with pytest.raises(ValueError, match="max_cells"):
        sample_grid_shape("uniform", 0, generator)


def test_grids_depend_on_seed_epoch_and_index_only():
    sizes = torch.tensor([[64, 64]] * 8)
    first = sample_grid_boxes(range(8), sizes, epoch=0, seed=1)
    again = sample_grid_boxes(range(8), sizes, epoch=0, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    alone = sample_grid_boxes([5], sizes[:1], epoch=0, seed=1)  # same image in another batch
    assert torch.equal(alone[0], first[5])
    other_epoch = sample_grid_boxes(range(8), sizes, epoch=1, seed=1)
    assert any(a.shape != b.shape for a, b in zip(first, other_epoch))


def test_grids_tile_the_valid_area_of_padded_images():
    boxes = sample_grid_boxes([0], torch.tensor([[24, 64]]), epoch=0, seed=0, max_boxes=None)[0]
    assert boxes[:, 2].max() == 64 and boxes[:, 3].max() == 24


# ------------------------------------------------------------------------------------ transforms
def test_stretch_resizes_to_the_square_input():
    pixels, size = SquareResize(48, aspect="stretch")(Image.new("RGB", (100, 30), (10, 20, 30)))
    assert pixels.shape == (3, 48, 48) and pixels.dtype == torch.uint8 and size == (48, 48)
    assert pixels[:, 20, 20].tolist() == [10, 20, 30]


def test_pad_is_the_default_and_keeps_the_aspect_ratio_with_black_padding():
    image = Image.new("RGB", (100, 50), (255, 255, 255))
    pixels, size = SquareResize(64)(image)
    assert size == (32, 64)
    assert pixels[:, :32].min() == 255
    assert pixels[:, 32:].flatten(1).unique(dim=1).T.tolist() == [[0, 0, 0]]
    tall, size = SquareResize(64)(Image.new("RGB", (20, 80), (255, 255, 255)))
    assert size == (64, 16) and tall[:, :, 16:].max() == 0 and tall[:, :, :16].min() == 255


def test_transform_options_are_validated():
    with pytest.raises(ValueError, match="aspect must be one of"):
        SquareResize(64, aspect="crop")


# ---------------------------------------------------------------------------------------- sources
def test_folder_source_is_recursive_and_keeps_only_images(tmp_path):
    save_image(tmp_path / "a.jpg")
    save_image(tmp_path / "nested" / "deeper" / "b.PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    source = build_source(data_config(root=str(tmp_path)))
    assert [p.name for p in source.files] == ["a.jpg", "b.PNG"]


def test_folder_source_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_source(data_config(root=str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match="no images under"):
        build_source(data_config(root=str(tmp_path)))
    with pytest.raises(ValueError, match="data.root must be set"):
        build_source(data_config(root=None))


def test_unknown_data_type_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"data.type: unknown data type 'imagenet'; known: .*folder"):
        build_source(data_config(type="imagenet"))


def test_corrupt_image_is_skipped_counted_and_logged(tmp_path, caplog):
    save_image(tmp_path / "0.png", colour=(255, 0, 0))
    (tmp_path / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    save_image(tmp_path / "2.png", colour=(0, 0, 255))
    dataset = TrainingImages(build_source(data_config(root=str(tmp_path))), SquareResize(16))
    with caplog.at_level(logging.WARNING, logger="denserc.data"):
        samples = [dataset[i] for i in range(3)]
    assert [s["skipped"] for s in samples] == [0, 1, 0]
    assert [s["valid"] for s in samples] == [True, False, True]
    assert samples[1]["image"].eq(0).all() and samples[1]["index"] == 1  # a blank placeholder, not image 2 again
    assert samples[2]["image"][:, 0, 0].tolist() == [0, 0, 255]
    assert "1.jpg" in caplog.text and "skipping unreadable image" in caplog.text
    batch = torch.utils.data.default_collate(samples)
    assert int(batch["skipped"].sum()) == 1


def test_corrupt_image_in_strict_mode_names_the_file(tmp_path):
    save_image(tmp_path / "0.png")
    (tmp_path / "1.png").write_bytes(b"\x89PNG broken")
    dataset = TrainingImages(build_source(data_config(root=str(tmp_path))), SquareResize(16), strict=True)
    assert dataset[0]["skipped"] == 0
    with pytest.raises(UnreadableImageError, match=r"1\.png.*data\.strict=false"):
        dataset[1]


def test_truncated_image_is_unreadable(tmp_path):
    path = save_image(tmp_path / "0.jpg", size=(64, 64))
    path.write_bytes(path.read_bytes()[:200])
    save_image(tmp_path / "1.jpg")
    dataset = TrainingImages(build_source(data_config(root=str(tmp_path))), SquareResize(16))
    assert dataset[0]["skipped"] == 1


def write_coco(path, names):
    images = [{"id": i + 1, "file_name": name, "width": 40, "height": 30} for i, name in enumerate(names)]
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    return path


def test_coco_source_reads_the_image_list_of_an_instances_file(tmp_path):
    root = tmp_path / "train2017"
    for name in ["000000000009.jpg", "000000000025.jpg", "unlisted.jpg"]:
        save_image(root / name)
    annotations = write_coco(tmp_path / "instances_train2017.json", ["000000000009.jpg", "000000000025.jpg"])
    source = build_source(data_config(type="coco", root=str(root), annotations=str(annotations)))
    assert [p.name for p in source.files] == ["000000000009.jpg", "000000000025.jpg"]
    everything = build_source(data_config(type="coco", root=str(root)))
    assert len(everything) == 3


def test_coco_source_handles_missing_files(tmp_path, caplog):
    root = tmp_path / "images"
    save_image(root / "a.jpg")
    annotations = write_coco(tmp_path / "instances.json", ["a.jpg", "gone.jpg"])
    with caplog.at_level(logging.WARNING, logger="denserc.data"):
        source = build_source(data_config(type="coco", root=str(root), annotations=str(annotations)))
    assert len(source) == 1 and "1 of 2 images" in caplog.text
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        build_source(data_config(type="coco", root=str(root), annotations=str(annotations), strict=True))
    with pytest.raises(FileNotFoundError, match="instances_missing.json does not exist"):
        build_source(data_config(type="coco", root=str(root), annotations=str(tmp_path / "instances_missing.json")))
    wrong_root = write_coco(tmp_path / "other.json", ["x.jpg"])
    with pytest.raises(FileNotFoundError, match="is data.root the image folder"):
        build_source(data_config(type="coco", root=str(root), annotations=str(wrong_root)))


def test_generated_images_are_reproducible_and_varied():
    source = build_source(data_config(type="generated", num_images=4, image_size=32, seed=3))
    first = [pil_to_tensor(source.open(i)) for i in range(4)]
    again = GeneratedSource(4, 32, seed=3)
    assert all(torch.equal(a, pil_to_tensor(again.open(i))) for i, a in enumerate(first))
    assert not torch.equal(first[0], first[1])
    assert source.open(0).size == (32, 32)
    with pytest.raises(ValueError, match="num_images"):
        build_source(data_config(type="generated", num_images=0))


def test_new_data_types_can_be_registered():
    name = "test-solid-colour"

    @register_source(name)
    def build(config):
        return GeneratedSource(config.options["count"], config.image_size)

    try:
        assert name in source_types()
        assert len(build_source(data_config(type=name, options={"count": 5}))) == 5
        with pytest.raises(ValueError, match="already registered"):
            register_source(name)(build)
    finally:
        SOURCES.remove(name)
    assert name not in source_types()
