"""AdamW over a task's trainable parameters, and the warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math
from typing import Iterable

from torch import nn


def parameter_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                     no_decay_prefixes: tuple[str, ...] = ()) -> list[dict]:
    """Two AdamW groups: matrices decay; norms, biases, 1-D embeddings and gate parameters do not."""
    decay, no_decay = [], []
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or name.startswith(no_decay_prefixes):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    """LR multiplier: linear from 1/warmup to 1 over ``warmup_steps``, then cosine down to ``min_ratio``.

    ``step`` counts optimizer steps taken so far (LambdaLR calls it with 0 before the first step).
    """
    warmup_steps = min(warmup_steps, total_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return multiplier

