"""Detection training on the engine: exact resume after a crash, and learning the testbed's base classes."""
import pytest
import torch
from safetensors.torch import load_file

from denserc.detect import load
from denserc.detect.config import load_detect_config
from denserc.detect.validation import evaluate_detector
from denserc.detect.task import DetectionTask
from denserc_testbed import write_split
from denserc_testbed.detection import PROTOCOL
from denserc.engine import Engine, resume_checkpoint
from denserc.distributed import setup_distributed
from denserc.engine.checkpoint import complete_checkpoints

SMALL = ["detector.rpn_pre_nms=100", "detector.rpn_post_nms=50", "detector.roi_samples=16", "train.log_every=1",
         "optim.warmup_steps=2", "train.keep_last=5"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("testbed_detect")
    write_split(root, "train", 12, seed=5, progress=False)
    write_split(root, "val", 8, seed=6, progress=False)
    return [f"data.train_annotations={root}/annotations/instances_train.json", f"data.train_images={root}/train",
            f"data.val_annotations={root}/annotations/instances_val.json", f"data.val_images={root}/val"]


class Killed(Exception):
    """Stands in for SIGKILL between two checkpoints."""


class CrashingTask(DetectionTask):
    def __init__(self, config, env, crash_at_micro_batch=None):
        super().__init__(config, env)
        self.micro_batches = 0
        self.crash_at = crash_at_micro_batch

    def prepare(self, batch, epoch):
        self.micro_batches += 1
        if self.micro_batches == self.crash_at:
            raise Killed
        return super().prepare(batch, epoch)


@pytest.mark.slow
def test_resuming_detection_training_after_a_crash_equals_the_uninterrupted_run(scenes, tmp_path):
    env = setup_distributed("cpu")
    config = load_detect_config("fvit_testbed", [*scenes, *SMALL, "train.epochs=2", "train.global_batch_size=4",
                                                 "train.batch_size=2", "train.checkpoint_every=1"])

    def engine(folder, **options):
        return Engine(CrashingTask(config, env, **options), config, env, folder)

    first = engine(tmp_path / "straight")
    per_epoch = first.steps_per_epoch  # images with a base box / 4, each step 2 micro-batches of 2
    straight = first.fit()
    with pytest.raises(Killed):  # in the second step of epoch 1, after the checkpoint of its first step
        engine(tmp_path / "crashed", crash_at_micro_batch=2 * (per_epoch + 1) + 1).fit()
    assert complete_checkpoints(tmp_path / "crashed" / "checkpoints")[-1][0] == per_epoch + 1
    torch.manual_seed(123)
    resumed = engine(tmp_path / "crashed")
    final = resumed.fit(resume_checkpoint(tmp_path / "crashed", "auto", env))
    assert resumed.step == 2 * per_epoch >= 4
    expected, actual = load_file(straight / "heads.safetensors"), load_file(final / "heads.safetensors")
    assert expected.keys() == actual.keys()
    changed = [n for n in expected if not torch.equal(expected[n], actual[n])]
    assert not changed, changed
    initial = CrashingTask(config, env).module.state_dict()
    assert not torch.equal(initial["roi_heads.box_predictor.temperature"],
                           expected["roi_heads.box_predictor.temperature"])  # it did train
    assert torch.equal(initial["roi_heads.box_predictor.background"],
                       expected["roi_heads.box_predictor.background"])  # the text "background" stays fixed


BASE_AP50_FLOOR = 1.0  # measured 10.66 (the same detector untrained: 0.0)


@pytest.mark.slow
def test_detector_learns_the_testbed_base_classes(tmp_path_factory):
    """42 steps (2 epochs of the 170 scenes with a base box) of fvit_testbed: base AP50 on 32 held-out
    scenes measured 10.66 on this project's CPU with the fixed "background" embedding and the peer's ImageNet
    input normalisation (2.08 before both), 0.0 with the heads untrained; the floor stays at 1.0."""
    root = tmp_path_factory.mktemp("testbed_learn")
    write_split(root, "train", 192, seed=7, progress=False)
    write_split(root, "val", 32, seed=8, progress=False)
    config = load_detect_config("fvit_testbed", [
        f"data.train_annotations={root}/annotations/instances_train.json", f"data.train_images={root}/train",
        "train.epochs=2", "optim.warmup_steps=5", "train.checkpoint_every=1000", "train.log_every=8"])
    env = setup_distributed("cpu")
    final = Engine(DetectionTask(config, env), config, env, tmp_path_factory.mktemp("run")).fit()
    report, _ = evaluate_detector(load(final), root / "annotations" / "instances_val.json", root / "val", PROTOCOL,
                                  progress=False)
    assert report["ap50_base"] > BASE_AP50_FLOOR
