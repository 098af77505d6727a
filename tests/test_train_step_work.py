"""Work the training step leaves out: the VFM and L_coherence when lambda = 0, the gradient norm off logging steps."""
import pytest
import torch

from denserc.train import load_config, setup_distributed
from denserc.engine.metrics import read_metrics

from helpers import distillation_engine

TINY_RUN = ["data.num_images=8", "data.image_size=32", "data.grid_max_cells=2", "train.global_batch_size=2",
        "train.batch_size=2", "train.epochs=1", "optim.warmup_steps=0", "train.precision=fp32",
        "vfm.model_kwargs={depth: 1, embed_dim: 24, num_heads: 2}"]


def make_trainer(tmp_path, *overrides):
    config = load_config("smoke", [*TINY_RUN, *overrides])
    return distillation_engine(config, setup_distributed("cpu"), tmp_path)


def test_without_coherence_weight_no_vfm_is_built_or_run_and_the_loss_is_semantics(tmp_path, monkeypatch):
    def no_vfm(*args, **kwargs):
        raise AssertionError("the VFM was built although loss.coherence_weight is 0")
    monkeypatch.setattr("denserc.train.trainer.VFM", no_vfm)
    monkeypatch.setattr("denserc.losses.coherence_loss", lambda *a: pytest.fail("L_coherence was computed"))
    trainer = make_trainer(tmp_path / "run", "loss.coherence_weight=0", "train.log_every=2")
    assert trainer.task.vfm is None and trainer.task.progress_fields == {"sem": "loss_semantics"}
    trainer.sampler.set_epoch(0)
    batch = next(iter(trainer.loader()))
    with torch.no_grad():
        inputs = trainer.task.prepare(batch, 0)
    assert inputs["vfm_patches"] is None
    losses = trainer.task.module(**inputs)
    assert losses.keys() == {"loss", "loss_semantics"} and torch.equal(losses["loss"], losses["loss_semantics"])

    trainer.fit()
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [2, 4]
    assert all("loss_coherence" not in r and r["loss"] == r["loss_semantics"] for r in records)


def test_with_coherence_weight_the_loss_adds_the_weighted_coherence(tmp_path):
    trainer = make_trainer(tmp_path / "run", "loss.coherence_weight=0.5")
    trainer.sampler.set_epoch(0)
    with torch.no_grad():
        inputs = trainer.task.prepare(next(iter(trainer.loader())), 0)
    assert inputs["vfm_patches"].shape == (2, 4, 24)  # 32 px / 16 = 2 x 2 patches, VFM width 24
    losses = trainer.task.module(**inputs)
    torch.testing.assert_close(losses["loss"], losses["loss_semantics"] + 0.5 * losses["loss_coherence"])


def test_the_gradient_norm_is_measured_on_logging_steps_only_and_the_training_is_the_same(tmp_path):
    every = make_trainer(tmp_path / "every", "train.log_every=1")
    third = make_trainer(tmp_path / "third", "train.log_every=3")
    norms = []
    third.optimizer.register_step_pre_hook(lambda optimizer, *_: norms.append(torch.nn.utils.get_total_norm(
        [p.grad for p in third.trainable if p.grad is not None]).item()))
    every.fit(), third.fit()
    for name, tensor in every.task.student.state_dict().items():
        assert torch.equal(tensor, third.task.student.state_dict()[name]), name

    logged_every, logged_third = read_metrics(tmp_path / "every"), read_metrics(tmp_path / "third")
    assert [r["step"] for r in logged_third] == [3, 4]  # every 3rd step and the last
    assert all("grad_norm" in r for r in logged_every)
    assert [r["grad_norm"] for r in logged_third] == pytest.approx([norms[2], norms[3]], rel=1e-6)
    assert [logged_every[2]["grad_norm"], logged_every[3]["grad_norm"]] == pytest.approx(
        [r["grad_norm"] for r in logged_third], rel=1e-6)
    assert logged_third[0]["loss"] == pytest.approx(sum(r["loss"] for r in logged_every[:3]) / 3, rel=1e-6)


def test_a_step_reports_the_gradient_norm_only_when_asked(tmp_path):
    trainer = make_trainer(tmp_path / "plain")
    trainer.sampler.set_epoch(0)
    batches = iter(trainer.loader())
    assert "grad_norm" not in trainer.train_step([next(batches)], 0)
    assert trainer.train_step([next(batches)], 0, measure_grad_norm=True)["grad_norm"] > 0
