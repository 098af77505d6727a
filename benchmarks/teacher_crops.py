"""How far apart the teacher's targets are when its crops are cut from the batch or from the source image.

Builds the distillation task of a config twice, ``data.teacher_crops=batch`` and ``=source`` (same seed, so
the same teacher and the same regions), takes the first ``--images`` samples of epoch 0 and compares, cell
by cell, the crops the teacher sees (mean absolute difference in 0..255 levels, the letterbox padding
included) and its embeddings (cosine). Overrides go to both builds, e.g. ``data.image_size=256`` trains the
testbed's 128-px scenes at twice their size, as COCO's 640-px photos are trained at 1024.

    python -m benchmarks.teacher_crops --config testbed --images 64
    python -m benchmarks.teacher_crops --config testbed --images 64 data.image_size=256
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from denserc.engine.loop import Engine
from denserc.train import load_config, setup_distributed
from denserc.train.trainer import DistillationTask

from .common import markdown_table


def teacher_inputs(task: DistillationTask, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised crops the teacher embeds, their L2-normalised embeddings) for one batch, either mode."""
    _, images, _, crops = task.images_and_grids(batch, 0)
    if not task.source_crops:
        from denserc.train.teacher import letterbox_crops
        crops = letterbox_crops(images, crops, task.teacher.native_size, task.teacher.black)
    return crops, task.teacher.embed(crops)


def compare(config_name: str, overrides: list[str], images: int, batch_size: int) -> dict:
    env = setup_distributed("cpu")
    levels, cosines = [], []
    loaders = []
    with tempfile.TemporaryDirectory() as scratch:
        for mode in ("batch", "source"):
            config = load_config(config_name, [*overrides, f"data.teacher_crops={mode}", "data.num_workers=0",
                                               f"train.batch_size={batch_size}",
                                               f"train.global_batch_size={batch_size}"])
            engine = Engine(DistillationTask(config, env), config, env, f"{scratch}/{mode}")
            engine.sampler.set_epoch(0)
            loaders.append((engine.task, iter(engine.loader())))
        std = torch.tensor(loaders[0][0].student.preprocess_cfg["std"]).view(1, 3, 1, 1) * 255
        seen = 0
        with torch.no_grad():
            while seen < images:
                (task_b, batches_b), (task_s, batches_s) = loaders
                batch_b, batch_s = next(batches_b), next(batches_s)
                assert torch.equal(batch_b["index"], batch_s["index"])
                crops_b, embeddings_b = teacher_inputs(task_b, batch_b)
                crops_s, embeddings_s = teacher_inputs(task_s, batch_s)
                levels.append(((crops_b - crops_s).abs() * std).flatten(1).mean(1))
                cosines.append((embeddings_b * embeddings_s).sum(-1))
                seen += len(batch_b["index"])
    levels, cosines = torch.cat(levels), torch.cat(cosines)
    return {"images": seen, "crops": len(cosines), "levels": levels.mean().item(),
            "cos_mean": cosines.mean().item(), "cos_p5": torch.quantile(cosines, 0.05).item(),
            "cos_min": cosines.min().item()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.teacher_crops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="testbed")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = compare(args.config, args.overrides, args.images, args.batch)
    print(f"config {args.config} {' '.join(args.overrides)}: {result['images']} images, {result['crops']} crops\n")
    print(markdown_table(("crop |batch - source|, 0..255 levels", "teacher cos mean", "cos 5th pct", "cos min"),
                         [(f"{result['levels']:.2f}", f"{result['cos_mean']:.4f}", f"{result['cos_p5']:.4f}",
                           f"{result['cos_min']:.4f}")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
