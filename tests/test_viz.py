"""denserc.segment / similarity_map on a model whose patch features are known, and the pictures drawn."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image

import denserc
from denserc.viz import draw, predict, similarity_map, text_embeddings

from helpers import TINY

CLASSES = ["dog", "grass", "sky"]
COLOUR_OF = {"dog": (230, 30, 30), "grass": (30, 200, 40), "sky": (40, 60, 230)}  # red, green, blue


def scene(width: int = 200, height: int = 120, dog=(60, 50, 140, 100)) -> tuple[Image.Image, np.ndarray]:
    """Sky over grass with a dog rectangle (x1, y1, x2, y2); returns the image and its true label map."""
    labels = np.full((height, width), CLASSES.index("grass"))
    labels[: height // 3] = CLASSES.index("sky")
    x1, y1, x2, y2 = dog
    labels[y1:y2, x1:x2] = CLASSES.index("dog")
    colours = np.array([COLOUR_OF[name] for name in CLASSES], dtype=np.uint8)
    return Image.fromarray(colours[labels]), labels


def interior(labels: np.ndarray, margin: int) -> np.ndarray:
    """Pixels at least ``margin`` pixels (Chebyshev) away from any change of label."""
    padded = torch.from_numpy(labels).float()[None, None]
    high = F.max_pool2d(padded, 2 * margin + 1, stride=1, padding=margin)
    low = -F.max_pool2d(-padded, 2 * margin + 1, stride=1, padding=margin)
    return (high == low)[0, 0].numpy()


@pytest.fixture(scope="module")
def oracle():
    """A tiny model whose patch feature is (3x) the text embedding of the class whose colour dominates
    the patch: red -> dog, green -> grass, blue -> sky. Text side: the model's own text tower."""
    model = denserc.create_model(TINY).eval()
    class_text = text_embeddings(model, CLASSES)                      # default template, as segment uses
    mean = torch.tensor(model.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.preprocess_cfg["std"]).view(1, 3, 1, 1)

    def encode_dense(images):
        colour = F.avg_pool2d(images.float() * std + mean, model.patch_size)   # (B, 3, h, w) in [0, 1]
        dominant = colour.argmax(dim=1)                                       # 0 red, 1 green, 2 blue
        return (3 * class_text[dominant]).permute(0, 3, 1, 2).to(images.dtype)

    model.encode_dense = encode_dense
    return model


def test_segment_recovers_the_known_regions_at_the_image_size(oracle):
    image, truth = scene()
    labels = denserc.segment(oracle, image, CLASSES)
    assert labels.shape == truth.shape and labels.dtype == torch.long
    labels = labels.numpy()
    inside = interior(truth, margin=6)  # one working-resolution patch is ~4.3 input pixels here
    assert (labels[inside] == truth[inside]).all()
    assert (labels == truth).mean() > 0.95


def test_segment_of_a_path_a_list_and_a_normalised_batch(oracle, tmp_path):
    first, first_truth = scene()
    second, second_truth = scene(96, 160, dog=(10, 80, 60, 150))
    first.save(tmp_path / "first.png")
    both = denserc.segment(oracle, [tmp_path / "first.png", second], CLASSES)
    assert [tuple(m.shape) for m in both] == [first_truth.shape, second_truth.shape]
    assert (both[0].numpy() == first_truth).mean() > 0.95 and (both[1].numpy() == second_truth).mean() > 0.95
    # A tensor batch is used as given (no resize): one label per input pixel of each image.
    images, truths = zip(*(scene(64, 48, dog=dog) for dog in [(0, 16, 32, 48), (32, 0, 64, 32)]))
    pixels = torch.cat([predict.to_model_input(image, oracle.preprocess_cfg, 48) for image in images])
    batch = denserc.segment(oracle, pixels, CLASSES)
    assert batch.shape == (2, 48, 64)
    for labels, truth in zip(batch.numpy(), truths):
        inside = interior(truth, margin=16)
        assert inside.any() and (labels[inside] == truth[inside]).all()


def test_heatmap_peaks_in_the_query_class_region(oracle):
    image, truth = scene()
    similarity = similarity_map(oracle, image, "dog", templates=predict.CLASS_TEMPLATES).numpy()
    assert similarity.shape == truth.shape
    peak = np.unravel_index(similarity.argmax(), similarity.shape)
    assert truth[peak] == CLASSES.index("dog")
    inside = interior(truth, margin=6)
    text = text_embeddings(oracle, CLASSES)
    for index, name in enumerate(CLASSES):  # cosine of the dog text with each region's own text embedding
        region = inside & (truth == index)
        np.testing.assert_allclose(similarity[region], float(text[0] @ text[index]), atol=1e-5)


def test_text_embeddings_average_the_normalised_template_embeddings(oracle):
    templates = ["a photo of a {}.", "a {} in the wild."]
    tokenizer = denserc.get_tokenizer(TINY)
    with torch.no_grad():
        per_prompt = F.normalize(oracle.encode_text(tokenizer(["a photo of a dog.", "a dog in the wild.",
                                                              "a photo of a sky.", "a sky in the wild."])), dim=-1)
    expected = F.normalize(per_prompt.view(2, 2, -1).mean(dim=1), dim=-1)
    torch.testing.assert_close(text_embeddings(oracle, ["dog", "sky"], templates=templates), expected)


def test_upsampling_in_class_groups_equals_upsampling_all_at_once(monkeypatch):
    scores = torch.randn(2, 5, 7, 9, generator=torch.Generator().manual_seed(0))
    whole = F.interpolate(scores, size=(30, 41), mode="bilinear", align_corners=False).argmax(dim=1)
    monkeypatch.setattr(predict, "UPSAMPLE_ELEMENTS", 2 * 30 * 41 * 2)  # two classes per group
    assert torch.equal(predict._argmax_at_size(scores, (30, 41)), whole)


def test_segment_and_heatmap_are_autocast_and_precision_safe(tmp_path):
    image, _ = scene(64, 48)
    model = denserc.create_model(TINY).eval()
    two_windows = dict(short_side=224, window=224)  # bf16 on a CPU is slow
    reference = similarity_map(model, image, "a dog", **two_windows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = similarity_map(model, image, "a dog", **two_windows)
    model.save(tmp_path)
    half = denserc.load(tmp_path, precision="bf16").eval()
    for result in (autocast, similarity_map(half, image, "a dog", **two_windows)):
        assert result.dtype == torch.float32 and result.shape == (48, 64)
        assert (result - reference).abs().max() < 0.05
    assert denserc.segment(half, image, CLASSES, **two_windows).shape == (48, 64)


def test_segment_refuses_repeated_class_names(oracle):
    with pytest.raises(ValueError, match="class names must be distinct"):
        denserc.segment(oracle, scene()[0], ["dog", "dog"])
    with pytest.raises(ValueError, match=r"every prompt template must contain '\{\}'"):
        denserc.segment(oracle, scene()[0], CLASSES, templates=["a photo"])


# ------------------------------------------------------------------------------------------ drawing
def test_segmentation_picture_has_the_image_size_and_a_legend_of_exactly_the_classes():
    image, truth = scene(320, 240, dog=(160, 120, 300, 220))
    picture, legend = draw.draw_segmentation(image, truth, CLASSES, alpha=0.5)
    assert picture.size == image.size
    assert [entry.name for entry in legend] == CLASSES
    colours = draw.palette(len(CLASSES))
    rgb = np.asarray(picture)
    for entry, colour in zip(legend, colours):
        x0, y0, x1, y1 = entry.swatch
        assert entry.colour == colour and (rgb[y0:y1 + 1, x0:x1 + 1] == colour).all()
    np.testing.assert_allclose([e.fraction for e in legend], np.bincount(truth.ravel()) / truth.size)
    # away from the legend and the outlines: half image, half class colour
    y, x = 200, 60
    expected = np.round(0.5 * np.asarray(image)[y, x] + 0.5 * np.asarray(colours[truth[y, x]]))
    assert (rgb[y, x] == expected).all()
    assert (rgb[240 // 3, 10] == draw.BOUNDARY_FILL).all()  # the sky/grass edge is outlined


def test_legend_lists_classes_with_no_pixels_and_warns_when_the_image_is_too_small():
    image, truth = scene(200, 120)
    picture, legend = draw.draw_segmentation(image, truth, CLASSES + ["umbrella"])
    assert [e.name for e in legend] == CLASSES + ["umbrella"] and legend[-1].fraction == 0.0
    tiny = image.resize((24, 16))
    with pytest.warns(UserWarning, match=r"too small for a readable legend of 12 classes"):
        picture, legend = draw.draw_segmentation(tiny, np.zeros((16, 24), int), [f"c{i}" for i in range(12)])
    assert picture.size == (24, 16) and len(legend) == 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        draw.draw_segmentation(image, truth, CLASSES)  # a normal image: no warning


def test_palette_colours_are_distinct_for_many_classes():
    colours = draw.palette(150)
    assert len(set(colours)) == 150
    tab20 = colormaps["tab20"].colors  # up to 20 classes: matplotlib's strong tab20 tones, then the light ones
    assert draw.palette(12)[:3] == [tuple(round(255 * c) for c in tab20[i]) for i in (0, 2, 4)]
    assert draw.palette(12)[10] == tuple(round(255 * c) for c in tab20[1])


def test_heatmap_picture_colour_bar_and_blend():
    image = Image.new("RGB", (300, 200), (100, 100, 100))
    similarity = np.tile(np.linspace(-0.2, 0.3, 300), (200, 1))   # rises from left to right
    picture, bar = draw.draw_heatmap(image, similarity, caption="a dog", alpha=0.5)
    assert picture.size == image.size
    assert (bar.vmin, bar.vmax) == pytest.approx((-0.2, 0.3))
    rgb = np.asarray(picture)
    x0, y0, x1, y1 = bar.bar
    colour_map = draw.heat_colours(np.linspace(0.0, 1.0, 256)).astype(int)  # the map's 256 colours, low to high
    rows = rgb[y0:y1 + 1, x0:x1 + 1].astype(int)
    assert (rows == rows[:, :1]).all()  # each row of the gradient is one colour
    positions = [int(np.abs(colour_map - row[0]).sum(axis=1).argmin()) for row in rows]
    assert positions == sorted(positions, reverse=True)  # vmax at the top, falling to vmin at the bottom
    assert positions[0] >= 250 and positions[-1] <= 5
    middle = 150  # similarity 0.05 = the middle of the range, left of the colour bar, below the caption
    expected = np.round(0.5 * 100 + 0.5 * draw.heat_colours(np.array((similarity[120, middle] + 0.2) / 0.5)))
    assert (rgb[120, middle] == expected).all()
    fixed, fixed_bar = draw.draw_heatmap(image, similarity, caption="a dog", vmin=0.0, vmax=0.1)
    assert (fixed_bar.vmin, fixed_bar.vmax) == (0.0, 0.1)
    assert (np.asarray(fixed)[120, 20] == np.round(50 + 0.5 * draw.heat_colours(np.array(0.0)))).all()
    with pytest.raises(ValueError, match="vmax must not be below vmin"):
        draw.draw_heatmap(image, similarity, caption="a dog", vmin=0.2, vmax=0.1)


def test_png_metadata_round_trip(tmp_path):
    draw.save_png(Image.new("RGB", (5, 4)), tmp_path / "x.png", {"classes": CLASSES})
    assert draw.read_png_metadata(tmp_path / "x.png") == {"classes": CLASSES}
    Image.new("RGB", (5, 4)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="plain.png has no 'denserc' metadata"):
        draw.read_png_metadata(tmp_path / "plain.png")
