"""``denserc pretrain-testbed``, ``testbed``, ``testbed-probe``, ``testbed-detect`` and ``testbed-catseg``: the
testbed's commands.

The parsers are built here without torch (so `denserc --help` answers at once); each command's module is
imported when the command runs.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict
from importlib import import_module
from pathlib import Path

from denserc.models.variants import TABLE5_VARIANTS

from .settings import CATSEG_TRAIN_IMAGES, COMPARED_CLIPS, EVAL_IMAGES, SCHEDULES, PretrainConfig


def register(subparsers) -> None:
    register_pretrain(subparsers)
    register_run(subparsers)
    register_probe(subparsers)
    register_teacher(subparsers)
    register_detect(subparsers)
    register_catseg(subparsers)


def _deferred(module: str, function: str):
    """``module.function(args)``, importing the module only when the command runs."""
    def run(args: argparse.Namespace) -> int:
        return getattr(import_module(f".{module}", __package__), function)(args)
    return run


def register_pretrain(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain-testbed", help="pretrain the testbed's tiny CLIP on generated scenes",
        description="Contrastively pretrain the testbed's tiny CLIP (ViT-Testbed-P8) on procedurally "
                    "generated scenes and write fp16 weights plus a record of the run.")
    defaults = PretrainConfig()
    parser.add_argument("--output", type=Path, default=Path("runs/pretrain-testbed"),
                        help="folder for the weights, the record and the log (default: %(default)s); the "
                             "shipped weights were made with --output src/denserc_testbed/weights")
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                            help=f"default: {value}")
    parser.set_defaults(func=_deferred("pretrain", "_run"))


def register_run(subparsers) -> None:
    parser = subparsers.add_parser(
        "testbed", help="before/after DenseRC distillation of the testbed's tiny CLIP (CPU, minutes)",
        description="Distil the testbed's tiny CLIP on generated scenes and compare region classification "
                    "and segmentation before and after, for the chosen Table-5 variants (docs/testbed.md).")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="training-config overrides, e.g. optim.lr=2e-4 train.epochs=2")
    parser.add_argument("--schedule", choices=list(SCHEDULES), default="short",
                        help="short: ~2-5 min per variant on 2 CPU cores; full: the docs' results (default: short)")
    parser.add_argument("--variants", default="hsg",
                        help=f"comma-separated subset of {','.join(TABLE5_VARIANTS)} (Table 5) and declip (DeCLIP's "
                             "dual-stream recipe), or 'all' (Table 5; default: hsg)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="distillation seeds (default: 0)")
    parser.add_argument("--output", type=Path, default=Path("runs/testbed"),
                        help="folder for the held-out split, the runs and the results; its runs are "
                             "replaced (default: %(default)s)")
    parser.add_argument("--eval-images", type=int, default=EVAL_IMAGES,
                        help="held-out scenes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default: 1, fastest on a small machine shared with other jobs)")
    parser.set_defaults(func=_deferred("run", "_main"))


def register_probe(subparsers) -> None:
    parser = subparsers.add_parser(
        "testbed-probe", help="how much of an object's class, colour and pattern a testbed CLIP's features hold",
        description="Zero-shot class/colour/pattern accuracy of thing regions (dense and global) and linear "
                    "probes of class, colour and pattern per layer, on the testbed's held-out split (docs/testbed.md).")
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="'testbed' (the shipped tiny CLIP), a weights file written by pretrain-testbed, "
                             "or a saved model folder, e.g. runs/testbed/runs/hsg-seed0/final")
    parser.add_argument("--output", type=Path, default=Path("runs/testbed"),
                        help="folder holding (or to hold) the held-out split and the probes' split "
                             "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    parser.set_defaults(func=_deferred("probe", "_main"))


def register_teacher(subparsers) -> None:
    parser = subparsers.add_parser(
        "testbed-teacher", help="what the distillation teacher names on the grid cells it is asked about",
        description="Zero-shot class of the teacher's embedding of the short schedule's first-epoch grid cells, "
                    "by the largest object's share of the cell, and of the held-out thing boxes (docs/testbed.md).")
    parser.add_argument("--teacher", default="testbed",
                        help="'testbed' (the shipped tiny CLIP, the default) or a weights file written by "
                             "pretrain-testbed")
    parser.add_argument("--student", default=None,
                        help="a distilled folder (a run's final/), whose pooled dense features are scored "
                             "on the same cells and boxes")
    parser.add_argument("--scenes", type=int, default=512, help="training scenes measured (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    parser.set_defaults(func=_deferred("teacher_cells", "_main"))


def register_detect(subparsers) -> None:
    parser = subparsers.add_parser(
        "testbed-detect", help="open-vocabulary detection on the testbed: F-ViT per backbone (CPU, minutes)",
        description="Write testbed scenes, train F-ViT (config fvit_testbed) on the base classes of the "
                    "ov-testbed split for each backbone and print AP50 novel/base/all (docs/detection.md).")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="detection-config overrides")
    parser.add_argument("--backbones", nargs="+", default=list(COMPARED_CLIPS),
                        help="tower specs: NAME:TAG or a DenseRC folder (default: the shipped tiny CLIP and "
                             "the distilled one `denserc train` writes)")
    parser.add_argument("--output", type=Path, default=Path("runs/testbed_detect"))
    parser.add_argument("--train-images", type=int, default=2048)
    parser.add_argument("--val-images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.set_defaults(func=_deferred("detection", "_main"))


def register_catseg(subparsers) -> None:
    parser = subparsers.add_parser(
        "testbed-catseg", help="CAT-Seg on testbed scenes with held-out classes: seen/unseen mIoU per CLIP",
        description="Train CAT-Seg on generated scenes without the held-out classes and report seen/unseen mIoU "
                    "for each CLIP (default: the shipped tiny CLIP and the distilled one `denserc train` writes).")
    parser.add_argument("--clip", action="append", default=None, metavar="SPEC",
                        help=f"open_clip NAME:TAG or a DenseRC folder; repeat (default: {', '.join(COMPARED_CLIPS)})")
    parser.add_argument("--output", default="runs/testbed-catseg", help="output folder (default: %(default)s)")
    parser.add_argument("--train-images", type=int, default=CATSEG_TRAIN_IMAGES)
    parser.add_argument("--eval-images", type=int, default=EVAL_IMAGES)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="CAT-Seg config overrides, e.g. iterations=100")
    parser.set_defaults(func=_deferred("catseg_run", "_main"))
