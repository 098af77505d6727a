"""``data.teacher_crops: source``: the teacher's crops cut by the loader from the source image, as the peers cut them.

The peers' computation is written anew here from its lines: CLIPSelf (``wusize/CLIPSelf`` @1c7fe9c)
src/training/data.py ``GridDistillDataset._init_boxes`` (lines 210-224: the normalised grid template of a
(M, N) choice), ``_obtain_image_crops`` (lines 226-245: template x source size, ``image.crop((x0, y0, x1, y1))``
on the source PIL image, ``self.transforms[1]``), ``ProposalDistillDataset.__getitem__`` (lines 107-118: the
proposal enlarged 1.5x about its centre, clipped to the source image), and its crop preprocess
``ResizeMaxSize(224, fill=0)`` (src/open_clip/transform.py lines 26-49) + ``_convert_to_rgb``, ``ToTensor``,
``Normalize(mean, std)`` (lines 119-132, ``preprocess_val_img`` in src/open_clip/factory.py lines 319-325).
DeCLIP (``xiaomoguhz/DeCLIP`` @2c0b3de) src/training/data.py lines 261-280 and 133 and
src/open_clip/transform.py lines 24-47 are the same code.
"""
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode

from denserc.data import LetterboxResize, RegionDraw
from denserc.engine import resume_checkpoint
from denserc.engine.config import ConfigError
from denserc.engine.metrics import read_metrics
from denserc.engine.sampler import ResumableDistributedSampler
from denserc.train import load_config, setup_distributed

from helpers import distillation_engine

SOURCE_W, SOURCE_H = 300, 200  # non-square, and not the input size
INPUT = 64  # data.image_size: the valid area of the source is 64 x 43
RUN = ["data.type=folder", "data.image_size=64", "data.num_workers=0", "train.global_batch_size=2",
       "train.batch_size=2", "train.epochs=1", "optim.warmup_steps=0", "train.log_every=1",
       "vfm.model_kwargs={depth: 1, embed_dim: 24, num_heads: 2}"]


# ------------------------------------------------------------------------ the peers' computation, anew
def peer_resize_max_size(img, max_size, fill=0):
    """CLIPSelf src/open_clip/transform.py lines 37-49, ``ResizeMaxSize.forward`` (PIL input)."""
    width, height = img.size
    scale = max_size / float(max(height, width))
    new_size = tuple(round(dim * scale) for dim in (height, width))
    img = TF.resize(img, new_size, InterpolationMode.BICUBIC)
    pad_h = max_size - new_size[0]
    pad_w = max_size - new_size[1]
    return TF.pad(img, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=fill)


def peer_crop_preprocess(img, size, mean, std):
    """``preprocess_val_img``: ResizeMaxSize(size, fill=0), _convert_to_rgb, ToTensor, Normalize."""
    tensor = TF.to_tensor(peer_resize_max_size(img, size).convert("RGB"))
    return TF.normalize(tensor, mean, std)


def peer_grid_template(m, n):
    """CLIPSelf ``_init_boxes`` (lines 214-219) for one choice (M, N): (M*N, 4) normalised boxes, row-major."""
    grid_x, grid_y = torch.meshgrid(torch.linspace(0, 1, n + 1), torch.linspace(0, 1, m + 1), indexing="xy")
    x0y0s = torch.stack([grid_x[:m, :n], grid_y[:m, :n]], dim=-1)
    x1y1s = torch.stack([grid_x[1:, 1:], grid_y[1:, 1:]], dim=-1)
    return torch.cat([x0y0s, x1y1s], dim=-1).view(-1, 4)


def peer_grid_crops(image, cells, valid_hw, size, mean, std):
    """The peers' crops of the same grid cells: (M, N) and each cell's place read off our input-pixel boxes."""
    height, width = valid_hw
    img_w, img_h = image.size
    crops = []
    for x1, y1, x2, y2 in cells.tolist():
        n, m = round(width / (x2 - x1)), round(height / (y2 - y1))
        column, row = round(x1 / (width / n)), round(y1 / (height / m))
        boxes = peer_grid_template(m, n) * torch.tensor([img_w, img_h, img_w, img_h])  # line 233
        x0, y0, x1_, y1_ = boxes[row * n + column].tolist()
        crops.append(peer_crop_preprocess(image.crop((x0, y0, x1_, y1_)), size, mean, std))  # line 243
    return torch.stack(crops)


def synthetic_image(width=SOURCE_W, height=SOURCE_H, seed=0):
    """Smooth ramps plus noise: resampling differences show, and no two crops are alike."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    base = torch.stack([xs * 255 / width, ys * 255 / height, (xs + ys) % 97 * 2.5])
    noisy = base + torch.randint(-40, 41, base.shape, generator=generator)
    return Image.fromarray(noisy.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def folder(tmp_path, count=2):
    root = tmp_path / "images"
    root.mkdir()
    for index in range(count):
        synthetic_image(seed=index).save(root / f"{index}.png")  # lossless
    return root


def engine(tmp_path, root, mode, *overrides, name="run"):
    config = load_config("smoke", [*RUN, f"data.root={root}", f"data.teacher_crops={mode}", *overrides])
    return distillation_engine(config, setup_distributed("cpu"), tmp_path / name)


def batch_at(trainer, epoch):
    trainer.sampler.set_epoch(epoch)
    return next(iter(trainer.loader()))


# ------------------------------------------------------------------------------------------ parity
def test_letterbox_resize_is_the_peers_resize_max_size():
    for width, height, size in [(300, 200, 224), (7, 31, 224), (224, 224, 224), (500, 9, 64), (41, 40, 16)]:
        image = synthetic_image(width, height, seed=width)
        ours = LetterboxResize((size, size))(image)
        theirs = TF.pil_to_tensor(peer_resize_max_size(image, size))
        assert torch.equal(ours, theirs), (width, height, size)
    # a side that rounds to 0 stays one pixel (the peers' resize raises there)
    assert LetterboxResize((64, 64))(synthetic_image(500, 3)).shape == (3, 64, 64)


def test_the_teacher_gets_the_peers_crops_of_the_source_image(tmp_path):
    root = folder(tmp_path)
    trainer = engine(tmp_path, root, "source", "train.seed=3")
    task = trainer.task
    assert task.keys_with_epoch and trainer.sampler.with_epoch
    cfg = task.student.preprocess_cfg
    size = task.teacher.native_size[0]
    for epoch in (0, 1):
        batch = batch_at(trainer, epoch)
        _, _, boxes, crops = task.images_and_grids(batch, epoch)
        assert crops.shape == (sum(len(b) for b in boxes), 3, size, size)
        expected = []
        for index, cells, valid_hw in zip(batch["index"].tolist(), boxes, batch["size"].tolist()):
            assert valid_hw == [43, 64]
            with Image.open(root / f"{index}.png") as image:
                expected.append(peer_grid_crops(image.convert("RGB"), cells, valid_hw, size, cfg["mean"], cfg["std"]))
        # same pixels (uint8 from the loader) and the same normalisation arithmetic (ToTensor, Normalize)
        assert torch.equal(crops, torch.cat(expected))
        torch.testing.assert_close(task.embed_crops(None, crops), task.teacher.embed(torch.cat(expected)))


def test_proposal_crops_are_the_peers_enlarged_crops_of_the_source_image(tmp_path):
    root = folder(tmp_path, count=1)
    proposals = [[13.3, 21.7, 80.2, 60.4], [150.6, 90.1, 120.0, 100.3], [0.4, 0.2, 299.1, 199.4]]
    path = tmp_path / "proposals.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "0.png", "width": SOURCE_W, "height": SOURCE_H}],
        "annotations": [{"id": k, "image_id": 1, "bbox": box} for k, box in enumerate(proposals)]}))
    overrides = ["data.type=proposals", f"data.annotations={path}", "train.global_batch_size=1", "train.batch_size=1"]
    trainer = engine(tmp_path, root, "source", *overrides)
    cfg, size = trainer.task.student.preprocess_cfg, trainer.task.teacher.native_size[0]
    batch = batch_at(trainer, 0)
    _, _, boxes, crops = trainer.task.images_and_grids(batch, 0)
    expected = []
    with Image.open(root / "0.png") as image:
        old_image = image.convert("RGB")
        img_w, img_h = old_image.width, old_image.height
        for x1, _, _, _ in boxes[0].tolist():  # the draw's order; each box is one proposal, scaled to the input
            x, y, w, h = min(proposals, key=lambda p: abs(p[0] * INPUT / SOURCE_W - x1))
            cx, cy = x + w * 0.5, y + h * 0.5  # CLIPSelf src/training/data.py lines 115-117
            x0, y0, x1_, y1_ = max(cx - w * 0.75, 0), max(cy - h * 0.75, 0), min(cx + w * 0.75, img_w), \
                min(cy + h * 0.75, img_h)
            expected.append(peer_crop_preprocess(old_image.crop((x0, y0, x1_, y1_)), size, cfg["mean"], cfg["std"]))
    assert len(expected) == 3
    assert torch.equal(crops, torch.stack(expected))


# ------------------------------------------------------------------------- the same draws, any loader
def test_source_mode_draws_the_boxes_of_batch_mode_for_each_seed_epoch_and_index(tmp_path):
    root = folder(tmp_path, count=4)
    batch_mode = engine(tmp_path, root, "batch", "train.seed=5", name="batch").task
    source_mode = engine(tmp_path, root, "source", "train.seed=5", "train.global_batch_size=4", "train.batch_size=4",
                         "data.num_workers=1", name="source")
    sampler = source_mode.sampler
    dataset, collate = source_mode.task.dataset, source_mode.task.collate
    # a persistent worker keeps its copy of the dataset across epochs: the epoch must come with the keys
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=collate, num_workers=1,
                        persistent_workers=True)
    drawn = {}
    for epoch in (0, 1, 2):
        sampler.set_epoch(epoch)
        for batch in loader:
            expected, _ = batch_mode.regions(batch["index"], batch["size"], epoch)
            for index, boxes, wanted in zip(batch["index"].tolist(), batch["boxes"], expected):
                assert torch.equal(boxes, wanted), (epoch, index)
                drawn[epoch, index] = boxes
        # batch mode's own path draws them too (prepare's boxes)
        _, _, batch_boxes, _ = batch_mode.images_and_grids(batch, epoch)
        assert all(torch.equal(a, b) for a, b in zip(batch_boxes, batch["boxes"]))
    assert any(not torch.equal(drawn[0, i], drawn[1, i]) or not torch.equal(drawn[1, i], drawn[2, i]) for i in range(4))
    # the engine's own loader (one worker, not persistent) hands the same samples
    sampler.set_epoch(1)
    for batch in source_mode.loader():
        assert all(torch.equal(b, drawn[1, i]) for i, b in zip(batch["index"].tolist(), batch["boxes"]))
    # what a worker started by spawn receives: the dataset and the collate function pickle, without the task
    copy, collate_copy = pickle.loads(pickle.dumps((dataset, collate)))
    assert torch.equal(collate_copy([copy[2, 3]])["boxes"][0], drawn[2, 3])


def test_the_sampler_deals_epoch_index_pairs_from_any_position():
    plain = ResumableDistributedSampler(10, 8, world_size=2, rank=1, seed=3)
    paired = ResumableDistributedSampler(10, 8, world_size=2, rank=1, seed=3, with_epoch=True)
    for sampler in (plain, paired):
        sampler.set_epoch(4, start=2)
    assert list(paired) == [(4, index) for index in plain] and len(paired) == len(plain) == 3


def test_a_dataset_of_source_crops_refuses_a_bare_index(tmp_path):
    trainer = engine(tmp_path, folder(tmp_path, count=2), "source")
    with pytest.raises(TypeError, match=r"indexed by \(epoch, index\) pairs"):
        trainer.task.dataset[0]


def test_an_unknown_teacher_crops_value_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"data.teacher_crops: must be one of \['batch', 'source'\], got 'roi'"):
        load_config("smoke", ["data.teacher_crops=roi"])


# ------------------------------------------------------------------------------- training end to end
def test_source_mode_trains_and_resumes_mid_epoch_to_the_same_weights(tmp_path):
    root = folder(tmp_path, count=6)
    schedule = ["train.epochs=2", "train.checkpoint_every=2", "train.keep_last=2", "data.grid_max_cells=3"]
    straight = engine(tmp_path, root, "source", *schedule, name="straight").fit()
    stopped = engine(tmp_path, root, "source", *schedule, "train.max_steps=4", name="resumed")
    stopped.fit()  # 3 steps per epoch: stops inside epoch 1 with a checkpoint of step 4
    assert (stopped.step, stopped.epoch, stopped.samples_done) == (4, 1, 2)
    env = setup_distributed("cpu")
    torch.manual_seed(123)  # the resumed run must not depend on the state the process happens to be in
    resumed = engine(tmp_path, root, "source", *schedule, "data.num_workers=1", name="resumed")  # and workers
    final = resumed.fit(resume_checkpoint(tmp_path / "resumed", "auto", env))
    assert resumed.step == 6
    expected, actual = (load_file(folder_ / "open_clip_model.safetensors") for folder_ in (straight, final))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    records = read_metrics(tmp_path / "straight")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [r["loss"] for r in records] == [r["loss"] for r in read_metrics(tmp_path / "resumed")]


# A 2-process torchrun launch: each rank saves its first batch of epoch 1, then runs the command line.
DDP_WORKER = textwrap.dedent("""
    import sys
    import torch
    from denserc.cli import main
    from denserc.engine.loop import Engine
    from denserc.train import load_config, setup_distributed
    from denserc.train.trainer import DistillationTask

    output, command = sys.argv[1], sys.argv[2:]
    env = setup_distributed("cpu")
    config = load_config("smoke", [a for a in command[2:] if not a.startswith("train.output_dir=")])
    trainer = Engine(DistillationTask(config, env), config, env, output)
    trainer.sampler.set_epoch(1)
    batch = next(iter(trainer.loader()))
    torch.save({key: batch[key] for key in ("index", "size", "boxes")}, f"{output}/rank{env.rank}.pt")
    sys.exit(main(command))
""")


@pytest.mark.slow  # a 2-process torchrun launch
def test_under_ddp_with_workers_each_rank_gets_the_draws_of_its_own_images(tmp_path):
    root = folder(tmp_path, count=8)
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    command = ["train", "smoke", *RUN, f"data.root={root}", "data.teacher_crops=source", "data.num_workers=1",
               "train.seed=7", "train.global_batch_size=4", "train.epochs=2", f"train.output_dir={tmp_path / 'run'}"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(tmp_path), *command], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert set(ranks[0]["index"].tolist()).isdisjoint(ranks[1]["index"].tolist())
    draw = RegionDraw(seed=7)  # the smoke config's grid settings
    for rank in ranks:
        expected, _ = draw(rank["index"], rank["size"], 1)
        assert all(torch.equal(a, b) for a, b in zip(rank["boxes"], expected))
    assert (tmp_path / "run" / "final" / "open_clip_model.safetensors").is_file()
