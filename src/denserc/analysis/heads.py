"""What the heads do: the Head Selection Gate per value block and head across images, and each head's weight in
the class token's zero-shot decision and its locality (mean attention distance)."""
from __future__ import annotations

import torch
from tqdm import tqdm

from ..models import normalize_images
from .internals import (attention_probabilities, class_embedding_without_head, mean_attention_distance,
                        patch_distances, zero_shot_predictions)
from .stats import gate_statistics

BATCH = 32


def _batches(pixels: torch.Tensor, model, size: int = BATCH):
    for chunk in pixels.split(size):
        yield normalize_images(chunk, model.preprocess_cfg, white=1.0)


@torch.no_grad()
def image_gates(model, pixels: torch.Tensor) -> torch.Tensor:
    """(images, L, H): each value block's gate per head, averaged over the image's patches (an hsg model)."""
    if model.gate is None:
        raise ValueError(f"gate statistics need an hsg model; this one is {model.construction}/{model.gating}")
    tower, prefix = model.tower, model.tower.num_prefix_tokens
    first = model.depth - model.num_layers
    gates = []
    for images in _batches(pixels, model):
        states, _, _ = model.block_inputs(images)
        gates.append(torch.stack([model.gate(tower.norm1(block, x)[:, prefix:]).mean(1)
                                  for block, x in zip(tower.blocks[first:], states[first:model.depth])], 1))
    return torch.cat(gates)


@torch.no_grad()
def attention_locality(model, pixels: torch.Tensor) -> dict:
    """Per block and head (lists of depth lists of H), over the images: the mean attention distance of patch
    queries to patch keys (in patches) and the share of their attention on prefix tokens; for scale, the
    distance under uniform attention over the grid."""
    distances, prefix_shares = [], []
    for images in _batches(pixels, model, 8):
        states, rope, grid = model.block_inputs(images)
        per_block = [mean_attention_distance(attention_probabilities(model, block, x, rope), grid,
                                             model.tower.num_prefix_tokens)
                     for block, x in zip(model.tower.blocks, states)]
        distances.append(torch.stack([d for d, _ in per_block], 1))
        prefix_shares.append(torch.stack([s for _, s in per_block], 1))
    return {"mean_attention_distance": torch.cat(distances).mean(0).tolist(),
            "prefix_attention_share": torch.cat(prefix_shares).mean(0).tolist(),
            "uniform_attention_distance": patch_distances(grid).mean().item()}


@torch.no_grad()
def head_removal(model, crops: torch.Tensor, classifier, labels: torch.Tensor | None,
                 progress: bool = True) -> dict:
    """The class token's zero-shot top-1 (among ``classifier``'s rows; accuracy against ``labels``, or without
    labels agreement with the intact model's prediction) with each block's each head removed; ``classifier``:
    a ``denserc.eval.TextClassifier``."""
    tower = model.tower
    states, predictions = [], []
    for images in _batches(crops, model):
        batch_states, rope, _ = model.block_inputs(images)
        states.append(batch_states)
        predictions.append(zero_shot_predictions(classifier, tower.pool_global(batch_states[-1])))
    intact = torch.cat(predictions)
    reference = labels if labels is not None else intact
    baseline = (intact == reference).float().mean().item() * 100
    change = torch.zeros(model.depth, model.heads)
    with tqdm(total=model.depth * model.heads, desc="heads removed", disable=not progress) as bar:
        for layer in range(model.depth):
            for head in range(model.heads):
                removed = torch.cat([
                    zero_shot_predictions(classifier, class_embedding_without_head(model, s, layer, head, rope))
                    for s in states])
                change[layer, head] = (removed == reference).float().mean().item() * 100 - baseline
                bar.update()
    return {"zero_shot_measure": "accuracy" if labels is not None else "agreement with the intact model",
            "zero_shot_top1": baseline, "zero_shot_change_without_head": change.tolist()}


def head_analysis(model, data, classifier, progress: bool = True) -> dict:
    """Gate statistics (an hsg model; None otherwise), head removal and attention locality."""
    report = {"gate_mean": None, "gate_std": None, "between_image_correlation": None, "gate_layers": None}
    if model.gate is not None:
        report.update(gate_statistics(image_gates(model, data.images)))
        report["gate_layers"] = list(range(model.depth - model.num_layers, model.depth))
    report.update(head_removal(model, data.crops, classifier, data.crop_labels, progress))
    report.update(attention_locality(model, data.images))
    return report
