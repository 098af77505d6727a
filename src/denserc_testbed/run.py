"""The testbed run (``denserc testbed``): before/after DenseRC self-distillation of the tiny CLIP.

For every requested Table-5 variant: evaluate the un-distilled tiny CLIP built with that
construction/gating, distil it with the ordinary trainer on generated scenes (config ``testbed``
for the short schedule, ``testbed_full`` for the full one), evaluate the distilled model on the
same held-out split, and print one before -> after table. Results are written as JSON and as the
markdown table to the output folder.
"""
from __future__ import annotations

import logging
import shutil
import statistics
import time
from pathlib import Path

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from denserc.distributed import cleanup_distributed, setup_distributed
from denserc.io import atomic_write, save_json
from denserc.models import TABLE5_VARIANTS, create_model, get_tokenizer, load
from denserc.engine.loop import Engine
from denserc.train import load_config
from denserc.train.trainer import DistillationTask
from denserc.reports import markdown_table

from .crops import ScenePool
from .evaluation import evaluate, prepare_split
from .settings import EVAL_IMAGES, EVAL_SEED, SCHEDULES
from .tiny_clip import MODEL_NAME

# What each runnable variant distils: Table 5's rows, and DeCLIP's dual-stream recipe (declip_eva02_b16_coco's
# content and context streams and loss weights, at the testbed's size): the paper's single- vs dual-stream
# comparison. name -> (construction, gating, config overrides)
VARIANTS = {**{name: (construction, gating, ()) for name, (construction, gating) in TABLE5_VARIANTS.items()},
            "declip": ("v", "declip", ("loss.coherence_features=queries", "loss.coherence_weight=0.1"))}
# Thing boxes first: the paper's "Boxes" (CLIPSelf's protocol classifies the boxes of things); "all boxes" mixes in
# the stuff segments, almost half of the testbed's.
METRICS = (("thing_boxes_top1", "thing boxes"), ("thing_masks_top1", "thing masks"), ("stuff_masks_top1", "stuff masks"),
           ("boxes_top1", "all boxes"), ("mIoU", "mIoU"), ("crop_things_top1", "global: object crops"))


def run(schedule: str = "short", variants=("hsg",), seeds=(0,), output: str | Path = "runs/testbed",
        eval_images: int = EVAL_IMAGES, overrides=(), threads: int = 1, progress: bool = True) -> list[dict]:
    """Evaluate, distil and re-evaluate every variant (x seed); returns one record per (variant, seed).

    ``threads`` sets torch's CPU threads: on a 2-core machine shared with other jobs, one thread runs
    a step several (up to ~25) times faster than two, which stall each other.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or schedule not in SCHEDULES:
        raise ValueError(f"unknown variant(s) {unknown} or schedule {schedule!r}; variants: "
                         f"{list(VARIANTS)}, schedules: {list(SCHEDULES)}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(schedule, variants, seeds, Path(output), eval_images, overrides, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run(schedule, variants, seeds, output: Path, eval_images, overrides, progress) -> list[dict]:
    root = prepare_split(output / "data", eval_images, EVAL_SEED, progress=progress)
    crops = ScenePool.render(EVAL_SEED, eval_images)
    tokenizer = get_tokenizer(MODEL_NAME)
    records = []
    for variant in variants:
        construction, gating, recipe = VARIANTS[variant]
        settings = [f"model.construction={construction}", f"model.gating={gating}", "model.num_layers=null", *recipe]
        base = load_config(SCHEDULES[schedule], [*settings, *overrides])
        before = evaluate(starting_model(base), tokenizer, root, crops, base.data.image_size)
        for seed in seeds:
            run_dir = output / "runs" / f"{variant}-seed{seed}"
            config = load_config(SCHEDULES[schedule], [
                *settings, f"train.seed={seed}", f"data.seed={seed}", f"train.output_dir={run_dir}", *overrides])
            if run_dir.exists():
                shutil.rmtree(run_dir)  # a fresh run each time: this folder is the runner's own output
            started = time.time()
            env = setup_distributed(config.train.device)
            try:
                with logging_redirect_tqdm():
                    final = Engine(DistillationTask(config, env), config, env, run_dir).fit()
            finally:
                cleanup_distributed()
            train_seconds = time.time() - started
            after = evaluate(load(final), tokenizer, root, crops, base.data.image_size)
            records.append({"variant": variant, "construction": construction, "gating": gating, "seed": seed,
                            "schedule": schedule, "train_seconds": round(train_seconds, 1),
                            "steps": _steps(config), "before": before, "after": after})
            save_json(records, output / "results.json")
    atomic_write(output / "results.md", lambda tmp: Path(tmp).write_text(format_table(records), encoding="utf-8"))
    return records


def starting_model(config):
    """The CLIP the runs of ``config`` start from, as "before" is measured: ``model.pretrained`` may be
    another ``pretrain-testbed`` weights file than the shipped tag."""
    model = config.model
    return create_model(model.name, model.pretrained, construction=model.construction, gating=model.gating)


def format_table(records: list[dict]) -> str:
    """Markdown: one row per variant, ``before -> after`` per metric (after: mean +- std over seeds)."""
    table = []
    for variant in dict.fromkeys(r["variant"] for r in records):
        rows = [r for r in records if r["variant"] == variant]
        cells = [variant]
        for key, _ in METRICS:
            after = [r["after"][key] for r in rows]
            spread = f" ± {statistics.stdev(after):.1f}" if len(after) > 1 else ""
            cells.append(f"{rows[0]['before'][key]:.1f} → {statistics.mean(after):.1f}{spread}")
        table.append(cells)
    seeds = sorted({r["seed"] for r in records})
    note = (f"Top-1 accuracy / mIoU in %, un-distilled → distilled ({records[0]['schedule']} schedule, "
            f"{records[0]['steps']} steps, seed(s) {', '.join(map(str, seeds))}; "
            f"{records[0]['before']['segments']} held-out segments).")
    return markdown_table(["variant", *(label for _, label in METRICS)], table, [note]) + "\n"


def _steps(config) -> int:
    return config.data.num_images // config.train.global_batch_size * config.train.epochs


# ------------------------------------------------------------------------------------------- CLI
def run_and_print(schedule: str = "short", variants=("hsg",), seeds=(0,), output: str | Path = "runs/testbed",
                  eval_images: int = EVAL_IMAGES, overrides=(), threads: int = 1) -> int:
    """``run`` with progress logging, then print the before -> after table; the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("denserc").setLevel(logging.INFO)
    records = run(schedule, variants, seeds, output, eval_images, overrides, threads)
    print(format_table(records), end="")
    print(f"results: {Path(output) / 'results.json'}")
    return 0


def _main(args) -> int:
    variants = list(TABLE5_VARIANTS) if args.variants == "all" else args.variants.split(",")
    return run_and_print(args.schedule, variants, args.seeds, args.output, args.eval_images, args.overrides,
                         args.threads)
