"""Region API: encode_regions / encode_masks against hand-computed pooling of normalised dense features."""
import math

import pytest
import torch
import torch.nn.functional as F

import denserc

from helpers import TINY, randomize_

PATCH = 16
HEIGHT, WIDTH = 160, 224  # a 10 x 14 patch grid: not square, so swapped x/y cannot pass


@pytest.fixture(scope="module")
def model():
    return randomize_(denserc.create_model(TINY), seed=3).eval()


@pytest.fixture(scope="module")
def batch():
    return torch.randn(2, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def dense(model, batch):
    """The reference the region API must pool: L2-normalised encode_dense output (B, E, h, w)."""
    with torch.no_grad():
        return F.normalize(model.encode_dense(batch), dim=1)


def bilinear(features: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """RoIAlign's bilinear sample of (E, h, w) at feature coordinates (y, x): zero beyond one cell
    outside, clamped to the border cells inside that."""
    height, width = features.shape[-2:]
    if y < -1 or y > height or x < -1 or x > width:
        return torch.zeros(features.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = min(int(y), height - 1), min(int(x), width - 1)
    y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
    y, x = min(y, height - 1.0), min(x, width - 1.0)
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * features[:, y0, x0] + (1 - ly) * lx * features[:, y0, x1]
            + ly * (1 - lx) * features[:, y1, x0] + ly * lx * features[:, y1, x1])


def manual_roi_align(features: torch.Tensor, box, patch: int) -> torch.Tensor:
    """RoIAlign, 1x1 output, aligned=True, adaptive sampling, written out: box (x1, y1, x2, y2) in input
    pixels -> feature coordinates where cell (i, j) has its centre at (i, j); average of a
    ceil(h) x ceil(w) grid of bilinear samples; then L2-normalised."""
    x1, y1, x2, y2 = (float(v) / patch - 0.5 for v in box)
    rows, cols = max(math.ceil(y2 - y1), 1), max(math.ceil(x2 - x1), 1)
    total = torch.zeros(features.shape[0])
    for iy in range(rows):
        for ix in range(cols):
            total += bilinear(features, y1 + (iy + 0.5) * (y2 - y1) / rows, x1 + (ix + 0.5) * (x2 - x1) / cols)
    return F.normalize(total / (rows * cols), dim=0)


def test_encode_regions_equals_manual_roi_align_on_normalised_dense(model, batch, dense):
    boxes = [torch.tensor([[0.0, 0.0, WIDTH, HEIGHT], [37.5, 12.25, 101.0, 90.5], [200.0, 150.0, 224.0, 160.0]]),
             torch.tensor([[5.0, 7.0, 6.0, 8.0], [0.0, 100.0, 224.0, 160.0]])]
    with torch.no_grad():
        regions = model.encode_regions(batch, boxes)
    expected = torch.stack([manual_roi_align(dense[i], box, PATCH) for i, image_boxes in enumerate(boxes)
                            for box in image_boxes])
    assert regions.shape == (5, model.embed_dim)
    torch.testing.assert_close(regions, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(regions.norm(dim=1), torch.ones(5))


def test_whole_image_box_is_the_mean_of_all_patches(model, batch, dense):
    """(0, 0, W, H) in input pixels samples exactly every patch centre once."""
    whole = torch.tensor([[0.0, 0.0, WIDTH, HEIGHT]])
    with torch.no_grad():
        regions = model.encode_regions(batch, [whole, whole])
    torch.testing.assert_close(regions, F.normalize(dense.mean(dim=(2, 3)), dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("row, col", [(0, 0), (0, 13), (9, 0), (9, 13), (4, 7)])
def test_one_patch_box_at_the_borders_is_that_patch(model, batch, dense, row, col):
    """A box covering exactly patch (row, col) as x1, y1, x2, y2 pixels returns that patch's feature,
    at every corner of the image (x runs along the width, y along the height)."""
    box = torch.tensor([[col * PATCH, row * PATCH, (col + 1) * PATCH, (row + 1) * PATCH]], dtype=torch.float32)
    with torch.no_grad():
        regions = model.encode_regions(batch, [box, box])
    torch.testing.assert_close(regions, dense[:, :, row, col], atol=1e-5, rtol=1e-5)


def test_regions_follow_image_order_and_allow_images_without_boxes(model, batch, dense):
    boxes = [torch.zeros(0, 4), torch.tensor([[0, 0, 16, 16], [208, 144, 224, 160]])]  # integer boxes too
    with torch.no_grad():
        regions = model.encode_regions(batch, boxes)
        one_by_one = model.encode_regions(batch[1:], boxes[1:])
    torch.testing.assert_close(regions, torch.stack([dense[1, :, 0, 0], dense[1, :, 9, 13]]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(regions, one_by_one, atol=1e-5, rtol=1e-5)


def test_encode_masks_weights_patches_by_covered_area(model, batch, dense):
    masks = torch.zeros(3, HEIGHT, WIDTH, dtype=torch.bool)
    masks[0, 32:48, 64:80] = True                       # patch (2, 4) exactly
    masks[1, 0:8, 0:16] = True                          # half of patch (0, 0) ...
    masks[1, 144:160, 208:224] = True                   # ... and all of patch (9, 13)
    masks[2] = True                                     # the whole image
    with torch.no_grad():
        pooled = model.encode_masks(batch, [masks[:1], masks[1:]])
    expected = torch.stack([
        dense[0, :, 2, 4],
        F.normalize(0.5 * dense[1, :, 0, 0] + dense[1, :, 9, 13], dim=0),
        F.normalize(dense[1].mean(dim=(1, 2)), dim=0),
    ])
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def test_encode_masks_accepts_float_masks_and_images_without_masks(model, batch, dense):
    mask = torch.zeros(1, HEIGHT, WIDTH)
    mask[0, 16:32, 16:32] = 1.0
    with torch.no_grad():
        pooled = model.encode_masks(batch, [torch.zeros(0, HEIGHT, WIDTH), mask])
    torch.testing.assert_close(pooled, dense[1:, :, 1, 1], atol=1e-5, rtol=1e-5)


def test_empty_mask_is_an_error(model, batch):
    masks = torch.zeros(2, HEIGHT, WIDTH, dtype=torch.bool)
    masks[0, :16, :16] = True
    with pytest.raises(ValueError, match=r"1 mask\(s\) are empty"):
        model.encode_masks(batch[:1], [masks])


def test_region_api_under_autocast_matches_fp32(model, batch):
    boxes = [torch.tensor([[0.0, 0.0, 112.0, 80.0]]), torch.tensor([[50.0, 30.0, 224.0, 160.0]])]
    masks = [torch.ones(1, HEIGHT, WIDTH, dtype=torch.bool), torch.ones(1, HEIGHT, WIDTH, dtype=torch.bool)]
    with torch.no_grad():
        regions, pooled = model.encode_regions(batch, boxes), model.encode_masks(batch, masks)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            regions_amp, pooled_amp = model.encode_regions(batch, boxes), model.encode_masks(batch, masks)
    assert F.cosine_similarity(regions_amp.float(), regions).min() > 0.99
    assert F.cosine_similarity(pooled_amp.float(), pooled).min() > 0.99


def test_one_box_or_mask_list_per_image_is_required(model, batch):
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0]])] * 3
    with pytest.raises(ValueError, match=r"one box tensor per image \(2 images\), got 3"):
        model.encode_regions(batch, boxes)
    with pytest.raises(ValueError, match=r"one mask tensor per image \(2 images\), got 1"):
        model.encode_masks(batch, [torch.ones(1, HEIGHT, WIDTH)])


def test_region_api_with_bf16_weights(model, batch):
    """torchvision has no bfloat16 RoIAlign on the CPU: pooling runs in float32 and casts back."""
    bf16 = denserc.models.from_spec(TINY, precision="bf16").eval()
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    boxes = [torch.tensor([[0.0, 0.0, 112.0, 80.0]]), torch.tensor([[50.0, 30.0, 224.0, 160.0]])]
    with torch.no_grad():
        regions = bf16.encode_regions(batch.to(torch.bfloat16), boxes)
        reference = model.encode_regions(batch, boxes)
    assert regions.dtype == torch.bfloat16
    assert F.cosine_similarity(regions.float(), reference).min() > 0.98
