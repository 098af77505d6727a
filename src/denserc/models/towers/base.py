"""What dense construction needs from any family's image tower (``Tower``), and what every family shares."""
from __future__ import annotations

import abc
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from timm.layers import resample_abs_pos_embed
from torch import nn


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


class Workspace:
    """Output buffers reused by every block of one teacher call (inference only: nothing keeps a block's outputs).

    A fresh tensor wider than glibc's mmap threshold (32 MiB at most) is new pages from the kernel on
    every call, and the first write to each page faults: on this project's CPU that made a ViT-B
    linear with a fresh (6304, 3072) output 16% slower than the same GEMM into a reused one
    (benchmarks/RESULTS.md section 6). One buffer per role, sized by the first (largest) chunk.
    """

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, columns: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if (buffer is None or buffer.shape[0] < rows or buffer.shape[1] != columns or buffer.dtype != dtype
                or buffer.device != like.device):
            buffer = self.buffers[name] = torch.empty(rows, columns, dtype=dtype, device=like.device)
        return buffer[:rows]


def _linear_into(workspace: Workspace, name: str, x: torch.Tensor, linear_weight: torch.Tensor,
                 linear_bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` of 2-D ``x`` written into the workspace's ``name`` buffer.

    Under autocast the operands are cast as autocast casts ``F.linear``'s (``out=`` calls are not autocast).
    """
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    x, linear_weight = x.to(dtype), linear_weight.to(dtype)
    out = workspace.get(name, x.shape[0], linear_weight.shape[0], x, dtype)
    if linear_bias is None:
        return torch.mm(x, linear_weight.t(), out=out)
    return torch.addmm(linear_bias.to(dtype), x, linear_weight.t(), out=out)


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

    def run_block_inference(self, block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None,
                            workspace: Workspace) -> torch.Tensor:
        """``run_block(block, x, rope)`` for a frozen pass (the teacher): a family may write the block's
        outputs into ``workspace``'s reused buffers instead of fresh tensors."""
        return run_block(block, x, rope)

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
