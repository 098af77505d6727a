"""Where the distillation configs shipped with the package are (no torch here: `denserc train --help` lists them)."""
from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
