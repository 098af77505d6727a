"""``denserc train [CONFIG] [section.key=value ...] [--resume auto|CHECKPOINT]``."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from ..data import UnreadableImageError
from .config import ConfigError, available_configs, dump_config, load_config
from .distributed import cleanup_distributed, setup_distributed
from .checkpoint import resume_checkpoint
from .trainer import Trainer

# With no CONFIG, `denserc train` is the built-in default: the testbed's before/after run (the shipped
# tiny CLIP distilled on generated scenes, CPU, a few minutes; docs/testbed.md). DEFAULT_CONFIG is
# the training config that run uses, and what --print-config and --resume read when no CONFIG is given.
DEFAULT_CONFIG = "testbed"

EXAMPLES = """examples:
  denserc train                     built-in default: distil the shipped tiny CLIP on generated scenes
                                    (CPU, minutes) and print region accuracy / mIoU before -> after
  denserc train vitb16_coco data.root=/data/coco/train2017                 1 GPU (4 images x 4 accumulated)
  torchrun --standalone --nproc_per_node 4 -m denserc train vitb16_coco data.root=/data/coco/train2017
  denserc train vitb16_coco data.root=/data/coco/train2017 --resume auto   continue after a crash
see docs/training.md for multi-node runs, every config key and the output folder
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="distil a CLIP ViT into DenseRC (self-distillation, no labels)",
        description="Self-distillation training. CONFIG is a shipped config name "
                    f"({', '.join(available_configs())}) or a YAML file; overrides are section.key=value.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=None,
                        help="config name or YAML path (default: the testbed before/after run, "
                             f"config {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.epochs=1 optim.lr=2e-5")
    parser.add_argument("--resume", metavar="auto|CHECKPOINT", default=None,
                        help="'auto': continue from the newest complete checkpoint in the output folder "
                             "(start fresh if there is none); or a checkpoint folder")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    name, overrides = args.config, list(args.overrides)
    if name is not None and "=" in name:  # `denserc train key=value ...`: overrides of the default
        name, overrides = None, [name, *overrides]
    if name is None and args.resume is None and not args.print_config:
        from ..testbed.run import run_and_print
        return run_and_print(overrides=overrides)
    name = name or DEFAULT_CONFIG
    try:
        config = load_config(name, overrides)
    except ConfigError as error:
        return _report(error)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    output_dir = Path(config.train.output_dir or Path("runs") / Path(name).name.removesuffix(".yaml"))
    try:
        env = setup_distributed(config.train.device)
    except RuntimeError as error:
        return _report(error)
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("denserc").setLevel(logging.INFO if env.is_main else logging.WARNING)
    try:
        try:
            checkpoint = resume_checkpoint(output_dir, args.resume, env)
            trainer = Trainer(config, env, output_dir)
        except (ValueError, RuntimeError, FileNotFoundError) as error:  # bad config, data or weights
            return _report(error)
        try:
            with logging_redirect_tqdm():
                final = trainer.fit(checkpoint)
        except UnreadableImageError as error:  # data.strict=true: the file is named, no traceback needed
            return _report(error)
    finally:
        cleanup_distributed()
    if env.is_main:
        print(f"denserc train: done; model in {final} (load with denserc.load('{final}'))")
    return 0


def _report(error: Exception) -> int:
    print(f"denserc train: error: {error}", file=sys.stderr)
    return 2
