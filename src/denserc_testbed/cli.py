"""``denserc pretrain-testbed``, ``denserc testbed`` and ``denserc testbed-probe``: the testbed's commands."""
from __future__ import annotations

from . import pretrain, probe, run


def register(subparsers) -> None:
    pretrain.register(subparsers)
    run.register(subparsers)
    probe.register(subparsers)
