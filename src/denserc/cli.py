"""`denserc` command line: one subcommand per job, each registered by the module that owns it.

Each module in ``SUBCOMMAND_MODULES`` exposes ``register(subparsers)``, which adds its parser(s)
and sets ``func`` (called with the parsed arguments) as the parser default. Plug-ins add theirs with
``register_commands`` (docs/architecture.md); they are loaded before the parser is built, so the core
commands also offer what the plug-ins registered (e.g. their datasets in ``denserc eval seg``).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from . import __version__
from .plugins import load_plugins

SUBCOMMAND_MODULES = (
    "denserc.train.cli",
    "denserc.eval.cli",
    "denserc.viz.cli",
)

DEBUG_FLAG = "--debug"
# Failures a user can fix from the message alone (a wrong path, layout, value or file); anything else is a
# bug and keeps its traceback. RuntimeError covers torch's own (e.g. out of memory) and plug-in loading.
EXPECTED_ERRORS = (OSError, ValueError, RuntimeError)

_PLUGIN_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def register_commands(add: Callable[[argparse._SubParsersAction], None]) -> None:
    """Extension point: ``add(subparsers)`` is called whenever the `denserc` parser is built.

    It runs after the core subcommands are registered, so besides adding its own subcommands it may
    set the documented defaults of core ones with ``subparsers.choices[NAME].set_defaults(...)``:
    ``train``'s ``default_config`` and ``default_run`` (what `denserc train` does without a CONFIG) and
    ``segment``/``heatmap``'s ``model`` (their default ``--model``).
    """
    _PLUGIN_COMMANDS.append(add)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="denserc",
        description="DenseRC: dense CLIP features by self-distillation (train, evaluate, visualise).",
    )
    parser.add_argument("--version", action="version", version=f"denserc {__version__}")
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="on an error, show the Python traceback, not just the message (also after COMMAND)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    load_plugins()
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    for add in _PLUGIN_COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. An expected failure (bad input, missing file, unreadable data) prints one line,
    ``denserc COMMAND: error: ...``, and exits with 1; ``--debug`` (anywhere on the line) shows the
    traceback instead, as any unexpected error does."""
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
        print(f"denserc {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"denserc {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
