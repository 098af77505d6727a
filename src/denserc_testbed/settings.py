"""The testbed's run settings, in a module free of torch (the commands' `--help` shows them)."""
from __future__ import annotations

from dataclasses import dataclass

from .tiny_clip import MODEL_NAME, PRETRAINED_TAG

# `denserc testbed --schedule NAME` -> the shipped training config it distils with
SCHEDULES = {"short": "testbed", "full": "testbed_full"}
EVAL_SEED = 2_000_000  # held-out scenes; CLIP pretraining uses seeds 0 and 1_000_000, distillation 0..
EVAL_IMAGES = 200
# downstream comparisons (testbed-detect, testbed-catseg): the shipped tiny CLIP and its DenseRC-distilled
# version as the built-in default `denserc train` exports it
COMPARED_CLIPS = (f"{MODEL_NAME}:{PRETRAINED_TAG}", "runs/testbed/runs/hsg-seed0/final")
CATSEG_TRAIN_IMAGES = 1000
# how pretraining captions a scene region: "scene" names its objects then its stuff ("a photo of a red
# dotted object on grass."); "salient" names only its objects when it shows any, as a real caption names
# the salient objects, and its stuff only when it shows no object
CAPTION_RULES = ("scene", "salient")


@dataclass
class PretrainConfig:
    seed: int = 0
    steps: int = 1200
    train_scenes: int = 5000
    held_out_scenes: int = 400
    regions_per_batch: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    eval_every: int = 300
    threads: int = 1  # CPU threads; one thread is several times faster than two on a shared 2-core machine
    captions: str = "scene"  # one of CAPTION_RULES

    def __post_init__(self):
        if self.captions not in CAPTION_RULES:
            raise ValueError(f"captions must be one of {CAPTION_RULES}, got {self.captions!r}")
