"""Step metrics: averaged over a logging window and over processes, then written on the main process
as JSON lines (always) and TensorBoard (when installed)."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from ..io import atomic_write
from ..distributed import all_reduce

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsWindow:
    """Sums of step metrics since the last log, reduced over processes when logged.

    A metric a step does not report (e.g. ``grad_norm`` outside logging steps) is averaged over the steps
    that did report it.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.reports: dict[str, int] = {}  # steps that reported each metric
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0) + value.float()
            self.reports[name] = self.reports.get(name, 0) + 1
        self.steps += 1

    def reduce(self, global_batch_size: int) -> dict[str, float]:
        """Per-step means over the window and all processes, plus throughput; starts a new window.

        A collective: every process calls it at the same step.
        """
        names = sorted(self.sums)
        means = all_reduce(torch.stack([self.sums[n] / self.reports[n] for n in names]), op="mean").tolist()
        elapsed = time.perf_counter() - self.started
        values = dict(zip(names, means))
        values["images_per_second"] = self.steps * global_batch_size / elapsed
        self.sums, self.reports, self.steps, self.started = {}, {}, 0, time.perf_counter()
        return values


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl``.

    Opening drops records after ``start_step`` (written by a run that was killed after its last
    checkpoint), so a resumed run's file reads as one uninterrupted run.
    """

    def __init__(self, output_dir: str | os.PathLike, start_step: int = 0):
        self.path = Path(output_dir) / METRICS_FILE
        self._truncate_after(start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tensorboard = _tensorboard_writer(Path(output_dir) / "tensorboard", start_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for name, value in metrics.items():
                self._tensorboard.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(kept), encoding="utf-8"))


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """All records of a run's ``metrics.jsonl``."""
    with open(Path(output_dir) / METRICS_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _tensorboard_writer(directory: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("TensorBoard is not installed (pip install tensorboard); metrics go to %s only", METRICS_FILE)
        return None
    return SummaryWriter(str(directory), purge_step=start_step + 1)
