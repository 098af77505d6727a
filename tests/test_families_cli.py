"""EVA-02-CLIP and SigLIP students through the command line: training, evaluation and pictures."""
import json

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image

import denserc
from denserc.cli import main
from denserc.models import normalize_images
from denserc.engine.config import ConfigError
from denserc.train import load_config, setup_distributed
from eval_fixtures import grey_image, grey_levels, stripes, write_panoptic, write_segmentation_dataset, \
    write_templates
from helpers import distillation_engine

EVA, SIGLIP = "EVA02-Tiny-16", "ViT-Tiny-16-MAP"
# two optimizer steps of the smoke config: 4 generated 64-px images, 2 per step
TWO_STEPS = ["data.num_images=4", "data.image_size=64", "data.grid_max_cells=2", "train.global_batch_size=2",
             "train.batch_size=2", "train.epochs=1", "optim.warmup_steps=0", "train.log_every=1",
             "train.checkpoint_every=1000", "vfm.model_kwargs={depth: 1, embed_dim: 24, num_heads: 2}"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [EVA, SIGLIP])
def test_two_training_steps_then_segment_with_the_exported_student(name, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "smoke", f"model.name={name}", *TWO_STEPS, f"train.output_dir={run}"]) == 0
    torch.manual_seed(0)
    initial = denserc.create_model(name)  # what the run started from: train.seed 0, random weights
    model = denserc.load(run / "final")
    assert model.model_name == name and model.family == initial.family
    trained = [n for n, p in model.clip.named_parameters() if not torch.equal(p, initial.clip.state_dict()[n])]
    assert trained and all(n.startswith("visual.") for n in trained)  # the text tower never trains

    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (77, 123, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "seg.png"
    assert main(["segment", str(photo), "--classes", "dog,grass,sky", "--model", str(run / "final"),
                 "--short-side", "112", "--window", "112", "-o", str(out)]) == 0
    assert Image.open(out).size == (123, 77)
    assert f"wrote {out} (123x77)" in capsys.readouterr().out


@pytest.mark.slow
def test_unlocked_blocks_train_only_the_last_blocks_and_the_gate(tmp_path):
    config = load_config("smoke", [f"model.name={EVA}", "model.unlocked_blocks=2", *TWO_STEPS])
    trainer = distillation_engine(config, setup_distributed("cpu"), tmp_path / "run")
    trainable = {n for n, p in trainer.task.student.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("clip.visual.trunk.blocks.2.", "clip.visual.trunk.blocks.3.", "gate."))
                             for n in trainable)
    assert "gate.linear.weight" in trainable and "clip.visual.trunk.blocks.2.attn.v_proj.weight" in trainable
    with pytest.raises(ConfigError, match=r"model.unlocked_blocks: unlocked_blocks must be in 1..4 for "
                                          "EVA02-Tiny-16 \\(4 blocks\\)"):
        distillation_engine(load_config("smoke", [f"model.name={EVA}", "model.unlocked_blocks=5", *TWO_STEPS]),
                setup_distributed("cpu"), tmp_path / "bad")
    with pytest.raises(ConfigError, match="model.unlocked_blocks: must be at least 1 or null, got 0"):
        load_config("smoke", ["model.unlocked_blocks=0"])


@pytest.mark.slow
def test_a_dinov3_vfm_is_one_key(tmp_path):
    """A /16 VFM with registers on a /16 student: the same grid at the same size, prefix tokens dropped."""
    run = tmp_path / "run"
    assert main(["train", "smoke", "vfm.name=vit_small_patch16_dinov3", *TWO_STEPS, f"train.output_dir={run}"]) == 0
    assert (run / "final" / "denserc_config.json").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["loss_coherence"]) for r in records)
    trainer = distillation_engine(load_config("smoke", ["vfm.name=vit_small_patch16_dinov3", *TWO_STEPS]), setup_distributed("cpu"),
                      tmp_path / "inspect")
    vfm, grid = trainer.task.vfm, (64 // trainer.task.student.patch_size,) * 2
    assert (vfm.patch_size, vfm.model.num_prefix_tokens) == (16, 5)  # cls + 4 registers
    pixels = torch.rand(2, 3, 64, 64)
    features = vfm(pixels, grid)
    with torch.no_grad():  # the same size: no resampling, and the 5 prefix tokens dropped
        tokens = vfm.model.forward_features(normalize_images(pixels, vfm.model.pretrained_cfg, white=1.0))
    assert features.shape[:2] == (2, grid[0] * grid[1]) == (2, tokens.shape[1] - 5)
    torch.testing.assert_close(features, tokens[:, 5:])


@pytest.mark.slow
def test_eval_region_and_seg_take_eva_and_siglip_students(tmp_path, capsys):
    templates = write_templates(tmp_path / "templates.txt", "a photo of {article} {}.")
    common = ["--templates", str(templates), "--workers", "0", "--cache-dir", str(tmp_path / "cache"),
              "--no-progress", "--device", "cpu"]
    ids = np.zeros((64, 96), np.int64)
    ids[:, :48], ids[:, 48:] = 1, 2
    label_map = np.where(ids == 1, 0, 80).astype(np.uint8)
    coco = write_panoptic(tmp_path / "coco", [(grey_image(label_map, grey_levels([0, 80])), ids, {1: 0, 2: 80})])
    region = tmp_path / "region.json"
    assert main(["eval", "region", "--model", EVA, "--model", SIGLIP, "--data", str(coco), "--image-size", "96",
                 *common, "--out", str(region)]) == 0
    results = json.loads(region.read_text())["results"]
    assert [r["model"] for r in results] == [EVA, SIGLIP]
    assert all(r["boxes"]["segments"] == 2 and r["masks_stuff"]["segments"] == 1 for r in results)

    levels = grey_levels([0, 3])
    labels = [stripes(112, 128, [0, 3], rows=32)]
    ade = write_segmentation_dataset("ade20k", tmp_path / "ADEChallengeData2016", labels,
                                     [grey_image(label, levels) for label in labels])
    seg = tmp_path / "seg.json"
    assert main(["eval", "seg", "--model", EVA, "--model", SIGLIP, "--data", str(ade), "--short-side", "112",
                 "--window", "112", "--stride", "56", *common, "--out", str(seg)]) == 0
    results = json.loads(seg.read_text())["results"]
    assert [(r["model"], r["num_images"], len(r["per_class"])) for r in results] == [(EVA, 1, 150), (SIGLIP, 1, 150)]


def test_eva_and_vfm_configs_carry_the_peers_recipes():
    """CLIPSelf's/DeCLIP's EVA settings (docs/models.md), with tags and VFM names that really exist."""
    b16, l14 = load_config("eva02_b16_coco"), load_config("eva02_l14_coco")
    assert (b16.model.name, b16.model.unlocked_blocks, b16.data.image_size, b16.optim.lr, b16.optim.weight_decay,
            b16.train.epochs, b16.train.global_batch_size, b16.export.alpha) == ("EVA02-B-16", 12, 1024, 1e-5, 0.1,
                                                                                 6, 16, 0.7)
    assert (l14.model.name, l14.model.unlocked_blocks, l14.data.image_size, l14.train.global_batch_size,
            l14.export.alpha) == ("EVA02-L-14-336", 24, 896, 16, 0.95)
    for config in (b16, l14):
        assert open_clip.get_pretrained_cfg(config.model.name, config.model.pretrained)
    vfms = {name: load_config(name).vfm.name for name in ("vfm_dinov3_b16", "vfm_dinov2_b14")}
    assert vfms == {"vfm_dinov3_b16": "vit_base_patch16_dinov3", "vfm_dinov2_b14": "vit_base_patch14_dinov2"}
    assert all(timm.is_model(name) for name in vfms.values())
