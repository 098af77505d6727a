"""Statistics the analyses report: concentration of a per-patch quantity, gate agreement, class separation."""
from __future__ import annotations

import math

import torch

TOP_SHARE = 0.05  # "top-5 % share": the share of the total held by the largest 5 % of the patches


def gini(values: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of non-negative values along the last dim: 0 when all are equal, (n-1)/n when one
    holds everything. ``sum_i (2i - n - 1) x_(i) / (n sum x)`` over the ascending order statistics x_(i)."""
    ordered = values.sort(dim=-1).values
    n = ordered.shape[-1]
    ranks = torch.arange(1, n + 1, dtype=ordered.dtype, device=ordered.device)
    total = ordered.sum(-1)
    return ((2 * ranks - n - 1) * ordered).sum(-1) / (n * total).clamp(min=torch.finfo(ordered.dtype).tiny)


def top_share(values: torch.Tensor, fraction: float = TOP_SHARE) -> torch.Tensor:
    """Share of the sum (last dim) held by the largest ``ceil(fraction * n)`` values."""
    n = values.shape[-1]
    k = max(1, math.ceil(round(fraction * n, 9)))
    return values.topk(k, dim=-1).values.sum(-1) / values.sum(-1).clamp(min=torch.finfo(values.dtype).tiny)


def concentration(per_patch: torch.Tensor) -> dict[str, float]:
    """(images, patches) non-negative values -> per-image peak, mean, peak/mean, top-5 % share and Gini,
    each averaged over the images."""
    peak = per_patch.max(-1).values
    mean = per_patch.mean(-1)
    return {"peak": peak.mean().item(), "mean": mean.mean().item(), "peak_over_mean": (peak / mean).mean().item(),
            "top5_share": top_share(per_patch).mean().item(), "gini": gini(per_patch).mean().item()}


def gate_statistics(gates: torch.Tensor) -> dict:
    """(images, layers, heads) per-image mean gates -> mean and std over images (lists of layers of heads)
    and the mean Pearson correlation between the gate vectors of every two images (None when the gates do
    not vary across heads and layers, e.g. the uniform initial gate, where a correlation is undefined)."""
    flat = gates.flatten(1).double()
    centred = flat - flat.mean(1, keepdim=True)
    norms = centred.norm(dim=1)
    correlation = None
    if len(flat) > 1 and bool((norms > 1e-12).all()):
        unit = centred / norms[:, None]
        pairs = unit @ unit.T
        n = len(flat)
        correlation = ((pairs.sum() - pairs.diagonal().sum()) / (n * (n - 1))).item()
    return {"gate_mean": gates.mean(0).tolist(), "gate_std": gates.std(0, unbiased=len(gates) > 1).tolist(),
            "between_image_correlation": correlation}


def class_separation(features: torch.Tensor, labels: torch.Tensor) -> dict | None:
    """Spread of L2-normalised features (K, E) by class: within-class and between-class scatter and their
    ratio (a Fisher ratio: trace(S_B) / trace(S_W), both per feature), the mean cosine of a feature to its own
    class mean and to the other classes' means. Classes with a single member are left out (they have no spread
    of their own and would pull S_W down); ``singletons`` counts them. None with fewer than two classes left."""
    classes, counts = labels.unique(return_counts=True)
    kept = torch.isin(labels, classes[counts > 1])
    singletons = int((counts == 1).sum())
    features = torch.nn.functional.normalize(features[kept].double(), dim=-1)
    classes, inverse, counts = labels[kept].unique(return_inverse=True, return_counts=True)
    if len(classes) < 2:
        return None  # no between-class spread to speak of
    means = torch.zeros(len(classes), features.shape[1], dtype=features.dtype).index_add_(0, inverse, features)
    means /= counts[:, None]
    overall = features.mean(0)
    within = (features - means[inverse]).square().sum(1).mean()
    between = (counts[:, None] * (means - overall).square()).sum() / len(features)
    cosines = features @ torch.nn.functional.normalize(means, dim=-1).T  # (K, C)
    own = cosines.gather(1, inverse[:, None]).squeeze(1)
    others = (cosines.sum(1) - own) / max(1, len(classes) - 1)
    return {"segments": len(features), "classes": len(classes), "singletons": singletons, "within_scatter": within.item(),
            "between_scatter": between.item(), "fisher_ratio": (between / within).item(),
            "cos_to_own_class": own.mean().item(), "cos_to_other_classes": others.mean().item()}
