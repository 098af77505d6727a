"""Configs shipped as YAML files in a folder (no torch, no OmegaConf here: command-line help lists them)."""
from __future__ import annotations

from pathlib import Path


def available_configs(config_dir: Path) -> list[str]:
    """Names of the configs in ``config_dir`` (usable as ``denserc ... train NAME``)."""
    return sorted(path.stem for path in config_dir.glob("*.yaml"))
