"""The testbed's tiny CLIP: its open_clip config and its shipped weights.

``ViT-Testbed-P8`` is a 6-block ViT (width 96, 6 heads, patch 8, native 48 px) with a 3-block
text tower (width 64), pretrained contrastively on testbed scenes by ``denserc pretrain-testbed``.
The weights ship in fp16 (``weights/ViT-Testbed-P8.safetensors``); the run that made them (command,
seed, wall time, zero-shot accuracy) is recorded beside them in ``ViT-Testbed-P8.pretrain.json``.

The plug-in (``denserc_testbed.plugin``) registers the config and the pretrained tag ``testbed`` (a
local file, so nothing is downloaded) with ``denserc.models.register_pretrained``:
``denserc.create_model("ViT-Testbed-P8", pretrained="testbed")``, or ``model.pretrained: testbed``
in a training config.
"""
from __future__ import annotations

import json
from pathlib import Path

MODEL_NAME = "ViT-Testbed-P8"
WEIGHTS_DIR = Path(__file__).parent / "weights"
CONFIG_FILE = WEIGHTS_DIR / f"{MODEL_NAME}.json"
WEIGHTS_FILE = f"{MODEL_NAME}.safetensors"
RECORD_FILE = f"{MODEL_NAME}.pretrain.json"
PRETRAINED_TAG = "testbed"


def pretrained_path(directory: str | Path = WEIGHTS_DIR) -> Path:
    """The tiny CLIP's weights file, for ``denserc.create_model(MODEL_NAME, pretrained=...)``."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; make it with `denserc pretrain-testbed "
                                f"--output {directory}` (see docs/testbed.md)")
    return path


def pretrain_record(directory: str | Path = WEIGHTS_DIR) -> dict:
    """What the pretraining run that wrote ``directory`` recorded (command, seed, accuracy, ...)."""
    path = Path(directory) / RECORD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; it is written by `denserc pretrain-testbed`")
    return json.loads(path.read_text(encoding="utf-8"))
