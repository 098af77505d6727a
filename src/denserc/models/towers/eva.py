"""open_clip ``TimmModel`` over timm's ``Eva``: EVA-02-CLIP (RoPE, inner attention LayerNorm, SwiGLU)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.models.eva import EvaAttention, EvaBlock
from torch import nn

from .timm_vit import TimmViTTower


class EvaTower(TimmViTTower):
    """open_clip ``TimmModel`` over timm's ``Eva`` (EVA-02-CLIP): RoPE, inner attention LayerNorm, SwiGLU."""

    family = "EVA (timm Eva)"
    block_type = EvaBlock
    attention_type = EvaAttention

    def rope(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """The trunk's RoPE for ``grid``: its cached table at the native grid, else rebuilt for the grid.

        timm's cached RoPE ignores ``get_embed``'s shape argument; ``_build_embed_cat`` is what its
        ``dynamic_img_size`` path calls, so any grid gets the coordinates (scaled to ``ref_feat_shape``,
        as EVA-CLIP interpolates its frequencies) the trunk would use at that size.
        """
        rope = self.trunk.rope
        if rope is None:
            return None
        if tuple(grid) == self.native_grid:
            return rope.get_embed()
        return rope._build_embed_cat(list(grid), rope.bands)

    def values(self, block: EvaBlock, u: torch.Tensor) -> torch.Tensor:
        attn = block.attn
        if attn.qkv is None:
            return attn.v_proj(u)
        size = attn.num_heads * attn.head_dim
        return F.linear(u, attn.qkv.weight[2 * size:], attn.v_bias)

    def queries_keys_values(self, block: EvaBlock, u: torch.Tensor, rope: torch.Tensor | None,
                            count: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """EvaAttention's separate or fused projections, q/k norms, RoPE on the non-prefix tokens."""
        attn = block.attn
        batch, tokens, _ = u.shape
        count = tokens if count is None else count
        if attn.qkv is None:
            q = attn.q_proj(u[:, :count])
            k, v = attn.k_proj(u), attn.v_proj(u)
        else:
            size = attn.num_heads * attn.head_dim
            weight = attn.qkv.weight
            q = F.linear(u[:, :count], weight[:size], attn.q_bias)
            k = F.linear(u, weight[size:2 * size], attn.k_bias)
            v = F.linear(u, weight[2 * size:], attn.v_bias)
        q = q.reshape(batch, count, attn.num_heads, -1).transpose(1, 2)
        k, v = (t.reshape(batch, tokens, attn.num_heads, -1).transpose(1, 2) for t in (k, v))
        q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is not None:
            prefix = attn.num_prefix_tokens
            if prefix < count < tokens:
                raise ValueError(f"queries for {count} of {tokens} tokens: only the {prefix} prefix tokens or all")

            def rotate(t: torch.Tensor) -> torch.Tensor:
                return torch.cat([t[:, :, :prefix], apply_rot_embed_cat(t[:, :, prefix:], rope, half=attn.rotate_half)],
                                 dim=2).type_as(v)
            k = rotate(k)
            q = rotate(q) if count == tokens else q
        return q, k, v

    def query_value_weights(self) -> list[tuple[str, nn.Parameter, slice | None]]:
        """EVA-CLIP's separate ``q_proj``/``v_proj`` weights (or the fused ``qkv`` with its key rows frozen)."""
        weights = []
        for i, block in enumerate(self.blocks):
            attn, prefix = block.attn, f"trunk.blocks.{i}.attn"
            if attn.qkv is None:
                weights += [(f"{prefix}.q_proj.weight", attn.q_proj.weight, None),
                            (f"{prefix}.v_proj.weight", attn.v_proj.weight, None)]
            else:
                size = attn.num_heads * attn.head_dim
                weights.append((f"{prefix}.qkv.weight", attn.qkv.weight, slice(size, 2 * size)))
        return weights

    def attention_out(self, block: EvaBlock, values: torch.Tensor) -> torch.Tensor:
        out = block.attn.proj(block.attn.norm(values))
        return out if block.gamma_1 is None else block.gamma_1 * out

    def mlp_residual(self, block: EvaBlock, y: torch.Tensor) -> torch.Tensor:
        out = block.mlp(block.norm2(y))
        return y + (out if block.gamma_2 is None else block.gamma_2 * out)
