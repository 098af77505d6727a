"""What `denserc catseg` shows in its help and the evaluation shares: shipped configs, the paper's benchmarks.

No torch here, so that `denserc --help` answers at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# Datasets are read first in the layout CAT-Seg's datasets/prepare_*.py write for detectron2
# (annotations_detectron2), then in mmseg's (denserc.eval.datasets).
DATASET_LAYOUT = "detectron2"


@dataclass(frozen=True)
class Benchmark:
    """A dataset reader, the vocabulary it is scored with, and where vocabulary entries land in its labels."""

    dataset: str
    class_names: str
    background_from: int | None = None  # vocabulary entries from this index on predict class 0 (background)


BENCHMARKS = {
    "ade847": Benchmark("ade847", "ade847"),
    "context459": Benchmark("context459", "context459"),
    "ade150": Benchmark("ade20k", "ade20k"),
    "context59": Benchmark("context59", "catseg_context59"),
    "voc20": Benchmark("voc20", "catseg_voc20"),
    "voc20b": Benchmark("voc21", "voc20b", background_from=20),
}
