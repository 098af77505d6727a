"""Data loading: images/s of DenseRC's training dataset at 1024 px through a DataLoader with N workers.

The dataset is the trainer's own (``build_source`` for an image folder + ``TrainingImages`` +
``SquareResize``), fed to a ``DataLoader`` with the trainer's arguments (batch size, workers,
``pin_memory`` on CUDA, ``drop_last``). Unless ``--root`` names a real folder (e.g. COCO
train2017), COCO-like JPEGs (640x480, quality 90, smooth content plus sensor-like noise) are
written to a temporary folder first; either way the files are read once before timing, so the
numbers are decode + resize + collate, not disk. A per-image split (decode vs resize) in this
process says where a worker's time goes. ``--teacher-crops source`` adds what ``data.teacher_crops: source``
(the real-data configs) asks of the loader: each image's grid (CLIPSelf's rule, at most 20 cells) cut from the
source image and letterboxed to ``--crop-size`` (``data.regions.SourceCrops``).

    python -m benchmarks.data_loading --workers 0 1 2
    python -m benchmarks.data_loading --workers 0 1 2 --teacher-crops source
    python -m benchmarks.data_loading --root /data/coco/train2017 --workers 4 8 16 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from denserc.data import (ASPECT_MODES, TEACHER_CROPS, RegionDraw, SourceCrops, SquareResize, TrainingImages,
                          build_source, collate_regions, list_images)
from denserc.train.config import DataConfig

from .common import add_common_arguments, environment, markdown_table, setup

TRAINING_TARGET_IMAGES_PER_SECOND = 50  # what one H100 consumes at the ViT-B/16 @1024 target


def write_jpegs(folder: Path, count: int, width: int, height: int, seed: int = 0) -> list[Path]:
    """``count`` COCO-like JPEGs: a smooth random colour field plus per-pixel noise, quality 90."""
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for index in range(count):
        coarse = torch.rand(1, 3, height // 16, width // 16, generator=generator) * 255
        smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
        noisy = smooth[0] + torch.randn(3, height, width, generator=generator) * 8
        pixels = noisy.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        path = folder / f"{index:06d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def folder_dataset(root: Path, size: int, aspect: str, teacher_crops: str = "batch",
                   crop_size: int = 224) -> TrainingImages:
    """The trainer's dataset over an image folder: ``build_source`` + ``TrainingImages`` + ``SquareResize``
    (+ ``SourceCrops`` of the default grid draw for ``teacher_crops="source"``)."""
    crops = SourceCrops(RegionDraw(seed=0), (crop_size, crop_size)) if teacher_crops == "source" else None
    return TrainingImages(build_source(DataConfig(type="folder", root=str(root))), SquareResize(size, aspect),
                          crops=crops)


def key(dataset: TrainingImages, index: int):
    """What the engine's sampler deals for ``index`` (epoch 0): the index, or (0, index) with source crops."""
    return index if dataset.crops is None else (0, index)


def per_sample_split(dataset: TrainingImages, files: list[Path], size: int) -> tuple[float, float, float]:
    """Median ms, in this process, of one whole sample (``dataset[i]``), of decoding and of the resize."""
    sample, decode, resize = [], [], []
    for index, path in enumerate(files):
        start = time.perf_counter()
        dataset[key(dataset, index)]
        sample.append(time.perf_counter() - start)
        start = time.perf_counter()
        with Image.open(path) as image:
            image = image.convert("RGB")
        middle = time.perf_counter()
        image.resize((size, size), Image.Resampling.BICUBIC)
        decode.append(middle - start)
        resize.append(time.perf_counter() - middle)
    return tuple(1000 * statistics.median(times) for times in (sample, decode, resize))


def loader_throughput(dataset: TrainingImages, *, workers: int, batch: int, samples: int,
                      device: torch.device) -> tuple[float, float]:
    """(seconds to the first batch, steady images/s after it) for one pass over ``samples`` samples."""
    order = [key(dataset, i % len(dataset)) for i in range(samples)]
    loader = DataLoader(dataset, batch_size=batch, sampler=order, num_workers=workers,
                        collate_fn=collate_regions, pin_memory=device.type == "cuda", drop_last=True)
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter()
    count = 0
    for item in iterator:
        if device.type == "cuda":
            item["image"].to(device, non_blocking=True)
        count += item["image"].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return first - start, count / (time.perf_counter() - first)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_loading", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="image folder to read (default: generated JPEGs in a temp folder)")
    parser.add_argument("--images", type=int, default=48, help="JPEGs to generate (without --root)")
    parser.add_argument("--source-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"),
                        help="size of the generated JPEGs")
    parser.add_argument("--size", type=int, default=1024, help="training input size")
    parser.add_argument("--aspect", choices=ASPECT_MODES, default="pad")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--teacher-crops", choices=TEACHER_CROPS, default="batch",
                        help="source: the loader also cuts each image's grid cells as the teacher's crops")
    parser.add_argument("--crop-size", type=int, default=224, help="the teacher's native size (source crops)")
    parser.add_argument("--samples", type=int, default=96, help="samples per timed pass (files repeat)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    device = setup(args)

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.root) if args.root else Path(scratch)
        if not args.root:
            write_jpegs(root, args.images, *args.source_size)
        files = list_images(root)
        mean_kib = statistics.mean(path.stat().st_size for path in files) / 1024
        dataset = folder_dataset(root, args.size, args.aspect, args.teacher_crops, args.crop_size)
        for path in files:
            path.read_bytes()  # page cache: time decoding, not the disk
        sample_ms, decode_ms, resize_ms = per_sample_split(dataset, files, args.size)
        rows = []
        for workers in args.workers:
            first, rate = loader_throughput(dataset, workers=workers, batch=args.batch, samples=args.samples,
                                            device=device)
            rows.append((workers, f"{rate:.1f}", f"{rate / max(workers, 1):.1f}", f"{first:.2f}"))

    source = (f"{len(files)} files from {root}" if args.root else
              f"{len(files)} generated {args.source_size[0]}x{args.source_size[1]} JPEGs")
    crops = (f", teacher crops from the source ({args.crop_size} px)" if args.teacher_crops == "source" else "")
    print(f"## Data loading: {source} (mean {mean_kib:.0f} KiB) -> {args.size}x{args.size} ({args.aspect}){crops}, "
          f"batch {args.batch}, {args.device}\n")
    print("\n".join(environment(device)))
    print(f"- {args.samples} samples per pass (files repeat, read from the page cache); steady rate = images "
          "after the first batch / time after it\n")
    print(markdown_table(("workers", "images/s", "images/s per worker", "first batch s"), rows))
    per_core = 1000 / sample_ms
    rest = " and the teacher's crops: cut, bicubic resize, tensor" if args.teacher_crops == "source" else ""
    print(f"\nOne sample in this process (median): {sample_ms:.1f} ms, of which JPEG decode {decode_ms:.1f} ms and "
          f"bicubic resize to {args.size} {resize_ms:.1f} ms (the rest, {sample_ms - decode_ms - resize_ms:.1f} ms, is "
          f"PIL -> CHW uint8 tensor{rest}) -> {per_core:.1f} images/s per busy core; feeding "
          f"{TRAINING_TARGET_IMAGES_PER_SECOND} images/s takes about {TRAINING_TARGET_IMAGES_PER_SECOND / per_core:.1f} "
          "such cores (plus collate and inter-process transfer).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
