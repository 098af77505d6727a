"""The training-step benchmark reads its phases off a real Engine.train_step (guards against trainer changes)."""
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not part of the package
from benchmarks.train_step import PHASES, PhaseClock, build_trainer  # noqa: E402

from helpers import TINY  # noqa: E402

pytestmark = pytest.mark.slow  # benchmark helper


def test_phase_clock_splits_a_real_step_into_ordered_phases_inside_it(tmp_path):
    cpu = torch.device("cpu")
    trainer = build_trainer(model=TINY, size=224, batch=2, vfm="vit_small_patch14_reg4_dinov2",
                            vfm_kwargs={"depth": 1, "embed_dim": 48, "num_heads": 3}, construction="multi-v",
                            gating="hsg", precision="fp32", checkpointing=False, compile_model=False, device=cpu,
                            batches=1, output_dir=str(tmp_path))
    batch = default_collate([trainer.task.dataset[i] for i in range(2)])
    clock = PhaseClock(trainer, cpu)

    trainer.train_step([batch], 0)  # disabled: the wrappers pass through and record nothing
    assert clock.marks == {}

    clock.enabled = True
    start = time.perf_counter()
    losses = trainer.train_step([batch], 0)
    end = time.perf_counter()
    phases = clock.phases(start, end)

    assert math.isfinite(float(losses["loss"]))
    assert tuple(phases) == PHASES
    assert all(seconds > 0 for name, seconds in phases.items() if name != "other")
    assert start < min(clock.marks.values()) and max(clock.marks.values()) < end  # marks of this step only
    assert phases["other"] >= 0  # the marks lie inside the step, so the phases cannot exceed it
    assert clock.marks["prepare start"] < clock.marks["teacher start"] < clock.marks["vfm start"] \
        < clock.marks["student start"] < clock.marks["module end"] < clock.marks["optimizer start"] \
        < clock.marks["optimizer end"]
