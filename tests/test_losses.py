"""L_semantics, L_coherence and their total on cases computed by hand."""
import math

import pytest
import torch

from denserc.losses import DEFAULT_COHERENCE_WEIGHT, coherence_loss, distillation_loss, semantics_loss

PATCH = 16


def constant_dense(vector, height=4, width=4):
    """(1, E, h, w) features equal to ``vector`` at every patch."""
    return torch.tensor(vector, dtype=torch.float32).view(1, -1, 1, 1).expand(1, -1, height, width).clone()


def test_semantics_identical_features_give_zero():
    dense = constant_dense([3.0, -1.0, 2.0])
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [16.0, 16.0, 64.0, 48.0]])]
    teacher = torch.tensor([[3.0, -1.0, 2.0], [6.0, -2.0, 4.0]])  # scale must not matter
    assert semantics_loss(dense, boxes, teacher, PATCH).item() == pytest.approx(0.0, abs=1e-6)


def test_semantics_is_one_minus_known_cosine():
    dense = constant_dense([1.0, 0.0])
    boxes = [torch.tensor([[0.0, 0.0, 64.0, 64.0], [0.0, 0.0, 16.0, 16.0]])]
    teacher = torch.tensor([[1.0, 1.0], [0.0, 2.0]])  # cos 45 deg and cos 90 deg
    expected = ((1 - 1 / math.sqrt(2)) + (1 - 0)) / 2
    assert semantics_loss(dense, boxes, teacher, PATCH).item() == pytest.approx(expected, abs=1e-6)


def test_semantics_pools_normalised_features_inside_the_box():
    """Left half (2 patch columns) points along x, right half along y: a box on the left sees only x."""
    dense = torch.zeros(1, 2, 4, 4)
    dense[0, 0, :, :2] = 5.0
    dense[0, 1, :, 2:] = 0.5  # much shorter vectors: pooling must normalise before averaging
    left = [torch.tensor([[0.0, 0.0, 32.0, 64.0]])]
    whole = [torch.tensor([[0.0, 0.0, 64.0, 64.0]])]
    assert semantics_loss(dense, left, torch.tensor([[1.0, 0.0]]), PATCH).item() == pytest.approx(0.0, abs=1e-6)
    # normalised halves average to (0.5, 0.5): cos with (1, 1) is 1
    assert semantics_loss(dense, whole, torch.tensor([[1.0, 1.0]]), PATCH).item() == pytest.approx(0.0, abs=1e-6)


def test_semantics_rejects_mismatched_counts():
    with pytest.raises(ValueError, match="teacher embeddings"):
        semantics_loss(constant_dense([1.0, 0.0]), [torch.tensor([[0.0, 0.0, 16.0, 16.0]])],
                       torch.ones(2, 2), PATCH)


def test_coherence_identical_correlations_give_zero():
    patches = torch.randn(2, 9, 5)
    rotation = torch.linalg.qr(torch.randn(5, 5))[0]
    # a rotation (and per-patch scaling) leaves the normalised correlation matrix unchanged
    other = (patches @ rotation) * torch.rand(2, 9, 1).add(0.5)
    assert coherence_loss(patches, other).item() == pytest.approx(0.0, abs=1e-6)


def test_coherence_hand_computed_mse():
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # F F^T = I
    vfm = torch.tensor([[[2.0, 0.0, 0.0], [3.0, 0.0, 0.0]]])  # G G^T = all ones
    # (I - 1)^2 has two off-diagonal ones out of four entries
    assert coherence_loss(student, vfm, "mse").item() == pytest.approx(0.5)


def test_coherence_default_is_declips_mean_row_norm_hand_computed():
    """DeCLIP's ``(T - S).norm(p=2, dim=-1).mean()`` (src/training/declip.py) on a 3-patch case."""
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])  # S rows: [1,0,1], [0,1,0], [1,0,1]
    vfm = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])  # T = all ones
    # T - S rows: [0,1,0], [1,0,1], [0,1,0] -> norms 1, sqrt 2, 1
    expected = (2 + math.sqrt(2)) / 3
    assert coherence_loss(student, vfm).item() == pytest.approx(expected)
    assert coherence_loss(student, vfm, "declip").item() == pytest.approx(expected)
    assert coherence_loss(student, vfm, "mse").item() == pytest.approx(4 / 9)
    with pytest.raises(ValueError, match=r"coherence form must be one of \('declip', 'mse'\), got 'l1'"):
        coherence_loss(student, vfm, "l1")


@pytest.mark.parametrize("form", ["declip", "mse"])
def test_coherence_runs_in_float32_under_bf16_autocast(form):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 64, 16, generator=generator, requires_grad=True)
    vfm = torch.randn(2, 64, 24, generator=generator)
    reference = coherence_loss(student, vfm, form)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = coherence_loss(student, vfm, form)
    assert autocast.dtype == torch.float32
    assert autocast.item() == reference.item()  # bit-identical: no bf16 matmul inside


def test_coherence_accepts_dense_maps_in_row_major_order():
    dense = torch.randn(1, 4, 2, 3)
    rows = dense.flatten(2).transpose(1, 2)
    vfm = torch.randn(1, 6, 7)
    assert coherence_loss(dense, vfm).item() == pytest.approx(coherence_loss(rows, vfm).item())
    with pytest.raises(ValueError, match="grid must equal"):
        coherence_loss(dense, torch.randn(1, 5, 7))


def test_total_is_semantics_plus_lambda_coherence_and_each_part_is_reported():
    dense = torch.randn(2, 8, 4, 4, requires_grad=True)
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 32.0]]), torch.tensor([[16.0, 0.0, 64.0, 64.0], [0, 0, 64, 64.0]])]
    teacher = torch.randn(3, 8)
    vfm = torch.randn(2, 16, 12)
    losses = distillation_loss(dense, boxes, teacher, vfm, PATCH)
    assert DEFAULT_COHERENCE_WEIGHT == 0.025
    assert losses["loss_semantics"].item() == pytest.approx(semantics_loss(dense, boxes, teacher, PATCH).item())
    assert losses["loss_coherence"].item() == pytest.approx(coherence_loss(dense, vfm, "declip").item())
    mse = distillation_loss(dense, boxes, teacher, vfm, PATCH, coherence_form="mse")
    assert mse["loss_coherence"].item() == pytest.approx(coherence_loss(dense, vfm, "mse").item())
    expected = losses["loss_semantics"] + 0.025 * losses["loss_coherence"]
    assert losses["loss"].item() == pytest.approx(expected.item())
    losses["loss"].backward()
    assert dense.grad is not None and dense.grad.abs().sum() > 0
