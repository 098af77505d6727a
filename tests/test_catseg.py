"""CAT-Seg: shapes through every stage, the cost volume by hand, class permutation equivariance, the loss,
the attention-only fine-tuning, training crops that never label a held-out class, export and evaluation."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from denserc.catseg import CATSeg, HeadConfig, class_tokens, cost_volume, fine_tuned_clip_parameters, segmentation_loss
from denserc.catseg.aggregator import (PADDED_CLASS_LOGIT, CostAggregator, GuidedSwinBlock,
                                       SpatialAggregation)
from denserc.catseg.data import TrainingCrops, training_label_map
from denserc.catseg.evaluate import SlidingWindowProtocol, evaluate_catseg, sliding_window_scores
from denserc.catseg.export import load_catseg, save_catseg
import denserc
from denserc.models import PEER_PATHS, get_tokenizer

from helpers import TINY, randomize_
from eval_fixtures import write_segmentation_dataset

EVA, SIGLIP = "EVA02-Tiny-16", "ViT-Tiny-16-MAP"
SMALL_HEAD = dict(hidden_dim=32, guidance_proj_dim=16, text_guidance_proj_dim=16, decoder_dims=[32, 16],
                  decoder_guidance_dims=[32, 16], decoder_guidance_proj_dims=[16, 8], window=7, pad_len=8,
                  intermediate_blocks=[0, 1])


def small_aggregator(pad_len=8, prompts=2, embed_dim=32, window=4):
    torch.manual_seed(0)
    return CostAggregator(embed_dim=embed_dim, prompts=prompts, hidden_dim=32, guidance_proj_dim=16,
                          text_guidance_proj_dim=16, decoder_dims=(32, 16), decoder_guidance_dims=(24, 12),
                          decoder_guidance_proj_dims=(16, 8), num_layers=2, heads=4, window=window,
                          pad_len=pad_len).eval()


def aggregator_inputs(classes=5, batch=2, size=8, prompts=2, embed_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, embed_dim, size, size, generator=g),
            torch.randn(batch, classes, prompts, embed_dim, generator=g),
            [torch.randn(batch, 24, 2 * size, 2 * size, generator=g),
             torch.randn(batch, 12, 4 * size, 4 * size, generator=g)])


def test_cost_volume_is_the_cosine_similarity_computed_by_hand():
    image, text, _ = aggregator_inputs(classes=3)
    cost = cost_volume(image, text)
    assert cost.shape == (2, 2, 3, 8, 8)  # (B, P, T, H, W)
    for b, p, t, y, x in itertools.product(range(2), range(2), range(3), (0, 5), (1, 7)):
        expected = torch.dot(image[b, :, y, x], text[b, t, p]) / (image[b, :, y, x].norm() * text[b, t, p].norm())
        torch.testing.assert_close(cost[b, p, t, y, x], expected)


def test_shapes_through_every_stage():
    aggregator = small_aggregator()
    image, text, guidance = aggregator_inputs(classes=5)
    x = torch.randn(2, 32, 5, 8, 8)  # (B, hidden, T, H, W)
    assert aggregator.spatial[0](x, aggregator.guidance_projection(image)).shape == x.shape
    text_guidance = torch.randn(2, 5, 16)
    aggregator.set_class_pooling(2)
    assert aggregator.classes[0](x, text_guidance).shape == x.shape
    stage = aggregator.decoder[0](x.transpose(1, 2).reshape(10, 32, 8, 8), torch.randn(2, 16, 16, 16), classes=5)
    assert stage.shape == (10, 32, 16, 16)
    assert aggregator(image, text, guidance).shape == (2, 5, 32, 32)


def test_swin_block_on_a_map_no_larger_than_its_window_is_one_unshifted_window():
    torch.manual_seed(0)
    shifted = GuidedSwinBlock(16, 8, heads=4, window=8, shifted=True)
    plain = GuidedSwinBlock(16, 8, heads=4, window=8, shifted=False)
    plain.load_state_dict(shifted.state_dict())
    x, guidance = torch.randn(3, 6, 6, 16), torch.randn(3, 6, 6, 8)
    torch.testing.assert_close(shifted(x, guidance), plain(x, guidance))
    with pytest.raises(ValueError, match=r"cost map \(12x10\) must be a multiple of the Swin window 4"):
        GuidedSwinBlock(16, 8, heads=4, window=4, shifted=False)(torch.randn(1, 12, 10, 16), None)


def test_plain_windows_keep_a_change_inside_its_window_and_the_shifted_block_carries_it_across():
    torch.manual_seed(0)
    plain, shifted = SpatialAggregation(16, 0, heads=4, window=4).blocks
    x = torch.randn(1, 8, 8, 16)
    changed = x.clone()
    changed[0, 3, 3] += torch.randn(16)  # not a constant shift, which the LayerNorm would remove
    with torch.no_grad():
        inside = (plain(changed, None) - plain(x, None)).abs().sum(-1)[0] > 0
        across = (shifted(changed, None) - shifted(x, None)).abs().sum(-1)[0] > 0
    assert inside[:4, :4].all() and not inside[4:].any() and not inside[:, 4:].any()
    assert across[2:6, 2:6].all() and not across[6:].any() and not across[:2].any()


@pytest.mark.parametrize("classes, pad_len", [(5, 8), (5, 0), (12, 8)])
def test_class_aggregation_is_permutation_equivariant_over_classes(classes, pad_len):
    aggregator = small_aggregator(pad_len=pad_len)
    randomize_(aggregator.classes, seed=1)  # non-zero padding tokens too
    image, text, guidance = aggregator_inputs(classes=classes)
    permutation = torch.randperm(classes, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = aggregator(image, text, guidance)
        permuted = aggregator(image, text[:, permutation], guidance)
    torch.testing.assert_close(permuted, out[:, permutation], rtol=1e-4, atol=1e-4)


def test_a_vocabulary_longer_than_pad_len_keeps_the_classes_with_the_highest_cost():
    aggregator = small_aggregator(pad_len=4)
    image, text, guidance = aggregator_inputs(classes=9, batch=1)
    with torch.no_grad():
        out = aggregator(image, text, guidance)
    best = cost_volume(image, text).permute(0, 2, 1, 3, 4).flatten(2).max(-1).values[0]
    kept = set(best.topk(4).indices.tolist())
    assert out.shape == (1, 9, 32, 32)
    for c in range(9):
        assert (out[0, c] == PADDED_CLASS_LOGIT).all() == (c not in kept)


def test_class_pooling_follows_train_and_eval_mode(tiny_model):
    segmenter = CATSeg(tiny_model, HeadConfig(**SMALL_HEAD), prompts=1, clip_resolution=224)
    assert all(layer.pooling == (2, 2) for layer in segmenter.aggregator.classes)
    segmenter.eval()
    assert all(layer.pooling == (1, 1) for layer in segmenter.aggregator.classes)


def test_segmenter_output_shape_and_decoder_guidance_from_intermediate_blocks(tiny_model):
    segmenter = CATSeg(tiny_model, HeadConfig(**SMALL_HEAD), prompts=2, clip_resolution=224).eval()
    tokenizer = get_tokenizer(TINY)
    tokens = class_tokens(tokenizer, [["cat", "kitty"], ["dog"], ["sky"]], ["a photo of {}.", "{}"])
    assert tokens.shape == (3, 2, 77)
    torch.testing.assert_close(tokens[0, 1], tokenizer(["cat"])[0])  # the first synonym names the class
    with torch.no_grad():
        embeddings = segmenter.encode_classes(tokens)
        logits = segmenter(torch.randn(2, 3, 160, 160), embeddings)  # resized to the CLIP resolution first
    assert embeddings.shape == (3, 2, 32)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3, 2))
    assert logits.shape == (2, 3, 56, 56)  # 14 x 14 patches, x4


def test_loss_is_per_class_binary_cross_entropy_with_ignored_pixels_negative_everywhere():
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 2], [255, 1]]])
    targets = torch.zeros(1, 3, 2, 2)
    targets[0, 0, 0, 0] = targets[0, 2, 0, 1] = targets[0, 1, 1, 1] = 1  # the 255 pixel: all zeros
    expected = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits)).mean()
    torch.testing.assert_close(segmentation_loss(logits, labels), expected)


def test_only_query_and_value_projections_of_both_towers_train(tiny_model):
    trained = dict(fine_tuned_clip_parameters(tiny_model))
    text_blocks, image_blocks = len(tiny_model.clip.transformer.resblocks), len(tiny_model.visual.transformer.resblocks)
    assert len(trained) == text_blocks + image_blocks
    assert all(name.endswith("attn.in_proj_weight") for name in trained)
    assert {p for p in tiny_model.parameters() if p.requires_grad} == set(trained.values())
    before = {name: p.detach().clone() for name, p in trained.items()}
    optimizer = torch.optim.AdamW(trained.values(), lr=1e-2, weight_decay=0.0)
    images, tokens = torch.randn(1, 3, 224, 224), get_tokenizer(TINY)(["a cat"])
    loss = tiny_model.encode_dense(images).square().mean() + tiny_model.encode_text(tokens).square().mean()
    loss.backward()
    optimizer.step()
    width = {name: p.shape[1] for name, p in trained.items()}
    for name, p in trained.items():
        d = width[name]
        assert torch.equal(p[d:2 * d], before[name][d:2 * d]), f"{name}: key rows changed"
    # the value rows of the image tower's last block and the text tower's query rows moved
    last = "clip.visual.transformer.resblocks.3.attn.in_proj_weight"
    text = "clip.transformer.resblocks.0.attn.in_proj_weight"
    assert not torch.equal(trained[last][128:], before[last][128:])
    assert not torch.equal(trained[text][:64], before[text][:64])


def _trained_rows(model):
    """{parameter name: rows whose gradient survives one backward of a loss touching every weight}."""
    trained = dict(fine_tuned_clip_parameters(model))
    loss = sum((p.float() ** 2).sum() for p in trained.values())
    loss.backward()
    return {name: (p.grad.abs().sum(1) > 0).nonzero().flatten().tolist() for name, p in trained.items()}


def test_eva_tunes_q_and_v_projections_and_the_whole_text_in_proj():
    """DeCLIP's CAT-Seg branch (configs/eva_vitb_384.yaml, ``frozen_backbone``) on EVA-CLIP: the image tower's
    q_proj/v_proj weights, the text tower's whole in_proj_weight."""
    torch.manual_seed(0)
    model = denserc.create_model(EVA, **PEER_PATHS["CAT-Seg"])
    rows = _trained_rows(model)
    image = sorted(n for n in rows if n.startswith("clip.visual."))
    assert image == sorted(f"clip.visual.trunk.blocks.{i}.attn.{p}_proj.weight"
                           for i in range(model.depth) for p in ("q", "v"))
    text = [n for n in rows if n.startswith("clip.text.")]
    assert len(text) == 2 and all(rows[n] == list(range(3 * 64)) for n in text)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(rows)


def test_siglip_tunes_the_query_and_value_rows_of_its_fused_projection():
    torch.manual_seed(0)
    model = denserc.create_model(SIGLIP, **PEER_PATHS["F-ViT"])
    rows = _trained_rows(model)
    image = [n for n in rows if n.startswith("clip.visual.")]
    assert len(image) == model.depth
    assert all(rows[n] == list(range(64)) + list(range(128, 192)) for n in image)


def test_a_tower_without_query_or_value_weights_is_refused(tiny_model, monkeypatch):
    monkeypatch.setattr(type(tiny_model.tower), "query_value_weights", lambda self: [])
    with pytest.raises(ValueError, match="fine-tunes the image tower's query and value projections, and "
                                         "ViT-Tiny-16 \\(open_clip ViT\\) has none"):
        fine_tuned_clip_parameters(tiny_model)


def test_segmenter_trains_on_a_plain_eva_clip():
    torch.manual_seed(0)
    clip = denserc.create_model(EVA, **PEER_PATHS["CAT-Seg"])
    segmenter = CATSeg(clip, HeadConfig(**SMALL_HEAD), prompts=1, clip_resolution=224)
    trained = dict(fine_tuned_clip_parameters(clip))
    embeddings = segmenter.encode_classes(class_tokens(get_tokenizer(EVA), [["cat"], ["sky"]], ["{}"]))
    logits = segmenter(torch.randn(1, 3, 224, 224), embeddings)
    segmentation_loss(logits, torch.randint(0, 2, (1, 224, 224))).backward()
    idle = {name for name, p in trained.items() if p.grad is None or not p.grad.abs().sum() > 0}
    assert idle == {"clip.visual.trunk.blocks.3.attn.q_proj.weight"}  # cls+v never uses the last block's queries


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def test_training_crops_never_label_a_held_out_class():
    g = torch.Generator().manual_seed(0)
    samples = [{"image": torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8, generator=g),
                "label": torch.randint(0, 6, (40, 60), generator=g).to(torch.uint8)} for _ in range(4)]
    for sample in samples:
        sample["label"][:5] = 255
    held_out = [1, 4]
    crops = TrainingCrops(_Pairs(samples), crop_size=32, label_map=training_label_map(6, [0, 2, 3, 5]), seed=0)
    seen_values = set()
    for index in range(len(crops)):
        crop = crops[index]
        assert crop["image"].shape == (3, 32, 32) and crop["label"].shape == (32, 32)
        seen_values |= set(crop["label"].unique().tolist())
    assert seen_values <= {0, 1, 2, 3, 255}  # training indices of classes 0, 2, 3, 5, and ignore
    full = TrainingCrops(_Pairs(samples), crop_size=40, label_map=training_label_map(6, [0, 2, 3, 5]), seed=0)
    for index, sample in enumerate(samples):  # crop 40 = no resize; flips aside, held-out pixels -> 255
        label, crop = sample["label"].long(), full[index]["label"].long()
        assert crop.shape == (40, 40)
        ignored = (crop == 255).sum()
        held = sum(int((label == c).sum()) for c in held_out) + int((label == 255).sum())
        assert ignored <= held and ignored > 0
    assert torch.equal(crops[2]["image"], crops[2]["image"])  # (seed, epoch, draw) fixes the augmentation
    with pytest.raises(ValueError, match="training classes must be distinct ids in 0..5"):
        training_label_map(6, [0, 6])


def test_export_round_trip_and_sliding_window_scores(tiny_model, tmp_path):
    torch.manual_seed(0)
    segmenter = CATSeg(tiny_model, HeadConfig(**SMALL_HEAD), prompts=1, clip_resolution=224).eval()
    save_catseg(segmenter, ["a photo of {}."], tmp_path / "model", train_dataset="unit")
    loaded, tokenizer, templates = load_catseg(tmp_path / "model")
    assert templates == ["a photo of {}."]
    image = torch.randn(1, 3, 96, 96)
    embeddings = segmenter.encode_classes(class_tokens(tokenizer, [["cat"], ["dog"]], templates))
    protocol = SlidingWindowProtocol(short_side=96, size=96, window=96, overlap=0.0)
    with torch.no_grad():
        scores = sliding_window_scores(loaded, image, embeddings, protocol)
        # one window = the whole image: the average of two identical predictions
        expected = F.interpolate(segmenter(image, embeddings), size=(96, 96), mode="bilinear").sigmoid()[0]
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not tile 100 exactly"):
        SlidingWindowProtocol(size=100, window=64, overlap=0.5)
    with pytest.raises(FileNotFoundError, match="is not a CAT-Seg folder: missing catseg_config.json"):
        load_catseg(tmp_path)


def test_whole_image_view_is_made_from_the_short_side_image_not_the_square_canvas():
    """CAT-Seg's ``global_image`` resizes ``images[0]`` (short side 640) to the window, not the 640 x 640 canvas."""
    seen = []

    def recording_segmenter(images, class_embeddings):
        seen.append(images)
        return torch.zeros(len(images), class_embeddings.shape[0], 5, 5)
    image = torch.randn(1, 3, 40, 60, generator=torch.Generator().manual_seed(0))
    protocol = SlidingWindowProtocol(short_side=40, size=40, window=20, overlap=0.0)
    sliding_window_scores(recording_segmenter, image, torch.zeros(3, 8), protocol)
    views = seen[0]
    assert views.shape == (5, 3, 20, 20)  # four windows of the 40 x 40 canvas, then the whole image
    whole = F.interpolate(image, size=(20, 20), mode="bilinear", align_corners=False)[0]
    via_canvas = F.interpolate(F.interpolate(image, size=(40, 40), mode="bilinear", align_corners=False),
                               size=(20, 20), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(views[-1], whole)
    assert not torch.allclose(views[-1], via_canvas, atol=1e-3)
    canvas = F.interpolate(image, size=(40, 40), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(views[1], canvas[:, :20, 20:])  # windows: row-major over the canvas


def test_voc20b_scores_the_extra_names_as_background(tiny_model, tmp_path, monkeypatch):
    """VOC-20b: 59 names; a pixel won by name >= 20 is background (0), name k < 20 is VOC class k + 1."""
    labels = [np.array([0, 1, 20, 255], dtype=np.uint8)[np.arange(32) // 8][:, None].repeat(32, 1)]
    root = write_segmentation_dataset("voc21", tmp_path / "voc", labels, [np.zeros((32, 32, 3), np.uint8)])
    write_segmentation_dataset("voc21", root, labels, [np.zeros((32, 32, 3), np.uint8)], layout="detectron2")
    segmenter = CATSeg(tiny_model, HeadConfig(**SMALL_HEAD), prompts=1, clip_resolution=224).eval()
    winners = torch.zeros(32, 32, dtype=torch.long)
    winners[:8], winners[8:16], winners[16:24] = 30, 0, 19  # background row -> extra name, class 1, class 20

    def fake_scores(segmenter, image, embeddings, protocol):
        return F.one_hot(winners, embeddings.shape[0]).permute(2, 0, 1).float()
    monkeypatch.setattr("denserc.catseg.evaluate.sliding_window_scores", fake_scores)
    result = evaluate_catseg(segmenter, get_tokenizer(TINY), ["{}"], root, "voc20b", workers=0, progress=False,
                             protocol=SlidingWindowProtocol(short_side=32, size=32, window=32, overlap=0.0))
    assert result["mIoU"] == 100.0 and len(result["per_class"]) == 21
    assert result["layout"] == "detectron2"  # CAT-Seg's annotations_detectron2_bg read before mmseg's layout
    # two rows of class 1 predicted as VOC class 5, absent from the labels: CAT-Seg's (detectron2's) mean leaves
    # class 5 out, so mIoU = (background 1 + class 1 6/8 + class 20 1) / 3, not / 4 with a 0 as mmseg's would
    winners[8:10] = 4
    result = evaluate_catseg(segmenter, get_tokenizer(TINY), ["{}"], root, "voc20b", workers=0, progress=False,
                             protocol=SlidingWindowProtocol(short_side=32, size=32, window=32, overlap=0.0))
    assert result["miou_rule"] == "detectron2"
    assert result["mIoU"] == pytest.approx(100 * (1 + 6 / 8 + 1) / 3)
    assert result["per_class"][5]["IoU"] is None
