"""`denserc testbed-probe`: colour/pattern scoring by hand, the linear probe, and agreement with the evaluation."""
import json

import pytest
import torch

import denserc
from denserc.cli import main
from denserc_testbed.crops import ScenePool
from denserc_testbed.evaluation import SPLIT, evaluate
from denserc_testbed.probe import (attribute_accuracy, linear_probe, load_testbed_model, probe, select_weight_decay,
                                   thing_attributes)
from denserc_testbed.run import EVAL_SEED
from denserc_testbed.tiny_clip import pretrained_path

from helpers import TINY

RED_SOLID, ORANGE_SOLID, RED_STRIPED, GRASS = 0, 1, 8, 48  # labels = category id - 1, pattern-major order


def test_thing_attributes_by_hand():
    attributes = thing_attributes(torch.tensor([RED_SOLID, ORANGE_SOLID, RED_STRIPED, 47]))
    assert attributes["class"].tolist() == [0, 1, 8, 47]
    assert attributes["colour"].tolist() == [0, 1, 0, 7]  # red, orange, red, pink
    assert attributes["pattern"].tolist() == [0, 0, 1, 5]  # solid, solid, striped, hatched
    with pytest.raises(ValueError, match="every label must be a thing class"):
        thing_attributes(torch.tensor([GRASS]))


def test_attribute_accuracy_by_hand():
    """Four red solid objects predicted as: red solid, orange solid, red striped, grass."""
    labels = torch.tensor([RED_SOLID] * 4)
    predicted = torch.tensor([RED_SOLID, ORANGE_SOLID, RED_STRIPED, GRASS])
    assert attribute_accuracy(predicted, labels) == {"class": 25.0, "colour": 50.0, "pattern": 50.0, "stuff": 25.0}


def test_linear_probe_reads_what_the_features_hold():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (90,), generator=generator)
    separable = torch.nn.functional.one_hot(labels, 3).float() + 0.1 * torch.randn(90, 3, generator=generator)
    assert linear_probe(separable[:60], labels[:60], separable[60:], labels[60:], 3) == 100.0
    # Features that hold nothing: the probe can only predict the training set's most frequent class.
    constant = torch.ones(90, 4)
    train, test = torch.tensor([2] * 40 + [0] * 20), torch.tensor([2] * 3 + [1] * 7)
    assert linear_probe(constant[:60], train, constant[:10], test, 3) == pytest.approx(30.0)


def test_the_probe_strength_is_chosen_on_training_examples_only():
    """Ten separable classes, half the examples in class 0: a strong penalty leaves the probe predicting
    class 0 alone, a weak one separates them; the choice follows the training examples' validation fifth."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 40, generator=generator)
    labels = torch.cat([torch.zeros(150, dtype=torch.long), torch.arange(1, 10).repeat(15)])
    labels = labels[torch.randperm(len(labels), generator=generator)]
    features = centres[labels] + 0.5 * torch.randn(len(labels), 40, generator=generator)
    train_x, train_y, test_x, test_y = features[:200], labels[:200], features[200:], labels[200:]
    majority = 100 * (test_y == 0).float().mean().item()
    assert linear_probe(train_x, train_y, test_x, test_y, 10, weight_decay=1e3) == pytest.approx(majority)
    assert select_weight_decay(train_x, train_y, 10, (1e3, 1e-4)) == 1e-4
    assert select_weight_decay(train_x, train_y, 10, (1e-4, 1e3)) == 1e-4
    assert linear_probe(train_x, train_y, test_x, test_y, 10) == 100.0


@pytest.mark.slow
def test_probe_agrees_with_the_testbed_evaluation(tmp_path, capsys):
    torch.manual_seed(0)
    model = denserc.create_model(TINY).eval()
    tokenizer = denserc.get_tokenizer(TINY)
    result = probe(model, tokenizer, tmp_path, eval_images=3, probe_images=4)

    panoptic = json.loads((tmp_path / "data" / "annotations" / f"panoptic_{SPLIT}.json").read_text())
    things = sum(1 for a in panoptic["annotations"] for s in a["segments_info"]
                 if s["category_id"] <= 48 and s["bbox"][2] * s["bbox"][3] >= 64)
    assert result["thing_segments"] == things
    assert list(result["linear_probes"]) == [f"block {i} input" for i in range(len(model.visual.transformer.resblocks))
                                             ] + ["tower output", "dense features"]
    reference = evaluate(model, tokenizer, tmp_path / "data", ScenePool.render(EVAL_SEED, 3), image_size=128)
    assert result["zero_shot"]["boxes"]["class"] == pytest.approx(reference["thing_boxes_top1"])
    assert result["zero_shot"]["masks"]["class"] == pytest.approx(reference["thing_masks_top1"])
    assert result["zero_shot"]["global, object crops"]["class"] == pytest.approx(reference["crop_things_top1"])
    for pooling in ("boxes", "masks"):  # a right thing class stays the best of the things alone
        alone = result["zero_shot"][f"{pooling}, thing classes only"]
        assert alone["stuff"] == 0.0
        assert alone["class"] >= result["zero_shot"][pooling]["class"]

    capsys.readouterr()
    assert main(["testbed-probe", str(tmp_path / "missing"), "--output", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith(f"denserc testbed-probe: error: '{tmp_path / 'missing'}' is neither "
                                              "'testbed', a weights file written by pretrain-testbed, nor")


def test_probe_loads_a_pretrain_testbed_weights_file_like_the_shipped_tag():
    from_file = load_testbed_model(str(pretrained_path())).state_dict()
    from_tag = load_testbed_model("testbed").state_dict()
    assert from_file.keys() == from_tag.keys()
    assert all(torch.equal(from_file[key], from_tag[key]) for key in from_tag)
