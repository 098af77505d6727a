"""`denserc eval region|seg`: evaluate one or more models, write JSON, print a Markdown table.

    denserc eval region --model ViT-B-16:openai --model runs/vitb16_coco/final --data /data/coco
    denserc eval seg --model runs/vitb16_coco/final --data /data/ADEChallengeData2016 --dataset ade20k
    denserc eval seg --model ViT-B-16:openai --variants --data /data/VOC2012 --dataset voc20

Under ``torchrun --nproc_per_node N -m denserc eval ...`` every rank evaluates a shard of the
images and the counts are summed; rank 0 writes the report.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .. import reports
from ..models.variants import CONSTRUCTIONS, GATINGS, PRECISIONS, TABLE5_VARIANTS
from .defaults import REGION_TEMPLATES, SEGMENTATION_TEMPLATES, SKIP_UNREADABLE_HELP, default_cache_dir

# The rest (torch, open_clip, the datasets) is imported inside the functions that run a command, so that
# `denserc eval --help` and argument errors answer at once.

# Data-loading workers when --workers is not given: the machine's cores, so a small machine is not
# over-subscribed (PyTorch warns then) and a large one does not start dozens of processes per rank.
MAX_DEFAULT_WORKERS = 8
REGION_COLUMNS = (("boxes_thing", "boxes"), ("masks_thing", "thing masks"), ("masks_stuff", "stuff masks"))
SEGMENTATION_COLUMNS = ("mIoU", "mAcc", "aAcc")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="zero-shot region classification and training-free open-vocabulary segmentation",
        description="Evaluate models (open_clip NAME[:TAG|:FILE] or DenseRC folders) and print one table row each.")
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    region = tasks.add_parser("region", help="COCO-panoptic box/mask classification (CLIPSelf protocol)",
                              description="Top-1/top-5 of every panoptic segment's box- and mask-pooled features.")
    _add_common(region, REGION_TEMPLATES)
    region.add_argument("--dataset", default="coco-panoptic", choices=["coco-panoptic"])
    region.add_argument("--split", default="val2017", help="panoptic split: ROOT/SPLIT images, "
                        "ROOT/annotations/panoptic_SPLIT.json and PNGs (default: val2017)")
    region.add_argument("--image-size", type=int, default=None,
                        help="square input size after resize-longest + pad (default: 64 patches, 1024 for /16)")
    region.add_argument("--class-names", default="coco_panoptic",
                        help="bundled list or file in category-id order, or 'dataset' for the JSON's names "
                             "(default: %(default)s)")
    region.set_defaults(func=run_region, batch_size=4, command_name="eval region")
    seg = tasks.add_parser("seg", help="training-free open-vocabulary semantic segmentation (SCLIP protocol)",
                           description="Sliding-window dense logits -> mIoU, per-class IoU, pixel accuracy.")
    _add_common(seg, SEGMENTATION_TEMPLATES)
    seg.add_argument("--dataset", default=None,
                     help="dataset name: ade20k, ade847, cityscapes, coco-stuff, context459, context59, context60, "
                          "voc20, voc21 (docs/evaluation.md) or a plug-in's; '-' and '_' are one spelling; ade150 "
                          "(CAT-Seg's name) = ade20k; the annotations_detectron2 trees CAT-Seg's prepare_*.py write are read "
                          "too (default: detected from the folder layout)")
    seg.add_argument("--class-names", default=None, help="bundled list or file (default: the dataset's)")
    for flag, kind, meaning in (("--short-side", int, "short side after resizing"),
                                ("--window", int, "sliding-window size in pixels"),
                                ("--stride", int, "sliding-window stride in pixels"),
                                ("--logit-scale", float, "softmax temperature on the cosine logits"),
                                ("--prob-threshold", float, "below this class probability -> background"),
                                ("--area-threshold", float, "drop classes winning less than this share of "
                                                            "non-background pixels")):
        seg.add_argument(flag, type=kind, default=None, help=f"{meaning} (default: the dataset's, SCLIP)")
    seg.set_defaults(func=run_seg, batch_size=16, command_name="eval seg")


def _add_common(parser: argparse.ArgumentParser, default_templates: str) -> None:
    parser.add_argument("--model", action="append", required=True, metavar="SPEC",
                        help="DenseRC folder, or open_clip NAME, NAME:TAG, NAME:FILE; repeat for more rows")
    parser.add_argument("--data", required=True, type=Path, help="dataset root folder")
    parser.add_argument("--variants", action="store_true",
                        help="evaluate each model under every construction/gating of the paper's Table 5")
    parser.add_argument("--construction", choices=CONSTRUCTIONS, default=None)
    parser.add_argument("--gating", choices=GATINGS, default=None)
    parser.add_argument("--num-layers", type=int, default=None, help="value layers of multi-v")
    parser.add_argument("--templates", default=default_templates,
                        help=f"prompt templates: openai (80), simple (7), vild (63) or a file (default: "
                             f"{default_templates}); every class is embedded with every template once, before the "
                             "first image, and cached: on a CPU `--templates simple` makes that step ~10x shorter")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N images (the text classifier still embeds every class)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: eval-TASK-DATASET.json)")
    parser.add_argument("--batch-size", type=int, help="images (region) or windows (seg) per forward pass")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="data-loading processes (default: the CPU cores this process may use, at most "
                             f"{MAX_DEFAULT_WORKERS}: %(default)s)")
    parser.add_argument("--skip-unreadable", action="store_true", help=SKIP_UNREADABLE_HELP)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the random weights of a --model given without TAG/FILE (default 0)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="text-embedding cache (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_region(args: argparse.Namespace) -> int:
    _starting(args)
    from .region import evaluate_regions

    def evaluate(model, tokenizer, shard, label):
        return evaluate_regions(model, tokenizer, args.data, split=args.split,
                                class_names=args.class_names, templates=args.templates,
                                image_size=args.image_size, batch_size=args.batch_size, workers=args.workers,
                                limit=args.limit, shard=shard, cache_dir=args.cache_dir,
                                progress=not args.no_progress, description=label,
                                skip_unreadable=args.skip_unreadable)
    return _run(args, "region", args.dataset, evaluate)


def run_seg(args: argparse.Namespace) -> int:
    _starting(args)
    from .datasets import detect_segmentation_dataset, segmentation_layout
    from .segmentation import evaluate_segmentation, protocol_for

    dataset = segmentation_layout(args.dataset).name if args.dataset else detect_segmentation_dataset(args.data)
    protocol = protocol_for(dataset, short_side=args.short_side, window=args.window, stride=args.stride,
                            logit_scale=args.logit_scale, prob_threshold=args.prob_threshold,
                            area_threshold=args.area_threshold)

    def evaluate(model, tokenizer, shard, label):
        return evaluate_segmentation(model, tokenizer, args.data, dataset, protocol=protocol,
                                     class_names=args.class_names, templates=args.templates,
                                     batch_size=args.batch_size, workers=args.workers, limit=args.limit,
                                     shard=shard, cache_dir=args.cache_dir, progress=not args.no_progress,
                                     description=label, skip_unreadable=args.skip_unreadable)
    return _run(args, "seg", dataset, evaluate)


def _starting(args: argparse.Namespace) -> None:
    """A first line at once: importing torch and building the first model take many seconds on a CPU."""
    if not args.no_progress:
        print(f"denserc eval {args.task}: loading {', '.join(args.model)} (torch, open_clip)...", file=sys.stderr,
              flush=True)


def default_workers() -> int:
    return min(MAX_DEFAULT_WORKERS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


def model_settings(args: argparse.Namespace) -> list[dict]:
    """The construction settings each model is evaluated under (one dict per table row)."""
    if not args.variants:
        return [{"construction": args.construction, "gating": args.gating, "num_layers": args.num_layers}]
    if args.construction or args.gating:
        raise ValueError("--variants sets construction and gating itself; drop --construction/--gating")
    return [{"construction": construction, "gating": gating,
             "num_layers": args.num_layers if construction == "multi-v" else None}
            for construction, gating in TABLE5_VARIANTS.values()]


def _run(args: argparse.Namespace, task: str, dataset: str, evaluate) -> int:
    from ..distributed import cleanup_distributed, setup_distributed
    from ..io import save_json
    from ..models import from_spec, get_tokenizer, random_weights

    shard = setup_distributed(args.device)
    device = shard.device
    out = args.out or Path(f"eval-{task}-{dataset}.json")
    rows = []
    try:
        for spec in args.model:
            for settings in model_settings(args):
                if random_weights(spec) and shard.is_main:
                    print(f"note: {spec} has random weights (no :TAG or :FILE given; seed {args.seed}): the scores "
                          "measure the pipeline, not a trained model", file=sys.stderr)
                model = from_spec(spec, seed=args.seed, device=device, precision=args.precision, **settings)
                tokenizer = get_tokenizer(spec)
                config = model.config
                label = f"{spec} ({config['construction']}, {config['gating']}, L={config['num_layers']})"
                start = time.perf_counter()
                result = evaluate(model, tokenizer, shard, label)
                rows.append({"model": spec, "label": label, "config": config, "random_weights": random_weights(spec),
                             "seed": args.seed if random_weights(spec) else None,
                             "seconds": round(time.perf_counter() - start, 2), **result})
                del model
        if shard.is_main:
            save_json(_report(args, task, dataset, rows, device, shard), out)
            print(markdown_table(task, rows))
            print(f"\nwrote {out}")
    except Exception as error:
        if rows and shard.is_main:  # the finished rows survive a failure in a later model or variant
            save_json({**_report(args, task, dataset, rows, device, shard), "incomplete": str(error)}, out)
            print(f"denserc eval: wrote the {len(rows)} finished row(s) to {out} before the error below",
                  file=sys.stderr)
        raise
    finally:
        cleanup_distributed()
    return 0


def _report(args, task: str, dataset: str, rows: list[dict], device, shard) -> dict:
    from ..reports import provenance
    return {"task": task, "dataset": dataset, "data": str(args.data), "results": rows,
            **provenance(device, args.precision, shard.world_size, limit=args.limit)}


def markdown_table(task: str, rows: list[dict]) -> str:
    """One row per evaluated model; region cells are mean per-class accuracy (CLIPSelf's mAcc)."""
    if task == "region":
        header = ["model", "construction", "gating", "L", "images"]
        header += [f"{title} {k}" for _, title in REGION_COLUMNS for k in ("top-1", "top-5")]
        cells = [[row[key][stat] for key, _ in REGION_COLUMNS for stat in ("mean_top1", "mean_top5")]
                 for row in rows]
        note = ("mean per-class accuracy (%) over COCO-panoptic segments: boxes of thing segments, "
                "thing masks, stuff masks (CLIPSelf protocol)")
    else:
        header = ["model", "construction", "gating", "L", "images", *SEGMENTATION_COLUMNS]
        cells = [[row[key] for key in SEGMENTATION_COLUMNS] for row in rows]
        note = (f"{rows[0]['dataset'] if rows else ''}: mIoU (mean over every class predicted or in the ground truth, "
                "mmseg's rule), mean class accuracy, pixel accuracy (%)")
    shown = [[row["model"], row["config"]["construction"], row["config"]["gating"], str(row["config"]["num_layers"]),
              str(row["num_images"]), *("n/a" if v is None else f"{v:.2f}" for v in values)]
             for row, values in zip(rows, cells)]
    notes = [note]
    notes += [f"{row['model']}: random weights (seed {row['seed']}), no :TAG or :FILE given; the scores measure "
              "the pipeline, not a trained model" for row in rows if row.get("random_weights")]
    notes += [f"{row['label']}: {row['unreadable_images']} unreadable image(s) skipped (--skip-unreadable)"
              for row in rows if row.get("unreadable_images")]
    return reports.markdown_table(header, shown, notes)
