"""``denserc pretrain-testbed``, ``testbed``, ``testbed-probe``, ``testbed-detect``, ``testbed-catseg``: the testbed's
commands."""
from __future__ import annotations

from . import catseg_run, detection, pretrain, probe, run


def register(subparsers) -> None:
    pretrain.register(subparsers)
    run.register(subparsers)
    probe.register(subparsers)
    detection.register(subparsers)
    catseg_run.register(subparsers)
