"""``denserc testbed-catseg``: CAT-Seg trained on testbed scenes with classes held out, seen/unseen mIoU.

The open-vocabulary question in miniature: the segmenter trains on scenes whose labels name only
the *seen* classes (``HELD_OUT`` pixels are 255, negatives for every training class, as in CAT-Seg),
then segments held-out scenes with the full vocabulary; mIoU is reported over the seen and the
unseen classes separately, for every CLIP given (the shipped tiny CLIP and a distilled one).

The held-out classes are one colour per pattern (a Latin-square pick, so every pattern and colour word
still occurs in training) and one stuff class. The split is written once under ``OUTPUT/data``
(``train`` and ``val``), training goes through ``denserc catseg train``'s task and engine with
``catseg_testbed.yaml``, evaluation through ``denserc catseg eval``'s code.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from denserc.catseg.config import load_config
from denserc.catseg.evaluate import SlidingWindowProtocol, evaluate_catseg
from denserc.catseg.export import load_catseg
from denserc.catseg.task import CATSegTask
from denserc.io import atomic_write, save_json
from denserc.distributed import cleanup_distributed, setup_distributed
from denserc.engine.loop import Engine
from denserc.reports import markdown_table
from .coco import write_split
from .evaluation import CLASS_NAMES_FILE, DATASET, TRAIN_SPLIT, prepare_split
from .settings import CATSEG_TRAIN_IMAGES, COMPARED_CLIPS, EVAL_IMAGES, EVAL_SEED
from .scenes import SceneConfig
from .vocabulary import CATEGORIES, COLOURS, PATTERNS, STUFF_ID, THING_ID, label_of

CONFIG = Path(__file__).parent / "catseg_testbed.yaml"
TRAIN_SEED = 3_000_000  # disjoint from pretraining (0, 1_000_000), distillation and evaluation (2_000_000)
HELD_OUT = sorted([label_of(THING_ID[(pattern, list(COLOURS)[i % len(COLOURS)])]) for i, pattern in enumerate(PATTERNS)]
                  + [label_of(STUFF_ID["gravel"])])


def prepare_data(root: Path, train_images: int, eval_images: int, progress: bool = True) -> Path:
    """The held-out evaluation split (shared with ``denserc testbed``) plus a training split, written once."""
    prepare_split(root, eval_images, EVAL_SEED, progress=progress)
    panoptic = root / "annotations" / f"panoptic_{TRAIN_SPLIT}.json"
    if panoptic.is_file():
        info = json.loads(panoptic.read_text(encoding="utf-8")).get("info", {})
        if info.get("seed") == TRAIN_SEED and info.get("scene_config") == dataclasses.asdict(SceneConfig()) \
                and len(json.loads(panoptic.read_text(encoding="utf-8"))["images"]) == train_images:
            return root
    write_split(root, TRAIN_SPLIT, train_images, TRAIN_SEED, progress=progress)
    return root


def seen_unseen(per_class: list[dict], held_out: list[int]) -> dict:
    """Mean IoU (%) over the seen and over the held-out classes (classes with an undefined IoU left out)."""
    def mean(indices):
        values = [per_class[c]["IoU"] for c in indices if per_class[c]["IoU"] is not None]
        return sum(values) / len(values) if values else None
    seen = [c for c in range(len(per_class)) if c not in set(held_out)]
    return {"mIoU_seen": mean(seen), "mIoU_unseen": mean(held_out)}


def run(clips=COMPARED_CLIPS, output: str | Path = "runs/testbed-catseg", overrides=(),
        train_images: int = CATSEG_TRAIN_IMAGES,
        eval_images: int = EVAL_IMAGES, progress: bool = True) -> list[dict]:
    """Train and evaluate CAT-Seg once per CLIP spec; returns one record each (also written to OUTPUT)."""
    output = Path(output)
    root = prepare_data(output / "data", train_images, eval_images, progress)
    protocol = SlidingWindowProtocol(short_side=SceneConfig().image_size, size=SceneConfig().image_size,
                                     window=SceneConfig().image_size, overlap=0.0)
    records = []
    for index, clip in enumerate(clips):
        run_dir = output / "runs" / f"clip{index}"
        config = load_config(CONFIG, [f"clip.model={clip}", f"data.root={root}",
                                      f"data.class_names={root / CLASS_NAMES_FILE}", f"data.held_out={HELD_OUT}",
                                      f"train.output_dir={run_dir}", *overrides])
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a fresh run each time: this folder is the runner's own output
        threads = torch.get_num_threads()
        started = time.time()
        env = setup_distributed(config.train.device)
        try:
            with logging_redirect_tqdm():
                final = Engine(CATSegTask(config, env), config, env, run_dir).fit()
        finally:
            cleanup_distributed()
            torch.set_num_threads(threads)
        train_seconds = time.time() - started
        segmenter, tokenizer, templates = load_catseg(final)
        result = evaluate_catseg(segmenter, tokenizer, templates, root, DATASET, protocol=protocol,
                                 class_names=str(root / CLASS_NAMES_FILE), workers=0, progress=progress)
        records.append({"clip": clip, "iterations": config.iterations, "train_seconds": round(train_seconds, 1),
                        "held_out": [CATEGORIES[c]["name"] for c in HELD_OUT], "mIoU": result["mIoU"],
                        **seen_unseen(result["per_class"], HELD_OUT), "num_images": result["num_images"]})
        save_json(records, output / "results.json")
    atomic_write(output / "results.md", lambda tmp: Path(tmp).write_text(format_table(records), encoding="utf-8"))
    return records


def format_table(records: list[dict]) -> str:
    cells = [[r["clip"], str(r["iterations"]), f"{r['train_seconds']:.0f}",
              *("n/a" if r[k] is None else f"{r[k]:.2f}" for k in ("mIoU_seen", "mIoU_unseen", "mIoU"))]
             for r in records]
    return markdown_table(["CLIP", "iterations", "train s", "mIoU seen", "mIoU unseen", "mIoU all"], cells,
                          [f"unseen classes (never a training label): {', '.join(records[0]['held_out'])}"]) + "\n"


def _main(args) -> int:
    clips = args.clip or COMPARED_CLIPS
    missing = [c for c in clips if ":" not in c and not Path(c).is_dir()]
    if missing:
        raise SystemExit(f"denserc testbed-catseg: {missing[0]} is not a folder; make it with "
                         "`denserc train` (the testbed distillation, ~3 min on a CPU) or pass --clip")
    records = run(clips, args.output, args.overrides, args.train_images, args.eval_images)
    print(format_table(records))
    return 0
