"""The configs shipped with the package (no torch here: `denserc train --help` lists them)."""
from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def available_configs(config_dir: Path = CONFIG_DIR) -> list[str]:
    """Names of the configs shipped with the package (usable as ``denserc train NAME``)."""
    return sorted(path.stem for path in config_dir.glob("*.yaml"))
