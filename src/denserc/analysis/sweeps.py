"""The sweeps behind the paper's choices: the number of value layers L (training-free and trained) and the
weight lambda of L_coherence (trained, several seeds). Trained points are distilled with the ordinary trainer
into ``RUNS/L{L}-lambda{lambda}-seed{seed}/`` and reused when ``final/`` is already there, so a sweep can be
resumed, or its runs made ahead one at a time with ``denserc train`` into the same folders."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from ..distributed import cleanup_distributed, setup_distributed
from ..models import load
from ..reports import markdown_table
from ..engine.loop import Engine
from ..train import load_config
from ..train.trainer import DistillationTask
from .variants import same_weights

LAMBDAS = (0.0, 0.0125, 0.025, 0.05, 0.1)


def run_name(num_layers: int, coherence_weight: float, seed: int) -> str:
    return f"L{num_layers}-lambda{coherence_weight:g}-seed{seed}"


def trained_model(config_name: str, runs: Path, num_layers: int, coherence_weight: float, seed: int,
                  overrides=()) -> tuple[Path, bool]:
    """The exported model of one sweep point (trained now unless ``final/`` exists) and whether it was reused."""
    run_dir = Path(runs) / run_name(num_layers, coherence_weight, seed)
    final = run_dir / "final"
    if final.is_dir():
        return final, True
    config = load_config(config_name, [f"model.num_layers={num_layers}", f"loss.coherence_weight={coherence_weight}",
                                       f"train.seed={seed}", f"data.seed={seed}", f"train.output_dir={run_dir}",
                                       *overrides])
    if config.model.construction != "multi-v":
        raise ValueError(f"config {config_name}: the sweeps need model.construction multi-v, "
                         f"got {config.model.construction}")
    env = setup_distributed(config.train.device)
    try:
        return Path(Engine(DistillationTask(config, env), config, env, run_dir).fit()), False
    finally:
        cleanup_distributed()


def layer_sweep_training_free(model, evaluate: Callable, progress: bool = True) -> list[dict]:
    """``evaluate`` of ``model``'s weights with multi-v over the last L blocks, L = 1 .. depth (its own gating)."""
    rows = []
    for num_layers in tqdm(range(1, model.depth + 1), desc="L (training-free)", disable=not progress):
        variant = same_weights(model, "multi-v", model.gating, num_layers)
        rows.append({"num_layers": num_layers, "trained": False, "metrics": evaluate(variant)})
    return rows


def trained_sweep(points, config_name: str, runs: Path, evaluate: Callable, overrides=(),
                  progress: bool = True, existing_only: bool = False) -> tuple[list[dict], list[str]]:
    """``points``: (num_layers, lambda, seed) triples; each distilled (or reused) and evaluated. With
    ``existing_only`` a point not trained yet is skipped; returns the rows and the skipped points' run names."""
    rows, missing = [], []
    for num_layers, weight, seed in tqdm(list(points), desc="trained points", disable=not progress):
        if existing_only and not (Path(runs) / run_name(num_layers, weight, seed) / "final").is_dir():
            missing.append(run_name(num_layers, weight, seed))
            continue
        final, reused = trained_model(config_name, runs, num_layers, weight, seed, overrides)
        rows.append({"num_layers": num_layers, "lambda": weight, "seed": seed, "trained": True, "run": str(final),
                     "reused": reused, "metrics": evaluate(load(final))})
    return rows, missing


def summarise(rows: list[dict], key: str, metrics) -> list[dict]:
    """Rows grouped by ``key`` (and training): mean and std over seeds of every metric."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["trained"], row[key]), []).append(row)
    summary = []
    for (trained, value), members in groups.items():
        entry = {key: value, "trained": trained, "seeds": [m.get("seed") for m in members]}
        for metric in metrics:
            values = [m["metrics"][metric] for m in members]
            entry[metric] = statistics.mean(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else None
        summary.append(entry)
    return summary


def markdown(summary: list[dict], key: str, metrics, labels: dict) -> str:
    header = [key if key != "num_layers" else "L", "trained", "seeds", *(labels.get(m, m) for m in metrics)]
    rows = []
    for entry in summary:
        cells = []
        for metric in metrics:
            spread = entry[f"{metric}_std"]
            cells.append(f"{entry[metric]:.1f}" + (f" ± {spread:.1f}" if spread is not None else ""))
        seeds = ", ".join(str(s) for s in entry["seeds"]) if entry["trained"] else "-"
        rows.append([f"{entry[key]:g}", "yes" if entry["trained"] else "no", seeds, *cells])
    return markdown_table(header, rows) + "\n"
