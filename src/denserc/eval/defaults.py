"""Defaults that the evaluation functions and `denserc eval` share (no torch here: `--help` shows them)."""
from __future__ import annotations

import os
from pathlib import Path

REGION_TEMPLATES = "vild"  # CLIPSelf/DeCLIP embed the COCO-panoptic classes with ViLD's templates
SEGMENTATION_TEMPLATES = "openai"  # SCLIP, ClearCLIP, NACLIP: the 80 OpenAI ImageNet templates


def default_cache_dir() -> Path:
    """``$DENSERC_CACHE/text`` or ``~/.cache/denserc/text``."""
    return Path(os.environ.get("DENSERC_CACHE", Path.home() / ".cache" / "denserc")) / "text"
SKIP_UNREADABLE_HELP = ("leave out image files that cannot be decoded (truncated, corrupt) and count them, instead of "
                        "stopping at the first")
