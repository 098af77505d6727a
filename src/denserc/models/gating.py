"""Head Selection Gate (HSG): one sigmoid gate per token and attention head, never mixing tokens."""
from __future__ import annotations

import torch
from torch import nn


class HeadSelectionGate(nn.Module):
    """``A = sigmoid(ln_1(x) @ W_H^T + b_H)``: a single ``Linear(width, heads)`` shared by all value layers.

    Initialisation: W_H = 0 and b_H = 0, so at step 0 every gate is exactly sigmoid(0) = 0.5 for
    every token and head (all heads weighted equally) and the gates start where the sigmoid is
    steepest, so they can move either way.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.linear = nn.Linear(width, heads)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, normed_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, width) tokens after the block's ``ln_1`` -> (B, N, heads) gates in (0, 1)."""
        return torch.sigmoid(self.linear(normed_tokens))
