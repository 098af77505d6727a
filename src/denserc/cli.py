"""`denserc` command line: one subcommand per job, each registered by the module that owns it.

Each module in ``SUBCOMMAND_MODULES`` exposes ``register(subparsers)``, which adds its parser(s)
and sets ``func`` (called with the parsed arguments) as the parser default. A plug-in adds its own, and the
defaults of core ones, with ``add_commands(subparsers)`` in its entry point's module (docs/architecture.md).
Building the parser imports no torch, open_clip or timm (the commands import them when they run), so
``denserc --help`` and argument errors answer at once.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .plugins import plugin_commands

SUBCOMMAND_MODULES = (
    "denserc.train.cli",
    "denserc.eval.cli",
    "denserc.catseg.cli",
    "denserc.viz.cli",
    "denserc.detect.cli",
    "denserc.models.cli",
    "denserc.analysis.cli",
)

DEBUG_FLAG = "--debug"
# Failures a user can fix from the message alone (a wrong path, layout, value or file); anything else is a
# bug and keeps its traceback. RuntimeError covers torch's own (e.g. out of memory) and plug-in loading.
EXPECTED_ERRORS = (OSError, ValueError, RuntimeError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="denserc",
        description="DenseRC: dense CLIP features by self-distillation (train, evaluate, visualise).",
    )
    parser.add_argument("--version", action="version", version=f"denserc {__version__}")
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="on an error, show the Python traceback, not just the message (also after COMMAND)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    for add in plugin_commands():
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. An expected failure (bad input, missing file, unreadable data), raised by any command
    as an ``EXPECTED_ERRORS`` exception, prints one line, ``denserc COMMAND: error: ...``, and exits with 1,
    whatever the command; ``--debug`` (anywhere on the line) shows the traceback instead, as any unexpected
    error does. (argparse's own syntax errors exit with 2 before a command runs.)"""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except EXPECTED_ERRORS as error:
        if debug:
            raise
        print(f"denserc {_command_name(args)}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"denserc {_command_name(args)}: interrupted", file=sys.stderr)
        return 130


def _command_name(args: argparse.Namespace) -> str:
    """``train``, or ``detect eval`` for a command with subcommands (their parsers set ``command_name``)."""
    return getattr(args, "command_name", args.command)


if __name__ == "__main__":
    sys.exit(main())
