"""Training-free OVSS: prediction rule (synonyms, background thresholds), protocols, oracle, sharding."""
import pytest
import torch

import denserc
from denserc import distributed
from denserc.eval import (DEFAULT_PROTOCOLS, SegmentationProtocol, TextClassifier, evaluate_segmentation, predict_labels,
                          protocol_for, segmentation)
from denserc.eval.text import load_class_names, load_templates
from helpers import TINY
from eval_fixtures import (grey_image, grey_levels, make_oracle, run_as_two_ranks, shifted, stripes,
                           tiny_model, write_segmentation_dataset, write_templates)

# class 0 = background with two synonyms, class 1 = cat, class 2 = dog
CLASSIFIER = TextClassifier([["bg1", "bg2"], ["cat"], ["dog"]], torch.zeros(4, 2), torch.tensor([0, 0, 1, 2]))


def _logits(*pixels):
    """(Q, 1, W) query logits from per-pixel lists of Q values."""
    return torch.tensor(pixels, dtype=torch.float).T[:, None, :]


def test_prediction_takes_the_best_synonym_of_each_class():
    logits = _logits([0.9, 0.1, 0.2, 0.3], [0.1, 0.95, 0.2, 0.3], [0.1, 0.1, 0.8, 0.3], [0.1, 0.1, 0.2, 0.7])
    assert predict_labels(logits, CLASSIFIER, SegmentationProtocol()).tolist() == [[0, 0, 1, 2]]


def test_low_probability_pixels_become_background():
    logits = _logits([0.9, 0.1, 0.2, 0.3], [0.1, 0.1, 0.8, 0.3], [0.5, 0.5, 0.51, 0.5])
    # at logit scale 1 the probabilities are softmax(logits): 0.40 (bg), 0.38 (cat) and 0.25 (cat)
    protocol = SegmentationProtocol(logit_scale=1.0, prob_threshold=0.3)
    assert predict_labels(logits, CLASSIFIER, protocol).tolist() == [[0, 1, 0]]
    assert predict_labels(logits, CLASSIFIER, SegmentationProtocol(logit_scale=1.0)).tolist() == [[0, 1, 1]]


def test_classes_winning_too_little_area_are_dropped():
    cat = [0.0, 0.0, 0.9, 0.1]
    dog_then_cat = [0.0, 0.0, 0.5, 0.9]
    background = [0.9, 0.0, 0.1, 0.2]
    logits = _logits(*[cat] * 9, dog_then_cat, background)
    assert predict_labels(logits, CLASSIFIER, SegmentationProtocol()).tolist() == [[1] * 9 + [2, 0]]
    # dog wins 1 of the 10 non-background pixels: under 20 % it is dropped there and cat takes over
    dropped = predict_labels(logits, CLASSIFIER, SegmentationProtocol(area_threshold=0.2))
    assert dropped.tolist() == [[1] * 10 + [0]]
    assert predict_labels(logits, CLASSIFIER, SegmentationProtocol(area_threshold=0.05)).tolist() == \
        [[1] * 9 + [2, 0]]


def test_protocol_defaults_follow_sclip_and_can_be_overridden():
    assert DEFAULT_PROTOCOLS["voc21"] == SegmentationProtocol(logit_scale=65.0, prob_threshold=0.1, area_threshold=0.1)
    assert DEFAULT_PROTOCOLS["context60"].prob_threshold == 0.1 and DEFAULT_PROTOCOLS["context60"].logit_scale == 50.0
    assert [DEFAULT_PROTOCOLS[name].short_side for name in ("ade20k", "coco-stuff", "cityscapes")] == [336, 448, 560]
    sclip_datasets = ("ade20k", "context59", "context60", "voc20", "voc21", "coco-stuff", "cityscapes")
    assert {(DEFAULT_PROTOCOLS[name].window, DEFAULT_PROTOCOLS[name].stride) for name in sclip_datasets} == {(224, 112)}
    custom = protocol_for("cityscapes", window=448, stride=None)
    assert (custom.window, custom.stride, custom.short_side) == (448, 112, 560)
    with pytest.raises(ValueError, match="stride must be positive, got 0; prob_threshold must be in"):
        SegmentationProtocol(stride=0, prob_threshold=1.5)


ADE_CLASSES = [0, 3, 12, 20]  # wall, floor, person, car


SMALL = dict(short_side=112, window=112, stride=56)  # windows start at multiples of the patch on these images


def _ade_fixture(root):
    """Two 112-high ADE images whose grey bands (patch-aligned) encode their labels."""
    levels = grey_levels(ADE_CLASSES)
    labels = [stripes(112, 144, [0, 3, 255, 12], rows=32), stripes(112, 128, [20, 0, 12], rows=48)]
    images = [grey_image(label, levels) for label in labels]
    return write_segmentation_dataset("ade20k", root, labels, images), levels, labels


def test_oracle_scores_100_miou_and_a_shuffled_oracle_0(tmp_path):
    root, levels, labels = _ade_fixture(tmp_path / "ade")
    tokenizer = denserc.get_tokenizer(TINY)
    templates = write_templates(tmp_path / "templates.txt", "a photo of a {}.")
    names = load_class_names("ade20k")
    settings = dict(protocol=protocol_for("ade20k", **SMALL), templates=str(templates), workers=0,
                    cache_dir=tmp_path / "cache", progress=False)
    oracle = make_oracle(tiny_model(), tokenizer, names, load_templates(templates), levels, tmp_path / "cache")
    result = evaluate_segmentation(oracle, tokenizer, root, "ade20k", **settings)
    assert result["num_images"] == 2
    assert result["mIoU"] == 100.0 and result["aAcc"] == 100.0
    present = [c for c in result["per_class"] if c["IoU"] is not None]
    assert [c["name"] for c in present] == ["wall", "floor", "person", "car"]
    # the ignored band (label 255) is painted like "wall" yet counts nowhere
    assert sum(c["pixels"] for c in present) == sum(int((label != 255).sum()) for label in labels) < 112 * 272
    shuffled = make_oracle(tiny_model(), tokenizer, names, load_templates(templates), levels,
                           tmp_path / "cache", answers=shifted(levels))
    result = evaluate_segmentation(shuffled, tokenizer, root, "ade20k", **settings)
    assert result["mIoU"] == 0.0 and result["aAcc"] == 0.0


def test_thresholds_need_a_background_class(tmp_path):
    root, _, _ = _ade_fixture(tmp_path / "ade")
    with pytest.raises(ValueError, match="ADE20K-150 has no background class: prob_threshold"):
        evaluate_segmentation(tiny_model(), denserc.get_tokenizer(TINY), root, "ade20k",
                              protocol=SegmentationProtocol(prob_threshold=0.1), workers=0)


def test_sharded_segmentation_counts_sum_to_the_one_process_result(tmp_path, monkeypatch):
    root, levels, _ = _ade_fixture(tmp_path / "ade")
    tokenizer = denserc.get_tokenizer(TINY)
    templates = write_templates(tmp_path / "t.txt", "{}")
    # an oracle that confuses person and car: some classes right, some wrong
    model = make_oracle(tiny_model(), tokenizer, load_class_names("ade20k"), load_templates(templates), levels,
                        tmp_path / "cache", answers={12: 20, 20: 12})
    settings = dict(protocol=protocol_for("ade20k", **SMALL), templates=str(templates), workers=0,
                    cache_dir=tmp_path / "cache", progress=False)
    single = evaluate_segmentation(model, tokenizer, root, "ade20k", **settings)
    assert 0 < single["mIoU"] < 100 and 0 < single["aAcc"] < 100
    halves = [evaluate_segmentation(model, tokenizer, root, "ade20k", shard=distributed.DistributedEnv(rank, 2),
                                    **settings) for rank in range(2)]
    assert [half["num_images"] for half in halves] == [1, 1]
    assert halves[0]["per_class"] != single["per_class"]  # one shard alone is not the answer
    sharded = run_as_two_ranks(monkeypatch, segmentation, lambda shard: evaluate_segmentation(
        model, tokenizer, root, "ade20k", shard=shard, **settings))
    assert sharded == single


def test_all_reduce_is_the_identity_outside_a_process_group():
    tensor = torch.tensor([1, 2])
    assert distributed.all_reduce(tensor, op="sum") is tensor and tensor.tolist() == [1, 2]
