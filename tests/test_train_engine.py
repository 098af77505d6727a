"""The training engine on its own, with a toy task: least squares on random points whose samples carry
a variable number of noisy targets (like boxes per image), with dropout so that resuming must restore RNG."""
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from denserc.io import save_tensors
from denserc.engine import Engine, Task, resume_checkpoint
from denserc.distributed import setup_distributed
from denserc.engine.checkpoint import complete_checkpoints
from denserc.engine.config import OptimConfig, TrainConfig
from denserc.engine.metrics import read_metrics

DIM = 6
NUM_POINTS = 40  # 5 steps of 8 per epoch, 50 steps in all
STEPS = 50


@dataclass
class ToyConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=10, global_batch_size=8, batch_size=4, precision="fp32", device="cpu", log_every=1,
        checkpoint_every=8, keep_last=2))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.1, weight_decay=0.0, warmup_steps=2))
    dropout: float = 0.02


class Points(torch.utils.data.Dataset):
    """Sample i: a point x and 1 + i % 3 noisy observations of <w, x> for a fixed w."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        weight = torch.linspace(-1.0, 1.0, DIM)
        self.x = torch.randn(NUM_POINTS, DIM, generator=generator)
        self.targets = [self.x[i] @ weight + 0.01 * torch.randn(1 + i % 3, generator=generator)
                        for i in range(NUM_POINTS)]

    def __len__(self):
        return NUM_POINTS

    def __getitem__(self, index):
        return {"x": self.x[index], "targets": self.targets[index]}


class Regressor(nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(DIM, 1)

    def forward(self, x, targets):
        """Mean over samples of each sample's mean squared error (so micro-batch means average exactly)."""
        prediction = self.linear(self.dropout(x)).squeeze(1)
        errors = torch.stack([((p - t) ** 2).mean() for p, t in zip(prediction, targets)])
        return {"loss": errors.mean(), "worst_sample": errors.max()}


class Killed(Exception):
    """Stands in for SIGKILL: the run stops between two checkpoints."""


class RegressionTask(Task):
    progress_fields = {"mse": "loss"}

    def __init__(self, config: ToyConfig, crash_at_micro_batch: int | None = None):
        torch.manual_seed(config.train.seed)
        self.module = Regressor(config.dropout)
        self.dataset = Points()
        self.micro_batches = 0
        self.crash_at = crash_at_micro_batch

    def collate(self, samples):
        return {"x": torch.stack([s["x"] for s in samples]), "targets": [s["targets"] for s in samples]}

    def prepare(self, batch, epoch):
        self.micro_batches += 1
        if self.micro_batches == self.crash_at:
            raise Killed(f"killed at micro-batch {self.crash_at}")
        return batch

    def count(self, batch):
        return {"targets_seen": sum(len(t) for t in batch["targets"])}

    def export(self, folder):
        save_tensors(self.module.state_dict(), folder / "regressor.safetensors")


def make_engine(output_dir, config=None, **task_options):
    config = config or ToyConfig()
    return Engine(RegressionTask(config, **task_options), config, setup_distributed("cpu"), output_dir)


def test_loss_falls_and_the_task_exports_its_weights(tmp_path):
    engine = make_engine(tmp_path / "run")
    assert (engine.accumulation, engine.steps_per_epoch, engine.total_steps) == (2, 5, STEPS)
    final = engine.fit()
    records = read_metrics(tmp_path / "run")
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert sum(losses[-5:]) < 0.1 * sum(losses[:5]), losses
    assert {"loss", "worst_sample", "grad_norm", "lr", "images_per_second", "epoch"} <= records[0].keys()
    targets_per_epoch = sum(1 + i % 3 for i in range(NUM_POINTS))
    assert records[-1]["targets_seen"] == 10 * targets_per_epoch  # counted once per sample, all epochs
    exported = load_file(final / "regressor.safetensors")
    assert all(torch.equal(t, engine.task.module.state_dict()[n]) for n, t in exported.items())
    assert "dropout: 0.02" in (tmp_path / "run" / "config.yaml").read_text()
    assert [step for step, _ in complete_checkpoints(tmp_path / "run" / "checkpoints")] == [48, 50]


def test_resuming_after_a_crash_mid_epoch_equals_the_uninterrupted_run(tmp_path):
    env = setup_distributed("cpu")
    straight = make_engine(tmp_path / "straight").fit()
    with pytest.raises(Killed):  # killed in step 9: epoch 1, after the checkpoint of step 8
        make_engine(tmp_path / "crashed", crash_at_micro_batch=2 * 8 + 1).fit()
    assert [step for step, _ in complete_checkpoints(tmp_path / "crashed" / "checkpoints")] == [5, 8]
    torch.manual_seed(123)  # the resumed run must not depend on the state the process happens to be in
    resumed = make_engine(tmp_path / "crashed")
    resumed_final = resumed.fit(resume_checkpoint(tmp_path / "crashed", "auto", env))
    assert (resumed.step, resumed.epoch) == (STEPS, 10)

    expected, actual = load_file(straight / "regressor.safetensors"), load_file(resumed_final / "regressor.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[n], actual[n]) for n in expected)
    straight_records, resumed_records = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "crashed")
    assert [r["step"] for r in resumed_records] == list(range(1, STEPS + 1))
    for a, b in zip(straight_records, resumed_records):
        assert (a["loss"], a["worst_sample"], a["lr"], a["targets_seen"]) == \
            (b["loss"], b["worst_sample"], b["lr"], b["targets_seen"]), a["step"]


def capture_gradients(engine):
    captured = {}
    engine.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: captured.update(
        {n: p.grad.clone() for n, p in engine.task.module.named_parameters()}))
    return captured


def test_accumulated_micro_batches_equal_one_large_batch(tmp_path):
    config = ToyConfig(dropout=0.0)
    whole = make_engine(tmp_path / "whole", ToyConfig(train=TrainConfig(global_batch_size=8, batch_size=8,
                                                                          precision="fp32"), dropout=0.0))
    halves = make_engine(tmp_path / "halves", config)
    assert (whole.accumulation, halves.accumulation) == (1, 2)
    halves.sampler.set_epoch(0)
    micro = list(halves.loader())[:2]
    full = {"x": torch.cat([m["x"] for m in micro]), "targets": micro[0]["targets"] + micro[1]["targets"]}
    whole_gradients, half_gradients = capture_gradients(whole), capture_gradients(halves)
    whole_metrics = whole.train_step([full], epoch=0)
    half_metrics = halves.train_step(micro, epoch=0)
    assert whole_gradients.keys() == half_gradients.keys() == {"linear.weight", "linear.bias"}
    for name, gradient in whole_gradients.items():
        torch.testing.assert_close(half_gradients[name], gradient, rtol=1e-6, atol=1e-7, msg=name)
        assert gradient.abs().sum() > 0
    torch.testing.assert_close(half_metrics["loss"], whole_metrics["loss"])
    torch.testing.assert_close(halves.task.module.linear.weight, whole.task.module.linear.weight)


def test_max_steps_stops_early_with_a_checkpoint_and_the_same_schedule(tmp_path):
    """``train.max_steps``: a quick check stops after N steps (checkpoint and export) on the full run's schedule,
    and resuming without it continues to the end as if it had never stopped."""
    straight = make_engine(tmp_path / "straight")
    expected = load_file(straight.fit() / "regressor.safetensors")
    short_config = ToyConfig()
    short_config.train.max_steps = 12  # mid-epoch (5 steps an epoch), off the checkpoint interval of 8
    short = make_engine(tmp_path / "short", short_config)
    exported = short.fit()
    assert short.step == 12 and exported.is_dir()
    assert [r["step"] for r in read_metrics(tmp_path / "short")][-1] == 12
    assert complete_checkpoints(tmp_path / "short" / "checkpoints")[-1][0] == 12
    resumed = make_engine(tmp_path / "short")
    final = resumed.fit(resume_checkpoint(tmp_path / "short", "auto", setup_distributed("cpu")))
    assert resumed.step == STEPS
    actual = load_file(final / "regressor.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
