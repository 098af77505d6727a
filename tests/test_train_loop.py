"""The trainer in one process: what trains, the optimizer and schedule, accumulation, checkpoints, export."""
import math

import open_clip
import pytest
import torch
from PIL import Image

import denserc
from denserc.cli import main
from denserc.engine.config import ConfigError
from denserc.train import load_config, setup_distributed
from denserc.engine.checkpoint import complete_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from denserc.engine.metrics import MetricsLogger, read_metrics
from denserc.engine.optim import warmup_cosine
from denserc.engine.sampler import ResumableDistributedSampler

from helpers import distillation_engine

TINY_RUN = ["data.num_images=8", "data.image_size=32", "data.grid_max_cells=2", "train.global_batch_size=2",
        "train.batch_size=2", "train.epochs=1", "optim.warmup_steps=0", "train.log_every=1",
        "vfm.model_kwargs={depth: 1, embed_dim: 24, num_heads: 2}"]


def make_trainer(tmp_path, *overrides):
    config = load_config("smoke", [*TINY_RUN, *overrides])
    return distillation_engine(config, setup_distributed("cpu"), tmp_path / "run")


def capture_gradients(trainer):
    """Gradients of the trainable parameters just before each optimizer step."""
    captured = {}

    def hook(optimizer, args, kwargs):
        captured.update({n: p.grad.clone() for n, p in trainer.task.student.named_parameters() if p.grad is not None})
    trainer.optimizer.register_step_pre_hook(hook)
    return captured


def first_batches(trainer, count):
    trainer.sampler.set_epoch(0)
    batches = iter(trainer.loader())
    return [next(batches) for _ in range(count)]


# ------------------------------------------------------------------------- what trains, and how
def test_only_the_image_tower_and_gate_train_and_off_path_tensors_are_frozen(tmp_path):
    trainer = make_trainer(tmp_path)
    student = trainer.task.student
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    tower = {id(p) for p in student.image_tower_parameters()}
    assert optimised <= tower
    assert not any(p.requires_grad for p in student.clip.transformer.parameters())  # text tower
    assert not any(p.requires_grad for p in trainer.task.teacher.parameters())
    assert not any(p.requires_grad for p in trainer.task.vfm.parameters())
    last = "clip.visual.transformer.resblocks.3."
    assert sorted(trainer.task.frozen_off_path) == sorted(f"{last}{n}" for n in
                                                     ["ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                                                      "mlp.c_proj.weight", "mlp.c_proj.bias"])
    named = dict(student.named_parameters())
    assert optimised == {id(p) for n, p in named.items() if id(p) in tower and n not in trainer.task.frozen_off_path}
    assert id(named["gate.linear.weight"]) in optimised


STEM_AND_HEAD = ["clip.visual.conv1.weight", "clip.visual.class_embedding", "clip.visual.positional_embedding",
                 "clip.visual.ln_pre.weight", "clip.visual.ln_pre.bias", "clip.visual.ln_post.weight",
                 "clip.visual.ln_post.bias", "clip.visual.proj"]


def test_a_run_leaves_stem_ln_post_proj_and_text_tower_bit_identical_in_the_export(tmp_path):
    """The peers' 'what trains' (blocks only; CLIPSelf's VisionTransformer.lock), under their 0.7 export."""
    trainer = make_trainer(tmp_path, "export.alpha=0.7")
    initial = {n: p.detach().clone() for n, p in trainer.task.student.named_parameters()}
    trainable = {n for n, p in trainer.task.student.named_parameters() if p.requires_grad}
    assert not trainable & set(STEM_AND_HEAD)
    assert all(n.startswith(("clip.visual.transformer.resblocks.", "gate.")) for n in trainable)
    exported = denserc.load(trainer.fit())
    after = dict(exported.named_parameters())
    for name in STEM_AND_HEAD + [n for n in initial if n.startswith("clip.") and not n.startswith("clip.visual.")]:
        assert torch.equal(after[name], initial[name]), name
    block = "clip.visual.transformer.resblocks.0.attn.in_proj_weight"
    assert not torch.equal(after[block], initial[block])


def test_train_stem_and_head_trains_the_whole_image_tower(tmp_path):
    trainer = make_trainer(tmp_path, "model.train_stem_and_head=true")
    trainable = {n for n, p in trainer.task.student.named_parameters() if p.requires_grad}
    assert set(STEM_AND_HEAD) <= trainable
    with pytest.raises(ConfigError, match="model.train_stem_and_head=true trains the whole image tower, every block "
                                          "included; model.unlocked_blocks must be null with it, got 2"):
        load_config("smoke", ["model.train_stem_and_head=true", "model.unlocked_blocks=2"])


def test_x_plus_v_uses_the_last_mlp_so_nothing_is_frozen(tmp_path):
    trainer = make_trainer(tmp_path, "model.construction=x+v", "model.gating=none", "model.num_layers=1")
    assert trainer.task.frozen_off_path == []


def test_weight_decay_spares_norms_biases_embeddings_and_the_gate(tmp_path):
    trainer = make_trainer(tmp_path, "model.train_stem_and_head=true")
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in trainer.task.student.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"gate.linear.weight", "gate.linear.bias", "clip.visual.ln_post.weight",
            "clip.visual.class_embedding", "clip.visual.transformer.resblocks.0.attn.in_proj_bias"} <= no_decay_names
    assert all(p.ndim >= 2 and not names[id(p)].startswith("gate.") for p in decay["params"])
    assert "clip.visual.transformer.resblocks.0.attn.in_proj_weight" in {names[id(p)] for p in decay["params"]}


def test_warmup_then_cosine():
    multiplier = warmup_cosine(total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert multiplier(0) == pytest.approx(0.1) and multiplier(4) == pytest.approx(0.5)
    assert multiplier(9) == pytest.approx(1.0) and multiplier(10) == pytest.approx(1.0)
    assert multiplier(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert multiplier(110) == pytest.approx(0.1)
    assert warmup_cosine(100, 0)(0) == pytest.approx(1.0)


def test_accumulating_two_half_batches_gives_the_full_batch_gradient(tmp_path):
    # L_semantics averages over regions: the halves' mean equals the whole's when both halves hold as many
    # grid cells, which the uniform rule's grids of these four images do (3 + 3)
    same_cells = "data.grid_rule=uniform"
    whole = make_trainer(tmp_path, "train.global_batch_size=4", "train.batch_size=4", same_cells)
    halves = make_trainer(tmp_path, "train.global_batch_size=4", "train.batch_size=2", same_cells)
    assert (whole.accumulation, halves.accumulation) == (1, 2)
    micro = first_batches(halves, 2)
    full = {key: torch.cat([m[key] for m in micro]) for key in ("image", "size", "index", "valid", "skipped")}
    assert torch.equal(full["index"], first_batches(whole, 1)[0]["index"])
    whole_gradients, half_gradients = capture_gradients(whole), capture_gradients(halves)
    whole_metrics = whole.train_step([full], epoch=0)
    half_metrics = halves.train_step(micro, epoch=0)
    assert whole_gradients.keys() == half_gradients.keys() and whole_gradients
    for name, gradient in whole_gradients.items():
        torch.testing.assert_close(half_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(half_metrics["loss"], whole_metrics["loss"])


def test_gradient_clipping_caps_the_norm_that_reaches_the_optimizer(tmp_path):
    trainer = make_trainer(tmp_path, "optim.clip_grad_norm=0.001")
    gradients = capture_gradients(trainer)
    metrics = trainer.train_step(first_batches(trainer, 1), epoch=0, measure_grad_norm=True)
    assert metrics["grad_norm"].item() > 0.01  # the logged norm is the one before clipping
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gradients.values()]))
    assert clipped.item() == pytest.approx(0.001, rel=1e-3)


def test_batch_layouts_and_precisions_that_cannot_work_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"global_batch_size=4 is not a multiple of train.batch_size=3"):
        make_trainer(tmp_path, "train.global_batch_size=4", "train.batch_size=3")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        make_trainer(tmp_path, "train.precision=fp16")
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        make_trainer(tmp_path, "train.global_batch_size=16", "train.batch_size=16")
    with pytest.raises(ConfigError, match="not a multiple of the patch size 16"):
        make_trainer(tmp_path, "data.image_size=40")


def test_sampler_deals_each_epoch_once_and_resumes_at_any_position():
    ranks = [ResumableDistributedSampler(10, 8, world_size=2, rank=r, seed=3) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(1)
    dealt = [list(sampler) for sampler in ranks]
    order = ranks[0].order()
    assert len(set(order)) == 8 and sorted(dealt[0] + dealt[1]) == sorted(order)
    assert dealt[0] == order[0::2] and dealt[1] == order[1::2]
    for sampler in ranks:
        sampler.set_epoch(1, start=4)
    assert [list(s) for s in ranks] == [dealt[0][2:], dealt[1][2:]]
    one = ResumableDistributedSampler(10, 8, seed=3)
    one.set_epoch(1, start=4)
    assert sorted(one) == sorted(dealt[0][2:] + dealt[1][2:])  # another world size sees the same rest
    one.set_epoch(2)
    assert one.order() != order
    with pytest.raises(ValueError, match="multiple of world_size"):
        ranks[0].set_epoch(0, start=3)


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoints_publish_atomically_and_keep_the_last_k(tmp_path):
    weights = {"w": torch.arange(4.0)}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, weights, {"step": step}, {"epoch": 0}, keep_last=2)
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [2, 3]
    (tmp_path / "step_000000009").mkdir()  # a folder without its marker is not a checkpoint
    (tmp_path / ".step_000000010.abc.tmp").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_000000003"
    loaded_weights, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert torch.equal(loaded_weights["w"], weights["w"]) and state == {"step": 3}
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step_000000009")


def test_a_failed_write_leaves_the_previous_checkpoints_alone(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, {"step": 1}, {}, keep_last=1)
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(1)}, {"step": 2, "unpicklable": (x for x in ())}, {}, keep_last=1)
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [1]
    assert not list(tmp_path.glob(".step_*"))


def test_metrics_after_the_resumed_step_are_dropped(tmp_path):
    metrics = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        metrics.log(step, {"loss": float(step)})
    metrics.close()
    MetricsLogger(tmp_path, start_step=2).close()
    assert [record["step"] for record in read_metrics(tmp_path)] == [1, 2]


# ------------------------------------------------------------------------------ whole runs
@pytest.mark.slow
def test_smoke_default_lowers_semantics_loss_and_exports_an_open_clip_model(tmp_path):
    """The built-in default config, one epoch of it on a fixed seed."""
    config = load_config("smoke", ["train.epochs=1", "data.num_images=32", "train.log_every=2"])
    torch.manual_seed(config.train.seed)
    initial = denserc.create_model("ViT-Tiny-16")  # the run's initial weights: the text tower must keep them
    final = distillation_engine(config, setup_distributed("cpu"), tmp_path / "smoke").fit()
    records = read_metrics(tmp_path / "smoke")
    semantics = [r["loss_semantics"] for r in records]
    assert len(records) == 2 and all({"loss", "loss_coherence", "lr", "grad_norm"} <= r.keys() for r in records)
    assert semantics[-1] < 0.8 * semantics[0], semantics
    assert all(math.isfinite(r["loss_coherence"]) for r in records)

    model = denserc.load(final)
    assert model.gating == "hsg" and model.gate is not None
    clip = open_clip.create_model("ViT-Tiny-16", pretrained=str(final / "open_clip_model.safetensors"))
    for name, tensor in clip.state_dict().items():
        assert torch.equal(tensor, model.clip.state_dict()[name]), name
    text = {n: t for n, t in clip.state_dict().items() if not n.startswith("visual.")}
    assert all(torch.equal(t, initial.clip.state_dict()[n]) for n, t in text.items())
    visual = {n: t for n, t in clip.state_dict().items() if n.startswith("visual.")}
    blocks = [n for n in visual if n.startswith("visual.transformer.")]
    assert any(not torch.equal(visual[n], initial.clip.state_dict()[n]) for n in blocks)  # the blocks did train
    assert all(torch.equal(t, initial.clip.state_dict()[n]) for n, t in visual.items() if n not in blocks)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(images), model.encode_image(images))
    assert latest_checkpoint(tmp_path / "smoke" / "checkpoints").name == "step_000000004"


@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_export_averages_the_image_tower_with_the_teacher(tmp_path, alpha):
    trainer = make_trainer(tmp_path, f"export.alpha={alpha}")
    with torch.no_grad():
        for parameter in trainer.task.student.visual.parameters():
            parameter.add_(1.0)
    exported = denserc.load(trainer.export())
    teacher = dict(trainer.task.teacher.visual.named_parameters())
    for name, parameter in exported.visual.named_parameters():
        expected = alpha * (teacher[name] + 1.0) + (1 - alpha) * teacher[name]
        torch.testing.assert_close(parameter, expected, msg=name)
    assert torch.equal(exported.gate.linear.weight, trainer.task.student.gate.linear.weight)


def test_a_corrupt_image_is_skipped_and_counted_in_the_log_or_stops_a_strict_run(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(7):
        Image.new("RGB", (40, 30), (30 * index, 0, 0)).save(images / f"{index}.png")
    (images / "7.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    folder = ["data.type=folder", f"data.root={images}"]
    assert main(["train", "smoke", *TINY_RUN, *folder, f"train.output_dir={tmp_path / 'run'}"]) == 0
    records = read_metrics(tmp_path / "run")
    assert len(records) == 4 and records[-1]["skipped_images"] == 1  # every image is visited once
    capsys.readouterr()
    assert main(["train", "smoke", *TINY_RUN, *folder, "data.strict=true", f"train.output_dir={tmp_path / 'strict'}"]) == 1
    error = capsys.readouterr().err
    assert "cannot read image" in error and "7.png" in error and "Traceback" not in error
