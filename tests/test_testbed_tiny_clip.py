"""The testbed's tiny CLIP: crops and batches it learns from, its pretraining run, its shipped weights."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import denserc
from denserc_testbed.crops import ScenePool, crop, square_boxes
from denserc_testbed.pretrain import BatchSampler, PretrainConfig, learning_rate, pretrain, check_set_pool
from denserc_testbed.tiny_clip import MODEL_NAME, WEIGHTS_FILE, pretrain_record, pretrained_path
from denserc_testbed.vocabulary import CATEGORIES, STUFF_ID, TEMPLATES, THING_ID, phrase
from denserc_testbed.zero_shot import crop_accuracy

ACCURACY_TOLERANCE = 0.02  # float differences between machines may flip a borderline crop or two


@pytest.fixture(scope="module")
def pool():
    return ScenePool.render(seed=0, num_scenes=120)


def test_square_boxes_are_centred_squares_kept_inside_the_image():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [100.0, 100.0, 120.0, 120.0], [40.0, 40.0, 50.0, 44.0]])
    squares = square_boxes(boxes, torch.tensor([1.5, 2.0, 1.0]), image_size=128)
    # 1: side 1.5 * 40 = 60 around (20, 40), pushed right to x = 0; 2: side 40 around 110, pulled back
    # inside the 128 px image; 3: side 10 around (45, 42).
    assert squares.tolist() == [[0.0, 10.0, 60.0, 70.0], [88.0, 88.0, 128.0, 128.0], [40.0, 37.0, 50.0, 47.0]]


def test_crop_takes_the_box_in_pixel_edge_coordinates():
    """On an image linear in x and y, a pixel-aligned box of its own size returns that exact slice."""
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    image = torch.stack([3 * xs + 5 * ys, xs, ys])[None]
    out = crop(image, torch.tensor([[8.0, 16.0, 24.0, 32.0]]), size=16)
    assert torch.allclose(out[0], image[0, :, 16:32, 8:24], atol=1e-4)


@pytest.mark.slow  # renders the scene pool
def test_batch_has_one_crop_per_class_then_captioned_regions(pool):
    tokenizer = denserc.get_tokenizer(MODEL_NAME)
    sampler = BatchSampler(pool, tokenizer, native_size=48, regions_per_batch=5, rng=np.random.default_rng(3))
    images, tokens, captions = sampler()
    assert images.shape == (len(CATEGORIES) + 5, 3, 48, 48)
    for caption, category in zip(captions, CATEGORIES):
        assert caption in [t.format(phrase(category["id"])) for t in TEMPLATES]
    assert all(caption.startswith("a photo of ") for caption in captions[len(CATEGORIES):])
    assert torch.equal(tokens, tokenizer(captions))
    again = BatchSampler(pool, tokenizer, native_size=48, regions_per_batch=5, rng=np.random.default_rng(3))()
    assert torch.equal(again[0], images) and again[2] == captions


def test_region_caption_names_what_the_box_shows():
    """10 x 10 scene: grass, a red striped object in rows/cols 0-3, a blue dotted one in rows/cols 6-9."""
    segment_map = np.zeros((1, 10, 10), dtype=np.uint8)
    segment_map[0, :4, :4] = 1
    segment_map[0, 6:, 6:] = 2
    parts = [[(STUFF_ID["grass"], 68), (THING_ID[("striped", "red")], 16), (THING_ID[("dotted", "blue")], 16)]]
    pool = ScenePool(torch.zeros(1, 3, 10, 10, dtype=torch.uint8), ["scene"], torch.zeros(0, 6), segment_map, parts)
    # the whole striped object and 9/25 grass are inside; the dotted one is not
    assert pool.region_caption(0, (0, 0, 5, 5)) == "a photo of a red striped object on grass."
    # 1/16 of the striped object (2% of the box) is not named; the dotted one covers 16/49 of the box
    assert pool.region_caption(0, (3, 3, 10, 10)) == "a photo of a blue dotted object on grass."
    assert pool.region_caption(0, (0, 0, 2, 2)) == "a photo of a red striped object."
    # the salient rule names the objects alone, and the stuff only where no object is named
    assert pool.region_caption(0, (0, 0, 5, 5), salient=True) == "a photo of a red striped object."
    assert pool.region_caption(0, (3, 3, 10, 10), salient=True) == "a photo of a blue dotted object."
    assert pool.region_caption(0, (4, 4, 6, 6), salient=True) == "a photo of grass."


def test_pretrain_config_refuses_an_unknown_caption_rule():
    with pytest.raises(ValueError, match=r"captions must be one of \('scene', 'salient'\), got 'short'"):
        PretrainConfig(captions="short")


def test_sampler_refuses_a_pool_that_lacks_classes():
    tokenizer = denserc.get_tokenizer(MODEL_NAME)
    with pytest.raises(ValueError, match="has no example of"):
        BatchSampler(ScenePool.render(seed=0, num_scenes=2), tokenizer, 64, 1, np.random.default_rng(0))


def test_learning_rate_warms_up_then_decays_to_zero():
    config = PretrainConfig(lr=1e-3, steps=110, warmup_steps=10)
    assert learning_rate(0, config) == pytest.approx(1e-4)
    assert learning_rate(9, config) == pytest.approx(1e-3)
    assert learning_rate(60, config) == pytest.approx(0.5e-3)
    assert learning_rate(110, config) == pytest.approx(0.0)


@pytest.mark.slow
def test_pretraining_is_reproducible_and_writes_loadable_weights(tmp_path):
    config = PretrainConfig(seed=5, steps=2, train_scenes=120, held_out_scenes=6, regions_per_batch=4,
                            warmup_steps=1, eval_every=2)
    record = pretrain(config, tmp_path / "a", command="test", progress=False)
    pretrain(config, tmp_path / "b", command="test", progress=False)
    first, second = (load_file(tmp_path / run / WEIGHTS_FILE) for run in "ab")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert record["command"] == "test" and record["config"]["steps"] == 2
    untrained = denserc.create_model(MODEL_NAME).clip.state_dict()
    torch.manual_seed(config.seed)
    initial = denserc.create_model(MODEL_NAME).clip.state_dict()
    assert not torch.equal(initial["visual.proj"].half(), first["visual.proj"]), "no training step was taken"
    assert set(first) == set(untrained) and all(t.dtype == torch.float16 for t in first.values())
    model = denserc.create_model(MODEL_NAME, pretrained=pretrained_path(tmp_path / "a"))
    tokenizer = denserc.get_tokenizer(MODEL_NAME)
    assert crop_accuracy(model, tokenizer, check_set_pool()) == record["zero_shot_test_set"]


@pytest.mark.slow
def test_shipped_tiny_clip_reaches_its_recorded_zero_shot_accuracy():
    record = pretrain_record()
    model = denserc.create_model(MODEL_NAME, pretrained=pretrained_path())
    accuracy = crop_accuracy(model, denserc.get_tokenizer(MODEL_NAME), check_set_pool())
    recorded = record["zero_shot_test_set"]
    assert accuracy["things_crops"] == recorded["things_crops"]
    assert accuracy["things_top1"] >= recorded["things_top1"] - ACCURACY_TOLERANCE
    assert accuracy["stuff_top1"] >= recorded["stuff_top1"] - ACCURACY_TOLERANCE
    assert recorded["things_top1"] >= 10 / 48, "the shipped model must be far above chance (1/48)"
