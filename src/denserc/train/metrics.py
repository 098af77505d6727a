"""Metrics on the main process: JSON lines (always) and TensorBoard (when installed)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..io import atomic_write

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


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
