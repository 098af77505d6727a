"""The analyses' pictures (matplotlib's object API: no pyplot state, no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure


def gradient_histogram(per_patch: dict, path: Path, title: str) -> Path:
    """Fig. 3 of the paper: the distribution of per-patch gradient norms, one curve per variant (log axes)."""
    figure = Figure(figsize=(7, 4.2))
    axes = figure.subplots()
    values = {name: np.asarray(v, dtype=float) for name, v in per_patch.items()}  # (images, patches)
    positive = np.concatenate([v[v > 0] for v in values.values()])
    bins = np.geomspace(positive.min(), positive.max(), 60)
    for name, v in values.items():
        ratio = (v.max(1) / v.mean(1)).mean()  # per image, averaged: the table's peak_over_mean
        axes.hist(v[v > 0], bins=bins, histtype="step", linewidth=1.6, label=f"{name}: peak/mean {ratio:.1f}")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("per-patch gradient norm of L_semantics")
    axes.set_ylabel("patches")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def head_maps(report: dict, path: Path, title: str) -> Path:
    """Heat maps per block and head: gate mean (hsg), zero-shot change without the head, attention distance."""
    panels = [(report["mean_attention_distance"], "mean attention distance (patches)", "viridis", None),
              (report["zero_shot_change_without_head"], "zero-shot change without the head (points)", "RdBu", "sym")]
    if report.get("gate_mean") is not None:
        panels.insert(0, (report["gate_mean"], "HSG gate, mean over images", "magma", None))
    figure = Figure(figsize=(4.2 * len(panels), 3.8))
    for axes, (values, label, cmap, scale) in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels):
        values = np.asarray(values, dtype=float)
        limit = np.abs(values).max() or 1.0
        image = axes.imshow(values, cmap=cmap, aspect="auto",
                            **({"vmin": -limit, "vmax": limit} if scale == "sym" else {}))
        rows = report["gate_layers"] if values.shape[0] != len(report["mean_attention_distance"]) else range(len(values))
        axes.set_yticks(range(len(values)), [str(r) for r in rows])
        axes.set_xlabel("head")
        axes.set_ylabel("block")
        axes.set_title(label, fontsize=9)
        figure.colorbar(image, ax=axes)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def sweep_plot(summary: list[dict], key: str, metrics, labels: dict, path: Path, title: str) -> Path:
    """One colour per metric against the swept value: trained points solid, training-free ones dashed."""
    figure = Figure(figsize=(8.5, 4.2))
    axes = figure.subplots()
    colours = colormaps["tab10"].colors
    for trained in (False, True):
        points = [s for s in summary if s["trained"] == trained]
        if not points:
            continue
        x = [s[key] for s in points]
        for metric, colour in zip(metrics, colours):
            y = [s[metric] for s in points]
            error = [s[f"{metric}_std"] or 0 for s in points]
            axes.errorbar(x, y, yerr=error, color=colour, marker="o" if trained else "s",
                          linestyle="-" if trained else "--",
                          label=f"{labels.get(metric, metric)}{' (trained)' if trained else ' (training-free)'}")
    axes.set_xlabel("L (value layers)" if key == "num_layers" else "lambda (L_coherence weight)")
    axes.set_ylabel("%")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def bars(groups: dict[str, dict[str, float]], ylabel: str, path: Path, title: str) -> Path:
    """Grouped bars: ``groups`` = {group: {series: value}}."""
    figure = Figure(figsize=(7, 4.2))
    axes = figure.subplots()
    names = list(groups)
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        axes.bar(np.arange(len(names)) + i * width, [groups[g].get(name, np.nan) for g in names], width, label=name)
    axes.set_xticks(np.arange(len(names)) + width * (len(series) - 1) / 2, names, fontsize=8)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path
