"""The testbed's run settings, in a module free of torch (the commands' `--help` shows them)."""
from __future__ import annotations

from dataclasses import dataclass

# `denserc testbed --schedule NAME` -> the shipped training config it distils with
SCHEDULES = {"short": "testbed", "full": "testbed_full"}
EVAL_SEED = 2_000_000  # held-out scenes; CLIP pretraining uses seeds 0 and 1_000_000, distillation 0..
EVAL_IMAGES = 200


@dataclass
class PretrainConfig:
    seed: int = 0
    steps: int = 3000
    train_scenes: int = 5000
    held_out_scenes: int = 400
    regions_per_batch: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    eval_every: int = 250
    threads: int = 1  # CPU threads; one thread is several times faster than two on a shared 2-core machine
