"""CLIP image towers that DenseRC can decompose: one small adapter per family.

Dense construction (``dense.py``) is written once against the pieces every pre-LN ViT block has
(first norm, per-head values, q/k, output projection, LayerScale, MLP branch) and the tower's final
norm and projection; a ``Tower`` says where each piece lives in its family and how the family
computes it (RoPE, inner attention norms, pooling heads). Families:

- open_clip ViT (``VisionTransformer``: OpenAI CLIP, LAION/DataComp ViTs): values from rows [2D:3D] of
  ``attn.in_proj``, ``out_proj``, ``ls_1``; ``ln_post`` and ``proj``.
- EVA-02-CLIP (open_clip ``TimmModel`` over timm ``Eva``): values from ``v_proj`` (or the fused ``qkv``
  with ``v_bias``); the gates act per head *before* ``attn.norm``, which mixes heads; RoPE on q and k
  of the patch tokens; ``gamma_1``/``gamma_2`` LayerScale when present; ``trunk.norm`` and ``trunk.head``.
- SigLIP / SigLIP2 and other timm ViTs (``TimmModel`` over timm ``VisionTransformer``): values from
  rows [2D:3D] of ``attn.qkv``, ``attn.norm``, ``proj``, ``ls1``; ``trunk.norm``, then the pooling head
  applied to each token on its own. For the attention-pool ("map") head of SigLIP that is what the head
  computes when all attention falls on that one token: its value and output projections, then its
  norm + MLP residual (docs/models.md).
"""
from __future__ import annotations

import abc
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from timm.layers import Attention, AttentionPoolLatent, apply_rot_embed_cat, resample_abs_pos_embed
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn


SUPPORTED_FAMILIES = (
    "open_clip ViTs (open_clip VisionTransformer with token pooling: ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336, "
    "the -quickgelu variants and custom configs of that form); EVA-02-CLIP (EVA02-B-16, EVA02-L-14, "
    "EVA02-L-14-336: open_clip TimmModel over timm Eva); SigLIP/SigLIP2 and other timm ViTs "
    "(ViT-B-16-SigLIP, ViT-B-16-SigLIP2, ViT-L-16-SigLIP-256, ...: open_clip TimmModel over timm "
    "VisionTransformer)")


class UnsupportedModelError(ValueError):
    """The open_clip model's image tower cannot be decomposed into per-head value paths."""


def run_block(block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
    """One image block's own computation, as ``encode_dense`` runs its trunk.

    open_clip blocks run with attention through ``scaled_dot_product_attention`` because
    ``nn.MultiheadAttention``'s inference fast path materialises the (heads, N, N) attention matrix on
    the CPU (256 MiB for a 64 x 64 grid; benchmarks/RESULTS.md 4.1); ``encode_image`` keeps open_clip's
    module for bit-exact output. timm blocks already use SDPA and run as their own forward.
    """
    if isinstance(block, ResidualAttentionBlock):
        x = x + block.ls_1(block.attn.out_proj(_mha_attention(block.attn, block.ln_1(x))))
        return x + block.ls_2(block.mlp(block.ln_2(x)))
    return block(x) if rope is None else block(x, rope=rope)


def resample_pos_embed(pos_embed: torch.Tensor, grid: Sequence[int], native_grid: Sequence[int],
                       num_prefix_tokens: int) -> torch.Tensor:
    """(1, P + h*w, D) position embedding for another patch grid, as CLIPSelf and DeCLIP resample it.

    Bicubic, ``align_corners=False``, *without* antialiasing (``F.interpolate`` in CLIPSelf's
    ``VisionTransformer.rescale_positional_embedding``, src/open_clip/transformer.py, and in its EVA
    ``eva_vit_model.py``); open_clip's ``resize_pos_embed`` and timm's dynamic size antialias (a different
    cubic kernel even when upsampling). Prefix tokens (class, registers) are kept.
    """
    return resample_abs_pos_embed(pos_embed, new_size=list(grid), old_size=list(native_grid),
                                  num_prefix_tokens=num_prefix_tokens, interpolation="bicubic", antialias=False)


def tower_for(clip: nn.Module, model_name: str) -> "Tower":
    """The adapter for ``clip``'s image tower; UnsupportedModelError (naming what is supported) otherwise."""
    visual = getattr(clip, "visual", None)
    if isinstance(visual, VisionTransformer):
        adapter = OpenCLIPTower
    elif isinstance(visual, TimmModel) and isinstance(visual.trunk, Eva):
        adapter = EvaTower
    elif isinstance(visual, TimmModel) and isinstance(visual.trunk, TimmVisionTransformer):
        adapter = TimmViTTower
    else:
        kind = type(visual).__name__ if visual is not None else "no image tower"
        if isinstance(visual, TimmModel):
            kind += f" over timm {type(visual.trunk).__name__}"
        raise UnsupportedModelError(
            f"model '{model_name}' has an image tower of type {kind}; DenseRC supports {SUPPORTED_FAMILIES}. "
            "Convolutional trunks (ConvNeXt, ModifiedResNet, ...) have no per-head value paths.")
    problems = adapter.problems(visual)
    if problems:
        raise UnsupportedModelError(
            f"model '{model_name}' has an image tower DenseRC cannot decompose ({'; '.join(problems)}); "
            f"DenseRC supports {SUPPORTED_FAMILIES}.")
    return adapter(visual)


class Tower(abc.ABC):
    """What dense construction needs from one family's image tower.

    Facts (attributes or properties): ``blocks``, ``patch_size``, ``native_size`` (input size of the
    global embedding), ``native_grid``, ``width`` (D), ``heads`` (H), ``num_prefix_tokens`` (cls and
    registers, in front of the patch tokens) and ``pos_embed`` (the absolute position embedding
    parameter, or None).
    """

    family: str

    def __init__(self, visual: nn.Module):
        self.visual = visual

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks)

    def check_block_indices(self, indices: Sequence[int], what: str, model_name: str) -> None:
        """One error line when ``indices`` are not 0-based block indices of this tower."""
        bad = [i for i in indices if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"{what} must be block indices in 0..{self.depth - 1} for {model_name} "
                             f"({self.depth} blocks), got {list(indices)}")

    @abc.abstractmethod
    def query_value_weights(self) -> list[tuple[str, nn.Parameter, slice | None]]:
        """Every block's query and value projection weights, for fine-tuning them alone (CAT-Seg).

        One entry per parameter: its name under the image tower, the parameter, and the rows of it that are
        *not* query or value (the key rows of a packed q/k/v projection, whose gradient must stay zero) or
        None when the parameter holds queries or values only.
        """

    @staticmethod
    @abc.abstractmethod
    def problems(visual: nn.Module) -> list[str]:
        """Why this tower cannot be decomposed (empty when it can)."""

    @abc.abstractmethod
    def resample_pos_embed(self, pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``pos_embed`` for an h x w patch grid (unchanged at the native grid)."""

    @abc.abstractmethod
    def embed(self, images: torch.Tensor, pos_embed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, P + h*w, D) tokens entering the first block, and the RoPE table for the grid (or None)."""

    @abc.abstractmethod
    def norm1(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The block's first LayerNorm: input of its values and of the Head Selection Gate."""

    @abc.abstractmethod
    def values(self, block: nn.Module, u: torch.Tensor) -> torch.Tensor:
        """Per-head values of normed tokens, heads concatenated: (B, T, H * d)."""

    @abc.abstractmethod
    def queries_keys_values(self, block: nn.Module, u: torch.Tensor, rope: torch.Tensor | None,
                            count: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of normed tokens as the block's attention makes them (q/k norms, RoPE): (B, heads, count, d)
        queries of the first ``count`` tokens (all when None; only those are projected), (B, heads, T, d)
        keys and values. A ``count`` short of all tokens is at most the prefix tokens (they carry no RoPE)."""

    def attend(self, block: nn.Module, u: torch.Tensor, rope: torch.Tensor | None, *, self_self: bool,
               first_query: int, scale: float | None = None) -> torch.Tensor:
        """Per-head softmax(q k^T / sqrt d) v (q q^T if ``self_self``; ``scale`` instead of 1/sqrt d when given)
        for queries ``u[:, first_query:]``, before the output projection, heads concatenated."""
        q, k, v = self.queries_keys_values(block, u, rope)
        out = F.scaled_dot_product_attention(q[:, :, first_query:], q if self_self else k, v, scale=scale)
        return out.transpose(1, 2).flatten(2)

    @abc.abstractmethod
    def attention_out(self, block: nn.Module, values: torch.Tensor) -> torch.Tensor:
        """What the block's attention branch adds to the residual stream, given combined values."""

    @abc.abstractmethod
    def mlp_residual(self, block: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """y + LayerScale(mlp(norm2(y))): the block's second residual branch."""

    @abc.abstractmethod
    def to_joint(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token final norm and projection into the joint image-text space: (B, N, D) -> (B, N, E)."""

    @abc.abstractmethod
    def encode_global(self, x: torch.Tensor, rope: torch.Tensor | None, checkpointed: Callable) -> torch.Tensor:
        """The tower's own global embedding (B, E) from embedded tokens, blocks run through ``checkpointed``."""

    @abc.abstractmethod
    def pool_global(self, x: torch.Tensor) -> torch.Tensor:
        """The global embedding (B, E) from the last block's output tokens (final norm, pooling, projection)."""

    def pooled_tokens(self) -> int | None:
        """How many leading tokens of the last block's output ``pool_global`` reads; None: it reads them all."""
        return None

    def attend_leading(self, block: nn.Module, u: torch.Tensor, rope: torch.Tensor | None,
                       count: int) -> torch.Tensor:
        """The block's attention before its output projection (B, count, H * d) for the first ``count`` normed
        tokens as queries, keys and values from all tokens."""
        q, k, v = self.queries_keys_values(block, u, rope, count)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    def run_block_leading(self, block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None,
                          count: int) -> torch.Tensor:
        """The block's output (B, count, D) for its first ``count`` tokens only: ``run_block(block, x)[:, :count]``.

        Every token still enters the keys and values, but the queries, attention output, output
        projection, residuals and MLP run for ``count`` tokens: for the last block of a class-token
        tower that is about 1/6 of the block's work instead of all of it.
        """
        u = self.norm1(block, x)
        y = x[:, :count] + self.attention_out(block, self.attend_leading(block, u, rope, count))
        return self.mlp_residual(block, y)


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


def _mha_queries_keys_values(attn: nn.MultiheadAttention, u: torch.Tensor,
                             count: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, heads, count, d) queries of the first ``count`` normed tokens (all when None; only those are
    projected) and (B, heads, T, d) keys and values, from the attention's packed in-projection."""
    batch, tokens, width = u.shape
    heads = attn.num_heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    if count is None:  # one matmul for all three: the path every trunk block runs
        q, k, v = F.linear(u, weight, bias).view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        return q, k, v
    q = F.linear(u[:, :count], weight[:width], None if bias is None else bias[:width])
    kv = F.linear(u, weight[width:], None if bias is None else bias[width:])
    q = q.view(batch, count, heads, width // heads).transpose(1, 2)
    k, v = kv.view(batch, tokens, 2, heads, width // heads).permute(2, 0, 3, 1, 4)
    return q, k, v


def _mha_attention(attn: nn.MultiheadAttention, u: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt d) v per head of (B, T, D) normed tokens, before out_proj, heads concatenated."""
    q, k, v = _mha_queries_keys_values(attn, u)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
