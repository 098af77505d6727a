"""The testbed's open-vocabulary detection split and its CPU experiment (``denserc testbed-detect``).

Split ``ov-testbed``: the 48 colour x pattern thing classes; the 12 with (pattern index + colour index)
divisible by 4 are novel, the other 36 base. Every pattern and every colour occurs among the base
classes, so a novel class ("green dotted") is a new combination of a seen pattern and a seen colour, and
only the text embedding can tell the detector what it looks like. Novel boxes are never used in
training (the detection dataset drops them).

``denserc testbed-detect`` writes train/val scenes, trains F-ViT (config ``fvit_testbed``) on each
given backbone with the same seed and schedule, and prints AP50 novel/base/all per backbone.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from denserc.detect.protocols import Protocol, Split
from denserc.io import save_json
from denserc.reports import markdown_table
from .coco import write_split
from .vocabulary import COLOURS, PATTERNS

PROTOCOL = "ov-testbed"
TRAIN_SEED = 3_000_000  # scene seeds apart from CLIP pretraining (0, 1_000_000) and evaluation (2_000_000)
VAL_SEED = 4_000_000
COLOUR_NAMES = tuple(COLOURS)


def is_novel(category: dict) -> bool:
    return (PATTERNS.index(category["pattern"]) + COLOUR_NAMES.index(category["colour"])) % 4 == 0


def ov_testbed_split(categories: Sequence[dict]) -> Split:
    """The testbed's thing categories (an ``instances_*.json`` of ``write_split``) with the novel rule."""
    by_name = {f"{colour} {pattern}": (pattern, colour) for pattern in PATTERNS for colour in COLOUR_NAMES}
    unknown = [c["name"] for c in categories if c["name"] not in by_name]
    if unknown:
        raise ValueError(f"ov-testbed expects the testbed's thing categories ('red solid', ...); got {unknown[:5]}")
    ordered = sorted(categories, key=lambda c: c["id"])
    flags = []
    for category in ordered:
        pattern, colour = by_name[category["name"]]
        flags.append(is_novel({"pattern": pattern, "colour": colour}))
    return Split(tuple(c["id"] for c in ordered), tuple(c["name"] for c in ordered), tuple(flags))


OV_TESTBED = Protocol(PROTOCOL, "coco", ov_testbed_split)


def write_detection_data(root: str | Path, num_train: int, num_val: int, progress: bool = True) -> dict[str, Path]:
    """Train and val scenes in the COCO layout under ``root`` (kept if already complete)."""
    root = Path(root)
    paths = {}
    for split, count, seed in (("train", num_train, TRAIN_SEED), ("val", num_val, VAL_SEED)):
        annotations = root / "annotations" / f"instances_{split}.json"
        marker = root / f".{split}_{count}_{seed}.done"
        if not marker.is_file():
            write_split(root, split, count, seed, progress=progress)
            marker.write_text("complete\n", encoding="utf-8")
        paths[f"{split}_annotations"], paths[f"{split}_images"] = annotations, root / split
    return paths


def run(backbones: Sequence[str], output: str | Path = "runs/testbed_detect", num_train: int = 2048,
        num_val: int = 256, overrides: Sequence[str] = (), threads: int = 1, progress: bool = True) -> list[dict]:
    """Train and evaluate F-ViT on each backbone; one record per backbone (also in results.json)."""
    from denserc.detect.config import load_detect_config
    from denserc.detect.detector import load
    from denserc.detect.validation import evaluate_detector
    from denserc.detect.task import DetectionTask
    from denserc.engine.loop import Engine
    from denserc.distributed import cleanup_distributed, setup_distributed

    output = Path(output)
    torch.set_num_threads(threads)
    data = write_detection_data(output / "data", num_train, num_val, progress)
    records = []
    for index, backbone in enumerate(backbones):
        run_dir = output / f"run{index}"
        data_overrides = [f"data.train_annotations={data['train_annotations']}",
                          f"data.train_images={data['train_images']}",
                          f"data.val_annotations={data['val_annotations']}",
                          f"data.val_images={data['val_images']}", f"backbone.model={backbone}"]
        config = load_detect_config("fvit_testbed", [*data_overrides, *overrides])
        env = setup_distributed(config.train.device)
        try:
            start = time.time()
            with logging_redirect_tqdm():
                final = Engine(DetectionTask(config, env), config, env, run_dir).fit()
            minutes = (time.time() - start) / 60
        finally:
            cleanup_distributed()
        report, _ = evaluate_detector(load(final), config.data.val_annotations, config.data.val_images, PROTOCOL,
                                      progress=progress)
        records.append({"backbone": backbone, "export": str(final), "train_minutes": round(minutes, 2),
                        **{k: report[k] for k in ("ap50_novel", "ap50_base", "ap50_all", "ap_novel", "ap_base")}})
        save_json(records, output / "results.json")
    return records


def format_table(records: list[dict]) -> str:
    cells = [[r["backbone"], *(f"{r[k]:.1f}" for k in ("ap50_novel", "ap50_base", "ap50_all", "train_minutes"))]
             for r in records]
    return markdown_table(["backbone", "AP50 novel", "AP50 base", "AP50 all", "train min"], cells) + "\n"


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("denserc").setLevel(logging.INFO)
    records = run(args.backbones, args.output, args.train_images, args.val_images, args.overrides, args.threads)
    print(format_table(records), end="")
    print(f"results: {args.output / 'results.json'}")
    return 0
