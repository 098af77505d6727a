"""A CLIP image tower taken apart through the ``Tower`` adapters: per-block attention and MLP branches, a head
removed, attention maps, the class token as a sum of its branches. Every family goes through the same calls
(``norm1``, ``queries_keys_values``, ``attention_out``, ``mlp_residual``, ``pool_global``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.towers import run_block


def attention_probabilities(model, block, x: torch.Tensor, rope=None) -> torch.Tensor:
    """(B, H, T, T) softmax(q k^T / sqrt d) of the block, every token a query."""
    q, k, _ = model.tower.queries_keys_values(block, model.tower.norm1(block, x), rope)
    return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)


def block_branches(model, block, x: torch.Tensor, rope=None, drop_head: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the block adds to the residual stream: (attention branch, MLP branch), each (B, T, D), so that
    ``x + attention + mlp`` is the block's output. ``drop_head``: that head's values are zeroed before the
    output projection (its contribution removed; the other heads and every bias stay)."""
    tower = model.tower
    q, k, v = tower.queries_keys_values(block, tower.norm1(block, x), rope)
    heads_out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, d)
    if drop_head is not None:
        heads_out = heads_out.clone()
        heads_out[:, drop_head] = 0
    attention = tower.attention_out(block, heads_out.transpose(1, 2).flatten(2))
    after = x + attention
    return attention, tower.mlp_residual(block, after) - after


def class_embedding_without_head(model, states: list[torch.Tensor], layer: int, head: int, rope=None
                                 ) -> torch.Tensor:
    """The global embedding (B, E) with head ``head`` of block ``layer`` removed; ``states`` are the intact
    block inputs (``model.block_inputs``), so blocks before ``layer`` are not run again."""
    blocks = model.tower.blocks
    attention, mlp = block_branches(model, blocks[layer], states[layer], rope, drop_head=head)
    x = states[layer] + attention + mlp
    for block in blocks[layer + 1:]:
        x = run_block(block, x, rope)
    return model.tower.pool_global(x)


def class_token_decomposition(model, states: list[torch.Tensor], rope=None) -> dict[str, torch.Tensor]:
    """The class token of the last block's output as a sum: its input embedding, each block's attention branch
    and each block's MLP branch, all at the class token (B, D); ``states`` from ``model.block_inputs``.
    ``x_depth[cls] = embedding + sum(attention) + sum(mlp)`` holds exactly (up to float rounding)."""
    attention, mlp = [], []
    for block, x in zip(model.tower.blocks, states[:-1]):
        a, m = block_branches(model, block, x, rope)
        attention.append(a[:, 0])
        mlp.append(m[:, 0])
    return {"embedding": states[0][:, 0], "attention": torch.stack(attention, 1), "mlp": torch.stack(mlp, 1),
            "output": states[-1][:, 0]}


def patch_distances(grid: tuple[int, int]) -> torch.Tensor:
    """(h*w, h*w) Euclidean distances between patch centres, in patches, row-major."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], 1).float()
    return torch.cdist(centres, centres)


def mean_attention_distance(probabilities: torch.Tensor, grid: tuple[int, int], prefix: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head (B, H): the mean distance (patches) from a patch query to the patches it attends to, the
    attention renormalised over patch keys; and the share of a patch query's attention on prefix tokens."""
    patches = probabilities[:, :, prefix:, :]
    on_patches = patches[..., prefix:]
    mass = on_patches.sum(-1)  # (B, H, N)
    distance = (on_patches * patch_distances(grid).to(on_patches)).sum(-1) / mass.clamp(min=1e-12)
    return distance.mean(-1), (1 - mass).mean(-1)


def zero_shot_predictions(classifier, features: torch.Tensor) -> torch.Tensor:
    """Top-1 class of each feature (K, E) under a ``denserc.eval.TextClassifier`` (synonyms reduced by max)."""
    embeddings = classifier.embeddings.to(features)
    return classifier.class_scores(F.normalize(features, dim=-1) @ embeddings.T).argmax(-1)
