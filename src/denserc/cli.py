"""`denserc` command line: one subcommand per job, each registered by the module that owns it.

Each module in ``SUBCOMMAND_MODULES`` exposes ``register(subparsers)``, which adds its parser(s)
and sets ``func`` (called with the parsed arguments) as the parser default.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

SUBCOMMAND_MODULES = (
    "denserc.train.cli",
    "denserc.testbed.cli",  # before eval: registers the segmentation dataset "testbed" it offers
    "denserc.eval.cli",
    "denserc.catseg.cli",
    "denserc.viz.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="denserc",
        description="DenseRC: dense CLIP features by self-distillation (train, evaluate, visualise).",
    )
    parser.add_argument("--version", action="version", version=f"denserc {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
