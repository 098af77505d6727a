"""``denserc pretrain-testbed`` and ``denserc testbed``: the testbed's two commands."""
from __future__ import annotations

from . import pretrain, run


def register(subparsers) -> None:
    pretrain.register(subparsers)
    run.register(subparsers)
