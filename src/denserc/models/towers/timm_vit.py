"""open_clip ``TimmModel`` over timm's ``VisionTransformer``: SigLIP, SigLIP2 and other timm ViTs."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from timm.layers import Attention, AttentionPoolLatent
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat
from timm.models.vision_transformer import Block as TimmBlock
from torch import nn

from .base import Tower, resample_pos_embed, run_block


class TimmViTTower(Tower):
    """open_clip ``TimmModel`` over timm's ``VisionTransformer`` (SigLIP, SigLIP2 and other timm ViTs)."""

    family = "timm ViT (SigLIP)"
    block_type: type = TimmBlock
    attention_type: type = Attention

    @classmethod
    def problems(cls, visual: TimmModel) -> list[str]:
        trunk = visual.trunk
        problems = []
        if "pool" in dict(visual.head.named_children()):
            problems.append(f"open_clip's {type(visual.head.pool).__name__} pooling head (it mixes tokens)")
        if getattr(trunk, "patch_drop", None) is not None and not isinstance(trunk.patch_drop, nn.Identity):
            problems.append("patch dropout (timm patch_drop_rate > 0)")
        if getattr(trunk, "rope_mixed", False):
            problems.append("per-block 'mixed' RoPE")
        rope = getattr(trunk, "rope", None)
        if rope is not None and (type(rope) is not RotaryEmbeddingCat or getattr(rope, "aug_active", False)):
            problems.append(f"RoPE of type {type(rope).__name__} (needs RotaryEmbeddingCat without "
                            "coordinate augmentation)")
        pool = trunk.attn_pool
        if pool is not None and not isinstance(pool, AttentionPoolLatent):
            problems.append(f"attention pool {type(pool).__name__} (it mixes tokens; only the latent-query "
                            "'map' head can be applied per token)")
        elif pool is not None and pool.pos_embed is not None:
            problems.append("an attention-pool head with its own position embedding (a single token has no "
                            "position to take it from)")
        for i, block in enumerate(trunk.blocks):
            if type(block) is not cls.block_type:
                problems.append(f"block {i} is {type(block).__name__} (needs pre-norm timm "
                                f"{cls.block_type.__name__}; post-norm and parallel blocks have no per-head "
                                "value path behind a pre-norm)")
                break
            if type(block.attn) is not cls.attention_type or block.attn.gate is not None:
                problems.append(f"block {i} has {type(block.attn).__name__} attention"
                                f"{' with a sigmoid output gate' if block.attn.gate is not None else ''} "
                                f"(needs ungated timm {cls.attention_type.__name__})")
                break
        return problems

    @property
    def trunk(self) -> nn.Module:
        return self.visual.trunk

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.trunk.blocks

    @property
    def patch_size(self) -> int:
        return self.trunk.patch_embed.patch_size[0]

    @property
    def native_size(self) -> tuple[int, int]:
        return tuple(self.visual.image_size)

    @property
    def native_grid(self) -> tuple[int, int]:
        return tuple(self.trunk.patch_embed.grid_size)

    @property
    def width(self) -> int:
        return self.trunk.embed_dim

    @property
    def heads(self) -> int:
        return self.blocks[0].attn.num_heads

    @property
    def num_prefix_tokens(self) -> int:
        return self.trunk.num_prefix_tokens

    @property
    def pos_embed(self) -> torch.Tensor | None:
        return self.trunk.pos_embed

    def resample_pos_embed(self, pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == self.native_grid:
            return pos_embed
        prefix = 0 if self.trunk.no_embed_class else self.num_prefix_tokens
        return resample_pos_embed(pos_embed, grid, self.native_grid, num_prefix_tokens=prefix)

    def embed(self, images: torch.Tensor, pos_embed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """timm's patch embedding and ``_pos_embed`` for any grid (its strict size check bypassed)."""
        trunk = self.trunk
        patch_embed = trunk.patch_embed
        x = patch_embed.norm(patch_embed.proj(images).flatten(2).transpose(1, 2))
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        prefix = [token.expand(x.shape[0], -1, -1) for token in (trunk.cls_token, trunk.reg_token)
                  if token is not None]
        if pos_embed is not None and trunk.no_embed_class:
            x = x + pos_embed
        if prefix:
            x = torch.cat(prefix + [x], dim=1)
        if pos_embed is not None and not trunk.no_embed_class:
            x = x + pos_embed
        x = trunk.norm_pre(trunk.pos_drop(x))
        return x, self.rope(grid)

    def rope(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """Rotary embedding of the patch tokens for ``grid`` (None: the family has no RoPE)."""
        return None

    def norm1(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return block.norm1(x)

    def values(self, block: nn.Module, u: torch.Tensor) -> torch.Tensor:
        attn = block.attn
        size = attn.num_heads * attn.head_dim
        bias = attn.qkv.bias[2 * size:] if attn.qkv.bias is not None else None
        return F.linear(u, attn.qkv.weight[2 * size:], bias)

    def queries_keys_values(self, block: nn.Module, u: torch.Tensor, rope: torch.Tensor | None,
                            count: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """timm's fused qkv projection split in two, so that queries can be made for the leading tokens only."""
        attn = block.attn
        batch, tokens, _ = u.shape
        count = tokens if count is None else count
        size = attn.num_heads * attn.head_dim
        weight, bias = attn.qkv.weight, attn.qkv.bias
        q = F.linear(u[:, :count], weight[:size], None if bias is None else bias[:size])
        kv = F.linear(u, weight[size:], None if bias is None else bias[size:])
        q = q.view(batch, count, attn.num_heads, attn.head_dim).transpose(1, 2)
        k, v = kv.view(batch, tokens, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        return attn.q_norm(q), attn.k_norm(k), v

    def query_value_weights(self) -> list[tuple[str, nn.Parameter, slice | None]]:
        weights = []
        for i, block in enumerate(self.blocks):
            size = block.attn.num_heads * block.attn.head_dim
            weights.append((f"trunk.blocks.{i}.attn.qkv.weight", block.attn.qkv.weight, slice(size, 2 * size)))
        return weights

    def attention_out(self, block: nn.Module, values: torch.Tensor) -> torch.Tensor:
        return block.ls1(block.attn.proj(block.attn.norm(values)))

    def mlp_residual(self, block: nn.Module, y: torch.Tensor) -> torch.Tensor:
        return y + block.ls2(block.mlp(block.norm2(y)))

    def to_joint(self, tokens: torch.Tensor) -> torch.Tensor:
        """The trunk's final norm and head on every token: pooling of a single token, fc_norm, projections."""
        trunk = self.trunk
        x = trunk.norm(tokens)
        if trunk.attn_pool is not None:
            x = attention_pool_one_token(trunk.attn_pool, x)
        return self.visual.head(trunk.head(trunk.head_drop(trunk.fc_norm(x))))

    def encode_global(self, x: torch.Tensor, rope: torch.Tensor | None, checkpointed: Callable) -> torch.Tensor:
        for block in self.blocks:
            x = checkpointed(run_block, block, x, rope)
        return self.pool_global(x)

    def pool_global(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.head(self.trunk.forward_head(self.trunk.norm(x)))

    def pooled_tokens(self) -> int | None:
        """1 for class-token pooling; None for an attention-pool ("map") head or a reduction over the patches."""
        trunk = self.trunk
        if trunk.attn_pool is None and trunk.global_pool == "token" and self.num_prefix_tokens >= 1:
            return 1
        return None


def attention_pool_one_token(pool: AttentionPoolLatent, tokens: torch.Tensor) -> torch.Tensor:
    """``pool`` applied to each token on its own: (B, N, C) -> (B, N, C_out).

    With a single key every latent query puts all its attention on that token, so the pooled output is
    the token's value through the output projection, then the head's norm + MLP residual; every latent
    (and so their mean) gives the same vector.
    """
    size = pool.kv.out_features // 2
    bias = pool.kv.bias[size:] if pool.kv.bias is not None else None
    x = pool.proj(F.linear(tokens, pool.kv.weight[size:], bias))
    return x if pool.mlp is None else x + pool.mlp(pool.norm(x))
