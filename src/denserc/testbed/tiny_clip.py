"""The testbed's tiny CLIP: an open_clip config registered at import, and its shipped weights.

``ViT-Testbed-P8`` is a 6-block ViT (width 96, 6 heads, patch 8, native 64 px) with a 3-block
text tower (width 64), pretrained contrastively on testbed scenes by ``denserc pretrain-testbed``.
The weights ship in fp16 (``weights/ViT-Testbed-P8.safetensors``); the run that made them (command,
seed, wall time, zero-shot accuracy) is recorded beside them in ``ViT-Testbed-P8.pretrain.json``.

Importing this module registers the config and the pretrained tag ``testbed`` (a local file, so
nothing is downloaded): ``denserc.create_model("ViT-Testbed-P8", pretrained="testbed")``, or
``model.pretrained: testbed`` in a training config. open_clip has no public call to add a
pretrained tag, so the entry is added to its tag table directly.
"""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

MODEL_NAME = "ViT-Testbed-P8"
WEIGHTS_DIR = Path(__file__).parent / "weights"
CONFIG_FILE = WEIGHTS_DIR / f"{MODEL_NAME}.json"
WEIGHTS_FILE = f"{MODEL_NAME}.safetensors"
RECORD_FILE = f"{MODEL_NAME}.pretrain.json"
PRETRAINED_TAG = "testbed"

open_clip.add_model_config(CONFIG_FILE)
open_clip.pretrained._PRETRAINED.setdefault(MODEL_NAME, {})[PRETRAINED_TAG] = {
    "file": str(WEIGHTS_DIR / WEIGHTS_FILE), "mean": OPENAI_DATASET_MEAN, "std": OPENAI_DATASET_STD}


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
