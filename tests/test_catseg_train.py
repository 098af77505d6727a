"""CAT-Seg training on the engine, on testbed scenes: held-out classes, loss going down, exact resume, CLI."""
import json

import pytest
import torch
from safetensors.torch import load_file

from denserc.catseg.config import load_config
from denserc.catseg.task import CATSegTask
from denserc.cli import main
from denserc_testbed import catseg_run
from denserc_testbed.coco import write_split
from denserc_testbed.evaluation import CLASS_NAMES_FILE, prepare_split
from denserc_testbed.vocabulary import CATEGORIES
from denserc.engine import Engine
from denserc.distributed import setup_distributed
from denserc.engine.checkpoint import complete_checkpoints
from denserc.engine.config import ConfigError
from denserc.engine.metrics import read_metrics


@pytest.fixture(scope="module")
def testbed_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("testbed")
    prepare_split(root, 2, seed=5, progress=False)
    write_split(root, catseg_run.TRAIN_SPLIT, 8, seed=7, progress=False)
    return root


def make_config(root, output, *overrides):
    return load_config(catseg_run.CONFIG, [f"data.root={root}", f"data.class_names={root / CLASS_NAMES_FILE}",
                                           f"data.held_out={catseg_run.HELD_OUT}", f"train.output_dir={output}",
                                           "train.global_batch_size=2", "train.batch_size=2", "iterations=4",
                                           "train.log_every=1", "train.checkpoint_every=2", *overrides])


def test_held_out_classes_are_neither_in_the_vocabulary_nor_in_any_training_label(testbed_root, tmp_path):
    task = CATSegTask(make_config(testbed_root, tmp_path, "iterations=8"), setup_distributed("cpu"))
    held_out_names = {CATEGORIES[c]["name"] for c in catseg_run.HELD_OUT}
    assert len(task.class_names) == len(CATEGORIES) - len(catseg_run.HELD_OUT)
    assert not any(name[0].split(" ", 1)[-1] in held_out_names for name in task.class_names)
    assert task.module.tokens.shape[:2] == (len(task.class_names), 4)
    base = task.dataset.base.base  # TrainingCrops -> Repeated (16 draws) -> SegmentationDataset (8 scenes)
    assert len(task.dataset) == 2 * len(base)
    # each draw is augmented afresh: the second draw of every scene gets its own crop, jitter and flip
    assert all(not torch.equal(task.dataset[i]["image"], task.dataset[i + len(base)]["image"])
               for i in range(len(base)))
    assert torch.equal(task.dataset[3]["image"], task.dataset[3]["image"])  # (seed, epoch, draw) fixes it
    held_out_pixels = 0
    for index in range(len(task.dataset)):
        label = task.dataset[index]["label"].long()
        assert set(label.unique().tolist()) <= set(range(len(task.class_names))) | {255}
        original = base[index % len(base)]["label"].long()
        held_out_pixels += sum(int((original == c).sum()) for c in catseg_run.HELD_OUT)
    assert held_out_pixels > 0  # the scenes do contain held-out classes


def test_parameter_groups_follow_cat_seg(testbed_root, tmp_path):
    task = CATSegTask(make_config(testbed_root, tmp_path), setup_distributed("cpu"))
    decay, no_decay, clip = task.parameter_groups(1e-4)
    assert clip["lr"] == pytest.approx(task.config.optim.lr * 0.01) and clip["weight_decay"] == 0.0
    assert len(clip["params"]) == 6 + 3  # in_proj_weight of every image and text block
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    norms = {id(p) for m in task.segmenter.aggregator.modules() if isinstance(m, (torch.nn.LayerNorm,
                                                                                  torch.nn.GroupNorm))
             for p in m.parameters()}
    assert {id(p) for p in no_decay["params"]} == norms
    trainable = {id(p) for p in task.module.parameters() if p.requires_grad}
    assert trainable == {id(p) for group in (decay, no_decay, clip) for p in group["params"]}
    # DDP runs with find_unused_parameters=False: every trainable tensor must get a gradient each step
    batch = task.collate([task.dataset[0]])
    task.module(**task.prepare(batch, epoch=0))["loss"].backward()
    assert all(p.grad is not None for p in task.module.parameters() if p.requires_grad)


@pytest.mark.slow
def test_a_few_testbed_steps_lower_the_loss(testbed_root, tmp_path):
    config = make_config(testbed_root, tmp_path, "iterations=8", "optim.lr=1e-3", "train.checkpoint_every=100")
    env = setup_distributed("cpu")
    Engine(CATSegTask(config, env), config, env, tmp_path).fit()
    losses = [record["loss"] for record in read_metrics(tmp_path)]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2


@pytest.mark.slow
def test_resuming_from_a_checkpoint_equals_the_uninterrupted_run(testbed_root, tmp_path):
    env = setup_distributed("cpu")
    straight_config = make_config(testbed_root, tmp_path / "straight")
    straight = Engine(CATSegTask(straight_config, env), straight_config, env, tmp_path / "straight").fit()
    resumed_config = make_config(testbed_root, tmp_path / "resumed")
    torch.manual_seed(123)  # the resumed run must not depend on the process's random state
    engine = Engine(CATSegTask(resumed_config, env), resumed_config, env, tmp_path / "resumed")
    checkpoints = dict(complete_checkpoints(tmp_path / "straight" / "checkpoints"))
    assert sorted(checkpoints) == [2, 4]
    final = engine.fit(checkpoints[2])
    assert engine.step == 4
    for name in ("catseg_head.safetensors", "clip/open_clip_model.safetensors"):
        expected, actual = load_file(straight / name), load_file(final / name)
        assert expected.keys() == actual.keys()
        differing = {key: float((expected[key] - actual[key]).abs().max()) for key in expected
                     if not torch.equal(expected[key], actual[key])}
        assert not differing, (name, differing)
    checkpoint = load_file(checkpoints[2] / "model.safetensors")
    clip_keys = [key for key in checkpoint if key.startswith("segmenter.clip.")]
    assert len(clip_keys) == 6 + 3 and all(key.endswith("attn.in_proj_weight") for key in clip_keys)
    straight_losses = [r["loss"] for r in read_metrics(tmp_path / "straight")]
    assert [r["loss"] for r in read_metrics(tmp_path / "resumed")] == straight_losses[2:]


@pytest.mark.slow
def test_cli_trains_and_evaluates_end_to_end(testbed_root, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"base: {catseg_run.CONFIG}\niterations: 2\ntrain:\n  global_batch_size: 2\n  batch_size: 2\n")
    assert main(["catseg", "train", str(config), f"data.root={testbed_root}",
                 f"data.class_names={testbed_root / CLASS_NAMES_FILE}", f"train.output_dir={tmp_path / 'run'}"]) == 0
    out = tmp_path / "report.json"
    assert main(["catseg", "eval", "--model", str(tmp_path / "run" / "final"), "--data", str(testbed_root),
                 "--dataset", "testbed", "--class-names", str(testbed_root / CLASS_NAMES_FILE), "--short-side", "128",
                 "--size", "128", "--window", "128", "--overlap", "0", "--workers", "0", "--out", str(out),
                 "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["results"][0]["num_images"] == 2 and len(report["results"][0]["per_class"]) == len(CATEGORIES)
    assert "| model | benchmark | images | mIoU | mAcc | aAcc |" in capsys.readouterr().out


def test_bad_configs_name_the_key(testbed_root, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown config key 'head.widnow'"):
        load_config("catseg_vitb16", ["data.root=/x", "head.widnow=3"])
    with pytest.raises(ConfigError, match="train.epochs must be 1"):
        load_config("catseg_vitb16", ["data.root=/x", "train.epochs=3"])
    with pytest.raises(ConfigError, match=r"data.held_out has class ids \[99\] outside 0..52"):
        CATSegTask(make_config(testbed_root, tmp_path, "data.held_out=[99]"), setup_distributed("cpu"))
    assert main(["catseg", "train", "no_such_config", "data.root=/x"]) == 1
    assert main(["catseg", "eval", "--model", str(tmp_path), "--data", str(testbed_root), "--dataset", "testbed",
                 "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "denserc catseg eval: error: " in err and "is not a CAT-Seg folder: missing catseg_config.json" in err


def test_default_batch_is_one_image_per_forward_accumulated_to_cat_segs_four():
    """CAT-Seg's global batch 4 (4 GPUs x 1 image); one image per forward fits a 24 GB device (docs/segmentation.md)."""
    from denserc.engine.config import accumulation_steps
    for name in ("catseg_vitb16", "catseg_vitl14"):
        train = load_config(name, ["data.root=/data/coco-stuff"]).train
        assert (train.batch_size, train.global_batch_size) == (1, 4)
        assert accumulation_steps(train, 1, "cuda") == 4 and accumulation_steps(train, 4, "cuda") == 1


def test_examples_name_folders_that_a_command_writes():
    """Every runs/NAME/final in the catseg help and configs is what `denserc train NAME` or `denserc catseg train
    NAME` writes (train.output_dir defaults to runs/<config name>)."""
    import re
    from denserc.catseg.cli import EXAMPLES
    from denserc.catseg.defaults import CONFIG_DIR
    from denserc.engine.shipped import available_configs
    from denserc.train.shipped import CONFIG_DIR as TRAINING_CONFIGS
    texts = [EXAMPLES, *(path.read_text() for path in CONFIG_DIR.glob("*.yaml"))]
    named = {name for text in texts for name in re.findall(r"runs/([\w-]+)/final", text)}
    assert named and named <= set(available_configs(TRAINING_CONFIGS)) | set(available_configs(CONFIG_DIR))
