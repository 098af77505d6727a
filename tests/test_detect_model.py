"""F-ViT parts: pyramid shapes and strides, anchors, the CLIP ensemble, and novel classes kept out of training."""
import math

import pytest
import torch

import denserc
from denserc.detect.model import (DetectorConfig, FViT, FViTHeads, StridedAnchorGenerator, classification_loss,
                                  ensemble_scores)
from denserc.models import PEER_PATHS
from torchvision.models.detection.image_list import ImageList

from helpers import TINY, randomize_

NOVEL = torch.tensor([False, True, False, True])


def _heads(tower, **settings):
    config = DetectorConfig(taps=[0, 1, 2, 3], fpn_channels=32, head_fc=48, rpn_pre_nms=300, rpn_post_nms=100,
                            roi_samples=64, **settings)
    torch.manual_seed(0)
    embeddings = torch.randn(len(NOVEL), tower.embed_dim)
    return FViTHeads(config, tower.width, tower.patch_size, embeddings, torch.randn(tower.embed_dim), NOVEL)


def _targets():
    return [{"boxes": torch.tensor([[8.0, 10, 60, 70], [50, 40, 120, 100]]), "labels": torch.tensor([0, 2])},
            {"boxes": torch.tensor([[20.0, 20, 90, 60]]), "labels": torch.tensor([2])}]


def test_pyramid_levels_have_strides_4_8_16_32_64_for_a_patch_16_tower(tiny_model):
    heads = _heads(tiny_model)
    images = torch.randn(2, 3, 128, 192)
    _, maps = tiny_model.encode_dense_with_taps(images, heads.config.taps)
    features = heads.features(maps)
    assert list(features) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape) for f in features.values()] == [(2, 32, 128 // s, 192 // s) for s in (4, 8, 16, 32, 64)]
    assert heads.strides == [4, 8, 16, 32, 64]


def test_anchors_sit_on_exact_fractional_strides_with_side_scale_times_stride():
    generator = StridedAnchorGenerator([3.5, 7.0], scale=8.0, ratios=[1.0])
    maps = [torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)]
    anchors = generator(ImageList(torch.zeros(1, 3, 14, 14), [(14, 14)]), maps)[0]
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    sides = anchors[:, 2] - anchors[:, 0]
    torch.testing.assert_close(centres[:16, 0], torch.tensor([0.0, 3.5, 7.0, 10.5] * 4))
    assert sides[:16].tolist() == [28.0] * 16 and sides[16:].tolist() == [56.0] * 4


def test_ensemble_matches_hand_computed_geometric_means():
    det = torch.tensor([[0.5, 0.2, 0.3]])
    clip = torch.tensor([[0.1, 0.6, 0.3]])
    novel = torch.tensor([False, True, False])
    out = ensemble_scores(det, clip, novel, alpha=0.1, beta=0.8)
    expected = [0.5 ** 0.9 * 0.1 ** 0.1, 0.2 ** 0.2 * 0.6 ** 0.8, 0.3 ** 0.9 * 0.3 ** 0.1]
    assert out[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[1] == pytest.approx(math.exp(0.2 * math.log(0.2) + 0.8 * math.log(0.6)))


def test_novel_classes_never_reach_the_training_loss(tiny_model):
    heads = _heads(tiny_model).train()
    embeddings = heads.classifier.class_embeddings.clone().requires_grad_(True)
    heads.classifier.class_embeddings = embeddings
    _, maps = tiny_model.encode_dense_with_taps(torch.randn(2, 3, 128, 128), heads.config.taps)
    torch.manual_seed(1)
    losses = heads(maps, [(128, 128), (128, 128)], _targets())
    assert set(losses) == {"loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    losses["loss"].backward()
    grad = embeddings.grad
    assert torch.all(grad[NOVEL] == 0)
    assert torch.all(grad[~NOVEL].abs().sum(1) > 0)


def test_loss_is_unchanged_by_novel_embeddings_and_weights_background(tiny_model):
    logits = torch.randn(6, 5)
    labels = torch.tensor([0, 1, 3, 0, 1, 3])
    weight = torch.tensor([0.6, 1.0, 0.0, 1.0, 0.0])  # background, base, novel, base, novel
    changed = logits.clone()
    changed[:, [2, 4]] += 5.0
    loss = classification_loss(logits, labels, weight)
    assert loss == classification_loss(changed, labels, weight)
    kept = logits[:, [0, 1, 3]]
    by_hand = torch.nn.functional.cross_entropy(kept, torch.tensor([0, 1, 2, 0, 1, 2]), reduction="none")
    assert loss.item() == pytest.approx(((by_hand * torch.tensor([0.6, 1, 1, 0.6, 1, 1])).sum() / 6).item())
    with pytest.raises(ValueError, match=r"zero-weight \(novel\) classes \[2\]"):
        classification_loss(logits, torch.tensor([2, 1]), weight)


def test_detector_outputs_and_mask_head(tiny_model):
    tower = randomize_(denserc.create_model(TINY)).eval()
    detector = FViT(tower, _heads(tower, masks=True, score_threshold=0.0)).eval()
    with torch.no_grad():
        out = detector(torch.randn(2, 3, 128, 128), [(128, 128), (96, 128)])
    assert len(out) == 2
    for result, (height, width) in zip(out, [(128, 128), (96, 128)]):
        boxes = result["boxes"]
        assert 0 < len(boxes) <= 100 and result["mask_probs"].shape == (len(boxes), 1, 28, 28)
        assert boxes[:, 2].max() <= width and boxes[:, 3].max() <= height and boxes.min() >= 0
        assert result["labels"].max() < len(NOVEL)
    detector.heads.train()
    targets = [{**t, "masks": torch.zeros(len(t["boxes"]), 128, 128, dtype=torch.uint8)} for t in _targets()]
    _, maps = tower.encode_dense_with_taps(torch.randn(2, 3, 128, 128), [0, 1, 2, 3])
    assert "loss_mask" in detector.heads(maps, [(128, 128)] * 2, targets)


@pytest.mark.parametrize("name", [TINY, "EVA02-Tiny-16"])
def test_taps_must_be_blocks_of_the_tower(name):
    tower = denserc.create_model(name)
    heads = _heads(tower)
    heads.config.taps = [0, 1, 2, 9]
    with pytest.raises(ValueError, match=rf"detector.taps must be block indices in 0..3 for {name} \(4 blocks\)"):
        FViT(tower, heads)


@pytest.mark.parametrize("name", ["EVA02-Tiny-16", "ViT-Tiny-16-MAP"])
def test_fvit_trains_and_detects_on_eva_and_siglip_towers(name):
    """A plain tower of each timm family, on CLIPSelf's path, through a training step and inference."""
    torch.manual_seed(0)
    tower = randomize_(denserc.create_model(name, **PEER_PATHS["F-ViT"])).eval()
    detector = FViT(tower, _heads(tower, score_threshold=0.0)).train()
    torch.manual_seed(1)
    losses = detector(torch.randn(2, 3, 128, 128), [(128, 128)] * 2, _targets())
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert all(p.grad is None for p in tower.parameters())  # frozen
    assert detector.heads.classifier.temperature.grad is not None
    with torch.no_grad():
        out = detector.eval()(torch.randn(1, 3, 128, 160), [(128, 160)])
    assert len(out[0]["boxes"]) > 0 and out[0]["labels"].max() < len(NOVEL)


def test_background_is_the_fixed_text_embedding_in_both_softmaxes(tiny_model):
    """CLIPSelf's learn_bg=False: no background parameter; the CLIP-score softmax sees the same vector."""
    heads = _heads(tiny_model)
    classifier = heads.classifier
    assert "background" not in dict(heads.named_parameters()) and "roi_heads.box_predictor.background" in heads.state_dict()
    background = torch.randn(tiny_model.embed_dim, generator=torch.Generator().manual_seed(5))
    classifier.background = torch.nn.functional.normalize(background, dim=-1)
    torch.testing.assert_close(classifier.embeddings()[0], classifier.background)
    region = background[None] * 3
    assert classifier(region).argmax(-1).item() == 0  # the background column is that exact vector


def test_rpn_convs_carry_batch_norm_in_the_lvis_configs_only(tiny_model):
    from denserc.detect.config import load_detect_config
    plain, normed = _heads(tiny_model).rpn.head.conv, _heads(tiny_model, rpn_norm=True).rpn.head.conv
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert [type(m).__name__ for m in normed[0]] == ["Conv2d", "BatchNorm2d", "ReLU"] and len(normed) == 2
    assert normed[0][0].bias is None  # mmcv's ConvModule drops the conv bias before a norm
    assert load_detect_config("fvit_b16_ovlvis").detector.rpn_norm and load_detect_config("fvit_l14_ovlvis").detector.rpn_norm
    assert not load_detect_config("fvit_b16_ovcoco").detector.rpn_norm


def test_mask_targets_are_binary_and_sampled_aligned_as_mmdets():
    from torchvision.models.detection.roi_heads import project_masks_on_boxes
    from denserc.detect.model import mask_loss, mask_targets
    gt = torch.zeros(1, 16, 16)
    gt[0, 4:12, 4:8] = 1  # the left half of the box [4, 4, 12, 12]
    box, matched = torch.tensor([[4.0, 4, 12, 12]]), torch.tensor([0])
    expected = torch.zeros(4, 4)
    expected[:, :2] = 1
    torch.testing.assert_close(mask_targets(gt, box, matched, 4)[0], expected, rtol=0, atol=0)
    soft = project_masks_on_boxes(gt, box, matched, 4)[0]  # torchvision's: half a pixel off and soft
    assert not torch.equal(soft, expected) and ((soft > 0) & (soft < 1)).any()
    logits = torch.randn(1, 1, 4, 4)
    by_hand = torch.nn.functional.binary_cross_entropy_with_logits(logits[0, 0], expected)
    assert mask_loss(logits, [box], [gt], [matched]).item() == pytest.approx(by_hand.item())


def test_a_fixed_temperature_replaces_the_learned_one_at_inference(tiny_model):
    tower = randomize_(denserc.create_model(TINY)).eval()
    images = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    heads = _heads(tower, score_threshold=0.0)
    detector = FViT(tower, heads).eval()
    with torch.no_grad():
        heads.classifier.temperature.fill_(50.0)
        learned = detector(images, [(128, 128)])[0]
        heads.classifier.temperature.fill_(3.0)
        heads.config.fixed_temperature = 50.0
        fixed = detector(images, [(128, 128)])[0]
        heads.config.fixed_temperature = None
        other = detector(images, [(128, 128)])[0]
    torch.testing.assert_close(fixed["scores"], learned["scores"])
    assert not torch.allclose(other["scores"][:5], learned["scores"][:5])
