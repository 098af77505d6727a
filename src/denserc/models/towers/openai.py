"""open_clip's own pre-LN ``VisionTransformer`` (OpenAI-style CLIP ViTs), and open_clip's text tower."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from .base import Tower, Workspace, _linear_into, _mha_queries_keys_values, resample_pos_embed, run_block


class OpenCLIPTower(Tower):
    """open_clip's own pre-LN ``VisionTransformer`` (OpenAI-style CLIP ViTs)."""

    family = "open_clip ViT"

    @staticmethod
    def problems(visual: VisionTransformer) -> list[str]:
        problems = []
        if visual.attn_pool is not None:
            problems.append("attentional pooling")
        if visual.pool_type != "tok":
            problems.append(f"pool_type={visual.pool_type!r} (needs 'tok')")
        if visual.final_ln_after_pool:
            problems.append("final_ln_after_pool")
        if visual.proj is None:
            problems.append("no output projection")
        for i, block in enumerate(visual.transformer.resblocks):
            if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.attn, nn.MultiheadAttention):
                problems.append(f"block {i} is {type(block).__name__} (needs ResidualAttentionBlock "
                                "with nn.MultiheadAttention)")
                break
            if hasattr(block, "ln_1_kv"):
                problems.append(f"block {i} is a cross-attention block")
                break
        return problems

    @property
    def blocks(self) -> Sequence[ResidualAttentionBlock]:
        return self.visual.transformer.resblocks

    @property
    def patch_size(self) -> int:
        return self.visual.patch_size[0]

    @property
    def native_size(self) -> tuple[int, int]:
        return tuple(self.visual.image_size)

    @property
    def native_grid(self) -> tuple[int, int]:
        return tuple(self.visual.grid_size)

    @property
    def width(self) -> int:
        return self.visual.transformer.width

    @property
    def heads(self) -> int:
        return self.blocks[0].attn.num_heads

    num_prefix_tokens = 1

    @property
    def pos_embed(self) -> torch.Tensor:
        return self.visual.positional_embedding

    def resample_pos_embed(self, pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == self.native_grid:
            return pos_embed  # bit-exact open_clip at the native size
        return resample_pos_embed(pos_embed[None], grid, self.native_grid, num_prefix_tokens=1)[0]

    def embed(self, images: torch.Tensor, pos_embed: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        x = self.visual.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + pos_embed.to(x.dtype)
        return self.visual.ln_pre(x), None

    def norm1(self, block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
        return block.ln_1(x)

    def values(self, block: ResidualAttentionBlock, u: torch.Tensor) -> torch.Tensor:
        width = u.shape[-1]
        return F.linear(u, block.attn.in_proj_weight[2 * width:], block.attn.in_proj_bias[2 * width:])

    def queries_keys_values(self, block: ResidualAttentionBlock, u: torch.Tensor, rope: None,
                            count: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _mha_queries_keys_values(block.attn, u, count)

    def query_value_weights(self) -> list[tuple[str, nn.Parameter, slice | None]]:
        return [(f"transformer.resblocks.{i}.attn.in_proj_weight", block.attn.in_proj_weight,
                 slice(self.width, 2 * self.width)) for i, block in enumerate(self.blocks)]

    def run_block_inference(self, block: ResidualAttentionBlock, x: torch.Tensor, rope: None,
                            workspace: Workspace) -> torch.Tensor:
        """Without autograd, every linear of open_clip's own block writes into ``workspace``
        (``run_open_clip_block_into``); with autograd, or another block type, ``run_block``."""
        if type(block) is ResidualAttentionBlock and not torch.is_grad_enabled():
            return run_open_clip_block_into(block, x, workspace)
        return run_block(block, x, rope)

    def attention_out(self, block: ResidualAttentionBlock, values: torch.Tensor) -> torch.Tensor:
        return block.ls_1(block.attn.out_proj(values))

    def mlp_residual(self, block: ResidualAttentionBlock, y: torch.Tensor) -> torch.Tensor:
        return y + block.ls_2(block.mlp(block.ln_2(y)))

    def to_joint(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.visual.ln_post(tokens) @ self.visual.proj

    def encode_global(self, x: torch.Tensor, rope: None, checkpointed: Callable) -> torch.Tensor:
        x = self.visual.patch_dropout(x)
        for block in self.blocks:
            x = checkpointed(block, x)
        return self.pool_global(x)

    def pool_global(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.ln_post(x[:, 0]) @ self.visual.proj

    def pooled_tokens(self) -> int:
        return 1  # token pooling of the class token (``problems`` refuses every other pooling)


def text_attention_weights(clip: nn.Module) -> list[tuple[str, nn.Parameter, slice]]:
    """The packed q/k/v projection weight of every block of open_clip's text tower (``TextTransformer``).

    One entry per block: its name under ``clip``, the (3D, D) ``in_proj_weight`` and the slice of its key
    rows. An empty list for a text tower of another kind (e.g. Hugging Face).
    """
    text = getattr(clip, "text", clip)
    transformer = getattr(text, "transformer", None)
    prefix = "text.transformer" if text is not clip else "transformer"
    weights = []
    for i, block in enumerate(getattr(transformer, "resblocks", ())):
        attn = getattr(block, "attn", None)
        if isinstance(attn, nn.MultiheadAttention) and attn.in_proj_weight is not None:
            width = attn.embed_dim
            weights.append((f"{prefix}.resblocks.{i}.attn.in_proj_weight", attn.in_proj_weight,
                            slice(width, 2 * width)))
    return weights


def run_open_clip_block_into(block: ResidualAttentionBlock, x: torch.Tensor, workspace: Workspace) -> torch.Tensor:
    """``run_block(block, x)`` without autograd, every linear's output (q/k/v, attention projection, MLP
    hidden and output) and the heads' concatenation written into ``workspace``, the MLP's GELU and the second
    residual add applied in place."""
    attn = block.attn
    batch, tokens, width = x.shape
    heads = attn.num_heads
    u = block.ln_1(x).reshape(batch * tokens, width)
    qkv = _linear_into(workspace, "qkv", u, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    attended = F.scaled_dot_product_attention(q, k, v)
    values = workspace.get("values", batch * tokens, width, attended, attended.dtype)
    values.view(batch, tokens, heads, width // heads).copy_(attended.transpose(1, 2))
    out = _linear_into(workspace, "attn_out", values, attn.out_proj.weight, attn.out_proj.bias)
    x = x + block.ls_1(out.view(batch, tokens, width))  # x is new here: the caller's tokens stay as they were
    h = block.ln_2(x).reshape(batch * tokens, width)
    for name, layer in block.mlp.named_children():
        if isinstance(layer, nn.Linear):
            h = _linear_into(workspace, f"mlp.{name}", h, layer.weight, layer.bias)
        elif isinstance(layer, nn.GELU):
            h = torch._C._nn.gelu_(h, approximate=layer.approximate)
        else:
            h = layer(h)
    return x.add_(block.ls_2(h.view(batch, tokens, -1)))
