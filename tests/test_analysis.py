"""`denserc analyze` (docs/analysis.md): statistics on hand-made inputs, the tower taken apart exactly, the
Monte Carlo check of Delta L, and every command end to end on a tiny random CLIP."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import denserc
from denserc.analysis import AnalysisData, Segment, register_analysis_data
from denserc.analysis.data import ANALYSIS_DATA
from denserc.analysis.decomposition import delta_l_monte_carlo
from denserc.analysis.internals import (block_branches, class_embedding_without_head, class_token_decomposition,
                                        mean_attention_distance, patch_distances)
from denserc.analysis.stats import class_separation, concentration, gate_statistics, gini, top_share
from denserc.analysis.sweeps import run_name, trained_model
from denserc.analysis.variants import GRADIENT_VARIANTS, same_weights
from denserc.cli import main

from helpers import TINY, randomize_, variant


# ------------------------------------------------------------------------------------------ statistics
def test_gini_and_top_share_of_hand_made_gradients():
    assert gini(torch.tensor([1.0, 2.0, 3.0, 4.0])).item() == pytest.approx(0.25)  # sum (2i-n-1) x_i / (n sum x)
    assert gini(torch.ones(7)).item() == pytest.approx(0.0)
    assert gini(torch.tensor([0.0, 0.0, 0.0, 5.0])).item() == pytest.approx(0.75)  # (n - 1) / n: one holds all
    peaked = torch.ones(40)
    peaked[3] = 10.0
    assert top_share(peaked).item() == pytest.approx((10 + 1) / 49)  # top 5 % of 40 patches = 2 patches
    stats = concentration(torch.stack([peaked, torch.ones(40)]))
    assert stats["peak"] == pytest.approx(5.5)
    assert stats["mean"] == pytest.approx((49 / 40 + 1) / 2)
    assert stats["peak_over_mean"] == pytest.approx((10 / (49 / 40) + 1) / 2)
    assert stats["top5_share"] == pytest.approx((11 / 49 + 2 / 40) / 2)


def test_gate_statistics_of_hand_made_gates():
    base = torch.tensor([[0.1, 0.9], [0.5, 0.3]])  # (layers, heads)
    same_pattern = torch.stack([base, 0.5 * base + 0.2, base])  # affine copies: correlation 1
    report = gate_statistics(same_pattern)
    assert report["between_image_correlation"] == pytest.approx(1.0)
    assert np.allclose(report["gate_mean"], ((2.5 * base + 0.2) / 3).tolist())
    assert np.allclose(report["gate_std"], same_pattern.std(0).tolist())
    opposite = torch.stack([base, 1 - base])
    assert gate_statistics(opposite)["between_image_correlation"] == pytest.approx(-1.0)
    assert gate_statistics(torch.full((3, 2, 2), 0.5))["between_image_correlation"] is None  # uniform initial gate


def test_class_separation_by_hand_and_without_singletons():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])  # class 2 has one segment: left out
    assert class_separation(features[:3], labels[:3]) is None  # one class left: no between-class spread
    report = class_separation(features, labels)
    means = torch.tensor([[0.5, 0.5], [-0.5, -0.5]])
    within = 0.5  # every point is sqrt(0.5) from its class mean
    between = 2 * 2 * means[0].square().sum().item() / 4  # overall mean is 0
    assert report["singletons"] == 1 and report["segments"] == 4
    assert report["within_scatter"] == pytest.approx(within)
    assert report["between_scatter"] == pytest.approx(between)
    assert report["fisher_ratio"] == pytest.approx(between / within)
    assert report["cos_to_own_class"] == pytest.approx(2 ** -0.5)
    assert report["cos_to_other_classes"] == pytest.approx(-(2 ** -0.5))


def test_mean_attention_distance_of_hand_made_attention():
    grid = (1, 3)  # patches at 0, 1, 2; one prefix token in front
    probabilities = torch.zeros(1, 2, 4, 4)
    probabilities[0, 0, 1:, 1:] = torch.eye(3)  # head 0 attends to itself: distance 0
    probabilities[0, 1, 1:, 0] = 0.5  # head 1: half on the prefix token, half on patch 0
    probabilities[0, 1, 1:, 1] = 0.5
    distance, prefix_share = mean_attention_distance(probabilities, grid, prefix=1)
    assert distance[0].tolist() == pytest.approx([0.0, 1.0])  # (0 + 1 + 2) / 3
    assert prefix_share[0].tolist() == pytest.approx([0.0, 0.5])


def test_delta_l_monte_carlo_matches_the_formula_only_under_its_assumption():
    held = delta_l_monte_carlo(samples=20000, patches=8, dim=16, rank=4, seed=1)
    assert held["formula_delta_l"] > 0
    assert abs(held["measured_delta_l"] - held["formula_delta_l"]) < 4 * held["standard_error"]
    broken = delta_l_monte_carlo(samples=20000, patches=8, dim=16, rank=4, seed=1, mean_shift=0.5)  # other patches' values not zero-mean
    assert broken["measured_delta_l"] - broken["formula_delta_l"] > 20 * broken["standard_error"]


# ------------------------------------------------------------------------------------ the tower apart
@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return randomize_(denserc.create_model(TINY)).eval()


def test_block_branches_rebuild_every_block_and_the_class_token(tiny, images):
    states, rope, _ = tiny.block_inputs(images[:, :, :64, :64])
    for block, x, after in zip(tiny.tower.blocks, states, states[1:]):
        attention, mlp = block_branches(tiny, block, x, rope)
        torch.testing.assert_close(x + attention + mlp, after, atol=1e-5, rtol=1e-5)
    parts = class_token_decomposition(tiny, states, rope)
    rebuilt = parts["embedding"] + parts["attention"].sum(1) + parts["mlp"].sum(1)
    torch.testing.assert_close(rebuilt, parts["output"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny.tower.pool_global(states[-1]), tiny.encode_image(images[:, :, :64, :64]),
                               atol=1e-5, rtol=1e-5)


def test_removing_a_head_equals_zeroing_its_value_weights(tiny, images):
    images = images[:, :, :64, :64]
    states, rope, _ = tiny.block_inputs(images)
    layer, head, width = 2, 1, tiny.width
    size = width // tiny.heads
    removed = class_embedding_without_head(tiny, states, layer, head, rope)
    attn = tiny.tower.blocks[layer].attn  # the open_clip block, in a test only
    with torch.no_grad():
        rows = slice(2 * width + head * size, 2 * width + (head + 1) * size)
        attn.in_proj_weight[rows] = 0
        attn.in_proj_bias[rows] = 0
    torch.testing.assert_close(removed, tiny.encode_image(images), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(removed, tiny.tower.pool_global(states[-1]), atol=1e-3)


@pytest.mark.parametrize("name", list(GRADIENT_VARIANTS))
def test_dense_from_block_inputs_equals_encode_dense(tiny, images, name):
    model = variant(tiny, construction=GRADIENT_VARIANTS[name][0], gating=GRADIENT_VARIANTS[name][1])
    states, rope, grid = model.block_inputs(images[:, :, :64, :96])
    inputs = states[model.depth - model.num_layers:model.depth]
    torch.testing.assert_close(model.dense_from_block_inputs(inputs, grid, rope),
                               model.encode_dense(images[:, :, :64, :96]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, local", [("none", True), ("hsg", True), ("x+v", True), ("qk", False), ("qq", False)])
def test_only_spatial_aggregation_sends_one_patch_gradient_to_others(tiny, images, name, local):
    model = variant(tiny, construction=GRADIENT_VARIANTS[name][0], gating=GRADIENT_VARIANTS[name][1])
    states, rope, grid = model.block_inputs(images[:1, :, :64, :64])
    inputs = [s.detach().requires_grad_(True) for s in states[model.depth - model.num_layers:model.depth]]
    dense = model.dense_from_block_inputs(inputs, grid, rope)
    gradients = torch.autograd.grad(dense[0, :, 1, 2].sum(), inputs)  # one patch's feature: patch 1 * 4 + 2
    per_token = torch.stack([g[0].norm(dim=-1) for g in gradients]).sum(0)[1:]  # patch tokens
    others = torch.cat([per_token[:6], per_token[7:]])
    assert per_token[6] > 0
    assert (others.max() == 0) == local


def test_same_weights_keeps_a_trained_gate_and_shares_the_clip(tiny):
    hsg = variant(tiny, construction="multi-v", gating="hsg")
    assert same_weights(hsg, "multi-v", "hsg") is hsg
    fewer = same_weights(hsg, "multi-v", "hsg", 2)
    assert fewer.gate is hsg.gate and fewer.clip is hsg.clip and fewer.num_layers == 2
    assert same_weights(tiny, "x+v", "none").num_layers == 1


def test_a_trained_sweep_point_whose_final_folder_exists_is_reused(tiny, tmp_path):
    tiny.save(tmp_path / run_name(3, 0.0125, 1) / "final")
    final, reused = trained_model("config-never-read", tmp_path, 3, 0.0125, 1)
    assert reused and final == tmp_path / "L3-lambda0.0125-seed1" / "final"
    assert run_name(2, 0.0, 0) == "L2-lambda0-seed0"


# --------------------------------------------------------------------------------------- the commands
NAMES = ["red thing", "blue thing", "grass", "water"]


def tiny_data(num_images, workdir, progress):
    """A plug-in's analysis data for ViT-Tiny-16: generated images, crops with labels, segments, an evaluation."""
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(num_images, 3, 64, 64, generator=generator)
    half = torch.zeros(64, 64, dtype=torch.bool)
    half[:, :32] = True
    segments = [[Segment(half, i % 2, True), Segment(~half, 2 + i % 2, False)] for i in range(num_images)]
    return AnalysisData("tiny generated images", images, torch.rand(6, 3, 224, 224, generator=generator),
                        [[name] for name in NAMES], ["a photo of a {}."], crop_labels=torch.tensor([0, 1, 2, 0, 1, 2]),
                        segments=segments, segment_classes=NAMES,
                        evaluate=lambda model: {"score": 10.0 * model.num_layers}, metrics=("score",),
                        training_config="smoke")


@pytest.fixture
def tiny_provider():
    register_analysis_data(TINY, tiny_data)
    yield
    ANALYSIS_DATA.remove(TINY)


def run_cli(*argv):
    assert main(["analyze", *argv, "--no-progress"]) == 0


@pytest.mark.slow
def test_gradients_command_on_an_image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(1):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "g.json"
    run_cli("gradients", "--model", f"{TINY}", "--data", str(folder), "--image-size", "64", "--images", "2",
            "--variants", "none", "qk", "--out", str(out))
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"none", "qk"}
    for stats in report["variants"].values():
        assert stats["peak"] >= stats["mean"] > 0 and 0 <= stats["gini"] < 1
    assert report["images"] == 1 and (tmp_path / "g.png").stat().st_size > 0


@pytest.mark.slow
def test_heads_command_reports_gates_removal_and_locality(tmp_path, tiny_provider):
    out = tmp_path / "h.json"
    run_cli("heads", "--model", TINY, "--images", "3", "--out", str(out))
    report = json.loads(out.read_text())
    depth, heads, layers = 4, 4, 3
    assert np.array(report["gate_mean"]).shape == (layers, heads)  # lists of L lists of H
    assert np.allclose(report["gate_mean"], 0.5) and report["between_image_correlation"] is None  # uniform gate
    assert np.array(report["zero_shot_change_without_head"]).shape == (depth, heads)
    assert np.array(report["mean_attention_distance"]).shape == (depth, heads)
    assert report["uniform_attention_distance"] == pytest.approx(patch_distances((4, 4)).mean().item())
    assert report["zero_shot_measure"] == "accuracy" and (tmp_path / "h.png").is_file()


@pytest.mark.slow
def test_decomposition_consistency_and_layers_commands(tmp_path, tiny_provider):
    run_cli("decomposition", "--model", TINY, "--images", "2", "--out", str(tmp_path / "d.json"))
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["identity_error"] < 1e-4 and report["crops"] == 6
    assert -1 <= report["value_paths_last_L"]["cosine_to_global"] <= 1
    run_cli("consistency", "--model", TINY, "--model", TINY, "--images", "4", "--out", str(tmp_path / "c.json"))
    results = json.loads((tmp_path / "c.json").read_text())["results"]
    assert results[TINY]["things"]["classes"] == 2 and results[TINY]["things"]["segments"] == 4
    assert results[TINY]["stuff"]["classes"] == 2 and results[TINY]["all"]["segments"] == 8
    run_cli("layers", "--model", TINY, "--out", str(tmp_path / "l.json"))
    summary = json.loads((tmp_path / "l.json").read_text())["summary"]
    assert [(s["num_layers"], s["score"]) for s in summary] == [(1, 10.0), (2, 20.0), (3, 30.0), (4, 40.0)]
    assert (tmp_path / "l.png").is_file()
    tiny = denserc.create_model(TINY)
    tiny.save(tmp_path / "runs" / "L3-lambda0.05-seed0" / "final")
    run_cli("lambda", "--model", TINY, "--runs", str(tmp_path / "runs"), "--values", "0", "0.05", "--existing-only",
            "--out", str(tmp_path / "lam.json"))  # trains nothing: evaluates the one point there is
    report = json.loads((tmp_path / "lam.json").read_text())
    assert [(r["lambda"], r["seed"], r["reused"]) for r in report["rows"]] == [(0.05, 0, True)]
    assert report["not_trained"] == ["L3-lambda0-seed0", "L3-lambda0-seed1", "L3-lambda0.05-seed1"]


def test_delta_l_command(tmp_path):
    run_cli("delta-l", "--samples", "200", "--dim", "8", "--out", str(tmp_path / "dl.json"))
    results = json.loads((tmp_path / "dl.json").read_text())["results"]
    assert [r["mean_shift"] for r in results] == [0.0, 0.5] and (tmp_path / "dl.png").is_file()


def test_without_data_or_plugin_data_the_error_says_what_to_pass(capsys):
    assert main(["analyze", "heads", "--model", "ViT-Tiny-16-MAP", "--no-progress"]) == 1
    assert "no --data given and no plug-in provides analysis images for ViT-Tiny-16-MAP; pass --data" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_layers_command_evaluates_on_a_coco_panoptic_root(tmp_path):
    from eval_fixtures import grey_image, grey_levels, write_panoptic, write_templates
    ids = np.zeros((64, 96), np.int64)
    ids[:, :48], ids[:, 48:] = 1, 2
    label_map = np.where(ids == 1, 0, 80).astype(np.uint8)
    root = write_panoptic(tmp_path / "coco", [(grey_image(label_map, grey_levels([0, 80])), ids, {1: 0, 2: 80})])
    templates = write_templates(tmp_path / "templates.txt", "a photo of a {}.")
    run_cli("layers", "--model", TINY, "--data", str(root), "--images", "1", "--image-size", "96", "--layers", "1", "3",
            "--templates", str(templates), "--out", str(tmp_path / "l.json"))
    summary = json.loads((tmp_path / "l.json").read_text())["summary"]
    assert [s["num_layers"] for s in summary] == [1, 3]
    assert all(0 <= s[m] <= 100 for s in summary for m in ("boxes_thing", "masks_thing", "masks_stuff"))


def test_analyze_help_loads_no_torch():
    import subprocess
    import sys
    code = ("import sys\nfrom denserc.cli import main\nfor argv in (['analyze', '--help'], ['analyze', 'gradients', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'open_clip', 'timm', 'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert "delta-l" in result.stdout and "--variants" in result.stdout


def test_the_testbed_registers_its_held_out_scenes_as_analysis_data(tmp_path):
    from denserc.analysis import analysis_data
    model = denserc.create_model("ViT-Testbed-P8", pretrained="testbed")
    data = analysis_data(model, None, 2, workdir=tmp_path, progress=False)  # found through the plug-in
    assert data.images.shape == (2, 3, 128, 128) and 0 <= data.images.min() and data.images.max() <= 1
    assert data.crops.shape[1:] == (3, 48, 48) and len(data.crop_labels) == len(data.crops)
    assert len(data.class_names) == 48 and int(data.crop_labels.max()) < 48
    coverage = torch.stack([segment.mask for segment in data.segments[0]]).sum(0)
    assert (coverage == 1).all()  # every pixel in exactly one segment
    assert len(data.segment_classes) == 53 and data.training_config == "testbed"


@pytest.mark.slow
def test_heads_on_an_image_folder_measure_agreement_with_the_intact_model(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    (tmp_path / "classes.txt").write_text("dog\ncat\ngrass\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n")
    run_cli("heads", "--model", TINY, "--data", str(folder), "--image-size", "64", "--images", "2",
            "--class-names", str(tmp_path / "classes.txt"), "--templates", str(tmp_path / "templates.txt"),
            "--out", str(tmp_path / "h.json"))
    report = json.loads((tmp_path / "h.json").read_text())
    assert report["zero_shot_measure"] == "agreement with the intact model"
    assert report["zero_shot_top1"] == 100.0 and report["crops"] == 2
