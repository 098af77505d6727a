"""How much of the class token the multi-layer value paths explain, how consistent the dense features are
within a class, and a Monte Carlo check of the paper's Delta L = sum S^2 E||Pv||^2 > 0."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import normalize_images, pool_masks
from .internals import class_token_decomposition, zero_shot_predictions
from .stats import class_separation
from .variants import same_weights


@torch.no_grad()
def decomposition_analysis(model, crops: torch.Tensor, classifier, labels: torch.Tensor | None,
                           num_layers: int | None = None) -> dict:
    """The class token x_cls = embedding + sum_l attention_l + sum_l mlp_l (exact; ``identity_error`` is the
    largest relative deviation). Each part below goes through the tower's final norm and projection
    (``to_joint``) and is compared with the global embedding: cosine, and zero-shot agreement of the top-1 class
    under ``classifier`` (a ``denserc.eval.TextClassifier``) (and accuracy with ``labels``):

    - ``value_paths_last_L``: the attention branches of the last L blocks at the class token (the value paths
      the class token aggregates; DenseRC's multi-v reads the same blocks);
    - ``value_paths_all``: the attention branches of every block;
    - ``dense_mean``: the mean over patches of multi-v dense features (no gating), the patch-wise analogue.
    """
    if model.tower.pooled_tokens() != 1:
        raise ValueError("the class-token decomposition needs a tower that pools its class token "
                         f"({model.model_name} does not)")
    num_layers = num_layers or (model.num_layers if model.construction == "multi-v" else 3)
    tower = model.tower
    dense_model = same_weights(model, "multi-v", "none", num_layers)
    parts = {"global": [], "value_paths_last_L": [], "value_paths_all": [], "dense_mean": []}
    errors = []
    for chunk in crops.split(64):
        images = normalize_images(chunk, model.preprocess_cfg, white=1.0)
        states, rope, _ = model.block_inputs(images)
        pieces = class_token_decomposition(model, states, rope)
        rebuilt = pieces["embedding"] + pieces["attention"].sum(1) + pieces["mlp"].sum(1)
        errors.append(((rebuilt - pieces["output"]).norm(dim=-1) / pieces["output"].norm(dim=-1)).max())
        parts["global"].append(tower.pool_global(states[-1]))
        parts["value_paths_last_L"].append(tower.to_joint(pieces["attention"][:, -num_layers:].sum(1, keepdim=True))[:, 0])
        parts["value_paths_all"].append(tower.to_joint(pieces["attention"].sum(1, keepdim=True))[:, 0])
        parts["dense_mean"].append(dense_model.encode_dense(images).mean((2, 3)))
    parts = {name: F.normalize(torch.cat(values).float(), dim=-1) for name, values in parts.items()}
    predicted = {name: zero_shot_predictions(classifier, values) for name, values in parts.items()}
    report = {"num_layers": num_layers, "crops": len(crops), "identity_error": max(errors).item()}
    for name in ("value_paths_last_L", "value_paths_all", "dense_mean"):
        report[name] = {"cosine_to_global": (parts[name] * parts["global"]).sum(-1).mean().item(),
                        "zero_shot_agreement": (predicted[name] == predicted["global"]).float().mean().item() * 100}
    if labels is not None:
        report["zero_shot_accuracy"] = {name: (p == labels).float().mean().item() * 100 for name, p in predicted.items()}
    return report


@torch.no_grad()
def consistency_analysis(model, images: torch.Tensor, segments, class_names: list[str]) -> dict:
    """Mask-pooled dense features of every segment (``pool_masks``), separated by class: things, stuff and all
    (``stats.class_separation``)."""
    if segments is None:
        raise ValueError("the feature-consistency report needs segments with classes (a plug-in's data such as the "
                         "testbed's; an image folder has none)")
    features, labels, things = [], [], []
    for start in range(0, len(images), 32):
        chunk = images[start:start + 32]
        dense = F.normalize(model.encode_dense(normalize_images(chunk, model.preprocess_cfg, white=1.0)), dim=1)
        for feature_map, image_segments in zip(dense, segments[start:start + 32]):
            if not image_segments:
                continue
            masks = torch.stack([segment.mask for segment in image_segments])
            features.append(pool_masks(feature_map[None], [masks]))
            labels += [segment.label for segment in image_segments]
            things += [segment.isthing for segment in image_segments]
    features, labels, things = torch.cat(features), torch.tensor(labels), torch.tensor(things)
    return {kind: class_separation(features[rows], labels[rows])
            for kind, rows in (("things", things), ("stuff", ~things), ("all", torch.ones_like(things)))}


def delta_l_monte_carlo(samples: int = 20000, patches: int = 16, dim: int = 32, rank: int = 8, *,
                        mean_shift: float = 0.0, seed: int = 0) -> dict:
    """Monte Carlo check of Delta L = sum_m S_m^2 E||P v_m||^2 > 0.

    The setting behind the formula: a patch's feature is its own value v_0, compared with a target t by the
    squared error. Spatial aggregation adds what the attention row S brings in from the other patches,
    x~ = v_0 + sum_m S_m P v_m (P: the part of another patch's value that reaches this patch's feature, a fixed
    rank-``rank`` linear map). When the P v_m are zero-mean and independent of each other and of (t, v_0), the
    cross terms vanish and E||t - x~||^2 - E||t - v_0||^2 = sum_m S_m^2 E||P v_m||^2 = sum_m S_m^2 tr(P P^T)
    for v_m ~ N(0, I). ``mean_shift`` > 0 gives the v_m a common mean, breaking the zero-mean assumption:
    then the difference has an extra ||sum_m S_m P mu||^2 and the formula under-predicts.
    Returns the Monte Carlo difference with its standard error, the formula's value and their ratio.
    """
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(dim, rank, generator=generator, dtype=torch.float64)
    projection = projection @ torch.randn(rank, dim, generator=generator, dtype=torch.float64) / dim ** 0.5
    weights = torch.softmax(2 * torch.randn(patches, generator=generator, dtype=torch.float64), 0)
    target = torch.randn(samples, dim, generator=generator, dtype=torch.float64)
    own = target + torch.randn(samples, dim, generator=generator, dtype=torch.float64)
    mean = torch.full((dim,), mean_shift, dtype=torch.float64)
    others = torch.randn(samples, patches, dim, generator=generator, dtype=torch.float64) + mean
    aggregated = own + torch.einsum("m,smd,ed->se", weights, others, projection)
    difference = (target - aggregated).square().sum(-1) - (target - own).square().sum(-1)
    predicted = (weights.square().sum() * projection.square().sum()).item()
    measured = difference.mean().item()
    return {"samples": samples, "patches": patches, "dim": dim, "rank": rank, "mean_shift": mean_shift,
            "measured_delta_l": measured, "standard_error": (difference.std() / samples ** 0.5).item(),
            "formula_delta_l": predicted, "ratio": measured / predicted,
            "attention_sum_of_squares": weights.square().sum().item()}
