"""``denserc train [CONFIG] [section.key=value ...] [--resume auto|CHECKPOINT]``."""
from __future__ import annotations

import argparse

from ..engine.shipped import available_configs
from .shipped import CONFIG_DIR

# With no CONFIG, `denserc train` runs the built-in default that a plug-in sets (its ``add_commands``):
# ``default_run(overrides) -> exit code``, e.g. the testbed's before/after run (the shipped tiny CLIP distilled
# on generated scenes, CPU, a few minutes; docs/testbed.md), and ``default_config``, the training config that
# run uses and what --print-config and --resume read when no CONFIG is given.

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
                    f"({', '.join(available_configs(CONFIG_DIR))}) or a YAML file; overrides are section.key=value.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=None,
                        help="config name or YAML path (default: the built-in default run a plug-in sets, "
                             "the testbed's before/after run with config testbed)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.epochs=1 optim.lr=2e-5")
    parser.add_argument("--resume", metavar="auto|CHECKPOINT", default=None,
                        help="'auto': continue from the newest complete checkpoint in the output folder "
                             "(start fresh if there is none); or a checkpoint folder")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(func=run, default_run=None, default_config=None)


def run(args: argparse.Namespace) -> int:
    from ..engine.config import ConfigError, dump_config  # here, not at the top: `--help` stays free of torch
    from ..engine.launch import run as run_on_engine
    from .config import load_config
    from .trainer import DistillationTask
    name, overrides = args.config, list(args.overrides)
    if name is not None and "=" in name:  # `denserc train key=value ...`: overrides of the default
        name, overrides = None, [name, *overrides]
    if name is None and args.resume is None and not args.print_config and args.default_run is not None:
        return args.default_run(overrides)
    name = name or args.default_config
    if name is None:
        raise ConfigError("no CONFIG given and no plug-in sets a built-in default; give a shipped config "
                          f"({', '.join(available_configs(CONFIG_DIR))}) or a YAML file")
    config = load_config(name, overrides)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    # bad config, data or weights, an unreadable image under data.strict=true: cli.main prints the one line
    env, final = run_on_engine(lambda env: DistillationTask(config, env), config, name, args.resume)
    if env.is_main:
        print(f"denserc train: done; model in {final} (load with denserc.load('{final}'))")
    return 0

