"""The testbed's plumbing into the trainer and the evaluation suite: data type, VFM, held-out split."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import denserc
from denserc.data import build_source
from denserc.eval.datasets import SegmentationDataset
from denserc.train.vfm import VFM
from denserc_testbed.appearance_vfm import VFM_NAME, AppearanceFeatures
from denserc_testbed.crops import ScenePool
from denserc_testbed.evaluation import DATASET, SPLIT, evaluate, prepare_split
from denserc_testbed.run import METRICS, starting_model
from denserc_testbed.tiny_clip import pretrained_path
from denserc.train import load_config
from denserc_testbed.scenes import render_scene, scene_rng
from denserc.train.config import DataConfig

from helpers import TINY


def test_testbed_data_type_renders_the_seeded_scenes():
    source = build_source(DataConfig(type="testbed", num_images=3, seed=4, options={"max_objects": 2}))
    assert len(source) == 3
    with source.open(2) as image:
        expected = render_scene(scene_rng(4, 2), source.config).image
        assert np.array_equal(np.asarray(image), expected)
    with pytest.raises(ValueError, match="unknown scene setting 'objects'"):
        build_source(DataConfig(type="testbed", num_images=3, options={"objects": 2}))


def test_appearance_features_by_hand():
    """A flat patch has no texture and a colour histogram of softmax(-d^2 / 2 sigma^2) over prototypes;
    a vertical step edge puts its gradient energy in the horizontal-gradient bin (angle 0)."""
    extractor = AppearanceFeatures(patch_size=8)
    flat = torch.zeros(1, 3, 8, 16)
    flat[:, :, :, :8] = torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1)
    flat[:, :, :, 8:] = torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1)
    features = extractor.forward_features(flat)
    assert features.shape == (1, 2, 27 + 6)
    levels = torch.tensor([1 / 6, 3 / 6, 5 / 6])
    prototypes = torch.cartesian_prod(levels, levels, levels)
    distance = ((prototypes - torch.tensor([0.9, 0.1, 0.1])) ** 2).sum(1)
    expected = torch.softmax(-distance / (2 * 0.15 ** 2), dim=0)
    assert torch.allclose(features[0, 0, :27], expected, atol=1e-6)
    assert torch.equal(features[0, 0, 27:], torch.zeros(6))
    edge = torch.zeros(1, 3, 8, 8)
    edge[..., 4:] = 1.0
    texture = extractor.forward_features(edge)[0, 0, 27:]
    assert texture[0] > 0 and torch.equal(texture[1:], torch.zeros(5))


def test_appearance_vfm_loads_through_the_trainers_vfm_wrapper():
    vfm = VFM(VFM_NAME, pretrained=False)
    assert vfm.patch_size == 8 and vfm.width == 33
    scene = render_scene(scene_rng(0, 1))
    pixels = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 255
    patches = F.normalize(vfm(pixels, (16, 16))[0], dim=-1)
    # patches wholly inside one segment are far more alike than patches of different segments
    ids = torch.from_numpy(scene.segment_ids).view(16, 8, 16, 8).permute(0, 2, 1, 3).reshape(256, 64)
    pure = (ids == ids[:, :1]).all(dim=1)
    label = ids[:, 0]
    similarity = patches @ patches.T
    same = (label[:, None] == label[None, :]) & pure[:, None] & pure[None, :]
    different = (label[:, None] != label[None, :]) & pure[:, None] & pure[None, :]
    assert similarity[same].mean() > 0.85 > 0.4 > similarity[different].mean()
    with pytest.raises(RuntimeError, match=f"VFM {VFM_NAME}") as refused:
        VFM(VFM_NAME, pretrained=True)
    assert "has no weights to load" in str(refused.value.__cause__)


@pytest.mark.slow
def test_held_out_split_is_read_by_the_evaluation_suite(tmp_path):
    root = prepare_split(tmp_path, num_images=3, seed=11, progress=False)
    first = (root / "annotations" / f"panoptic_{SPLIT}.json").stat().st_mtime_ns
    assert prepare_split(tmp_path, num_images=3, seed=11, progress=False) == root
    assert (root / "annotations" / f"panoptic_{SPLIT}.json").stat().st_mtime_ns == first, "rewritten"
    data = SegmentationDataset(DATASET, root)
    scenes = [render_scene(scene_rng(11, i)) for i in range(3)]
    assert len(data) == 3
    for sample, scene in zip(data, scenes):
        assert torch.equal(sample["label"], torch.from_numpy(scene.label_map))
        assert torch.equal(sample["image"], torch.from_numpy(scene.image).permute(2, 0, 1))
    names = (root / "testbed_class_names.txt").read_text().splitlines()
    assert names[0] == "a red solid object" and names[-1] == "gravel" and len(names) == 53

    torch.manual_seed(0)
    model = denserc.create_model(TINY).eval()
    results = evaluate(model, denserc.get_tokenizer(TINY), root, ScenePool.render(11, 3), image_size=128)
    panoptic = json.loads((root / "annotations" / f"panoptic_{SPLIT}.json").read_text())
    boxes_over_64_px = sum(1 for a in panoptic["annotations"] for s in a["segments_info"]
                           if s["bbox"][2] * s["bbox"][3] >= 64)
    assert results["segments"] == boxes_over_64_px
    assert {key for key, _ in METRICS} <= results.keys()  # every column of the before/after table


def test_runs_start_from_the_configured_weights_and_so_does_before(tmp_path):
    """``denserc testbed model.pretrained=FILE`` measures "before" on FILE, not on the shipped tag."""
    weights = load_file(pretrained_path())
    weights["visual.proj"] = weights["visual.proj"] + 1
    save_file(weights, tmp_path / "other.safetensors")
    config = load_config("testbed", [f"model.pretrained={tmp_path / 'other.safetensors'}"])
    model = starting_model(config)
    assert torch.equal(model.clip.visual.proj, weights["visual.proj"].float())
    assert (model.construction, model.gating) == (config.model.construction, config.model.gating)
