"""``denserc catseg train CONFIG [key=value ...]`` and ``denserc catseg eval --model RUN/final ...``."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..eval.defaults import SKIP_UNREADABLE_HELP
from ..models.variants import PRECISIONS

EXAMPLES = """examples:
  denserc catseg train catseg_vitb16 data.root=/data/coco-stuff                         plain OpenAI ViT-B/16
  denserc catseg train catseg_vitb16 data.root=/data/coco-stuff clip.model=runs/vitb16_coco/final   DenseRC
      (the folder `denserc train vitb16_coco` writes; global batch 4 = 1 image per forward x 4 accumulated)
  torchrun --standalone --nproc_per_node 4 -m denserc catseg train catseg_vitb16 data.root=...   4 GPUs x 1
  denserc catseg eval --model runs/catseg_vitb16/final --data /data/ADE20K_2021_17_01 --dataset ade847
see docs/segmentation.md (trained protocol)
"""


def register(subparsers) -> None:
    from ..engine.shipped import available_configs
    from .defaults import BENCHMARKS, CONFIG_DIR
    parser = subparsers.add_parser("catseg", help="CAT-Seg: trained open-vocabulary segmentation on a (DenseRC) CLIP",
                                   description="Train CAT-Seg on a CLIP and evaluate it (the paper's A-847 / PC-459 / "
                                               "A-150 / PC-59 protocol).", epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    jobs = parser.add_subparsers(dest="job", metavar="JOB", required=True)
    train = jobs.add_parser("train", help="train CAT-Seg (COCO-Stuff by default)",
                            description=f"CONFIG is a shipped config "
                                        f"({', '.join(available_configs(CONFIG_DIR))}) or a YAML "
                                        "file; overrides are section.key=value.")
    train.add_argument("config", help="config name or YAML path")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. clip.model=runs/vitb16_coco/final")
    train.add_argument("--resume", metavar="auto|CHECKPOINT", default=None,
                       help="'auto': continue from the newest complete checkpoint (fresh if none); or a folder")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(func=run_train, command_name="catseg train")
    evaluate = jobs.add_parser("eval", help="mIoU of trained CAT-Seg models on one benchmark",
                               description="Sliding-window CAT-Seg inference -> mIoU; one Markdown row per model.")
    evaluate.add_argument("--model", action="append", required=True, metavar="FOLDER",
                          help="a folder written by `denserc catseg train` (RUN/final); repeat for more rows")
    evaluate.add_argument("--data", required=True, type=Path, help="dataset root folder")
    evaluate.add_argument("--dataset", required=True,
                          help=f"benchmark: {', '.join(BENCHMARKS)}, or any segmentation dataset name")
    evaluate.add_argument("--class-names", default=None, help="bundled list or file (default: the benchmark's)")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    evaluate.add_argument("--out", type=Path, default=None, help="JSON report (default: eval-catseg-DATASET.json)")
    evaluate.add_argument("--workers", type=int, default=4)
    evaluate.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    evaluate.add_argument("--precision", choices=PRECISIONS, default="fp32")
    for flag, kind, meaning in (("--short-side", int, "short side after the first resize (640)"),
                                ("--size", int, "square size the image is then resized to (640)"),
                                ("--window", int, "sliding-window size (384)"),
                                ("--overlap", float, "window overlap (0.333)")):
        evaluate.add_argument(flag, type=kind, default=None, help=f"{meaning}; default: CAT-Seg's")
    evaluate.add_argument("--skip-unreadable", action="store_true", help=SKIP_UNREADABLE_HELP)
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(func=run_eval, command_name="catseg eval")


def run_train(args: argparse.Namespace) -> int:
    from ..engine.config import dump_config
    from ..engine.launch import run
    from .config import load_config
    from .task import CATSegTask
    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    # bad config, data or weights: cli.main says so
    env, final = run(lambda env: CATSegTask(config, env), config, args.config, args.resume)
    if env.is_main:
        print(f"denserc catseg train: done; segmenter in {final} (denserc catseg eval --model {final} ...)")
    return 0


def run_eval(args: argparse.Namespace) -> int:

    from ..reports import provenance
    from ..distributed import cleanup_distributed, setup_distributed
    from ..io import save_json
    from .evaluate import SlidingWindowProtocol, evaluate_catseg
    from .export import load_catseg
    overrides = {"short_side": args.short_side, "size": args.size, "window": args.window, "overlap": args.overlap}
    protocol = SlidingWindowProtocol(**{k: v for k, v in overrides.items() if v is not None})
    shard = setup_distributed(args.device)
    device = shard.device
    try:
        rows = []
        for folder in args.model:
            segmenter, tokenizer, templates = load_catseg(folder, device=device, precision=args.precision)
            start = time.perf_counter()
            result = evaluate_catseg(segmenter, tokenizer, templates, args.data, args.dataset,
                                     protocol=protocol, class_names=args.class_names, workers=args.workers,
                                     limit=args.limit, shard=shard, progress=not args.no_progress,
                                     description=folder, skip_unreadable=args.skip_unreadable)
            rows.append({"model": folder, "seconds": round(time.perf_counter() - start, 2), **result})
            del segmenter
        if shard.is_main:
            out = args.out or Path(f"eval-catseg-{args.dataset}.json")
            save_json({"task": "catseg", "benchmark": args.dataset, "data": str(args.data), "results": rows,
                       **provenance(device, args.precision, shard.world_size, limit=args.limit)}, out)
            print(markdown_table(rows))
            print(f"\nwrote {out}")
    finally:
        cleanup_distributed()
    return 0


def markdown_table(rows: list[dict]) -> str:
    """One row per trained segmenter: benchmark, images, mIoU, mAcc, aAcc."""
    from ..reports import markdown_table as table
    cells = [[row["model"], row["benchmark"], str(row["num_images"]),
              *("n/a" if row[k] is None else f"{row[k]:.2f}" for k in ("mIoU", "mAcc", "aAcc"))] for row in rows]
    return table(["model", "benchmark", "images", "mIoU", "mAcc", "aAcc"], cells,
                 ["CAT-Seg sliding-window inference (trained protocol): mIoU (mean over the classes present in the "
                  "ground truth, CAT-Seg's detectron2 rule), mean class accuracy, pixel accuracy (%)"])

