"""DenseRC model: an open_clip CLIP whose image tower also yields dense, text-aligned patch features.

Notation follows docs/method.md (#extraction, #gating, #variants). For a pre-LN block with input
tokens x (cls + N patches):

    u   = ln_1(x)
    v_h = u @ W_v[h]^T + b_v[h]           value of head h (rows [2D:3D] of attn.in_proj_*)
    o_h = v_h @ W_o[:, h]^T               head h's share of out_proj

``construction`` chooses what is extracted from the last blocks, ``gating`` how the per-head values
are combined at each patch:

    multi-v  X[n] = proj(ln_post(sum_{last L blocks} ls_1(sum_h A[n,h] o_h[n] + b_o)))
    v        the same with L = 1 (DeCLIP-style single value path)
    x+v      CLIPSelf-style last block: x' = x + ls_1(value branch), x'' = x' + ls_2(mlp(ln_2 x'))

    hsg   A = sigmoid(ln_1(x) @ W_H^T + b_H), one gate per token and head (no token mixing)
    none  A = 1
    qk    each head's values attended with the block's own softmax(q k^T / sqrt(d)) (vanilla CLIP)
    qq    each head's values attended with softmax(q q^T / sqrt(d)) (DeCLIP/SCLIP self-self)

``ls_1`` is the block's LayerScale (identity for CLIP models without it), kept so the value branch
is exactly the block's own attention branch with the attention weights replaced.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import resample_abs_pos_embed
from torchvision.ops import roi_align

from .gating import HeadSelectionGate
from .serialization import save_model
from .variants import CONSTRUCTIONS, GATINGS

DEFAULT_NUM_LAYERS = 3


class UnsupportedModelError(ValueError):
    """The open_clip model's image tower cannot be decomposed into per-head value paths."""


def check_decomposable(clip: nn.Module, model_name: str) -> None:
    """Raise UnsupportedModelError unless the image tower is open_clip's plain pre-LN ViT."""
    supported = ("open_clip ViTs built from open_clip's own VisionTransformer with token pooling, "
                 "e.g. ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336 and custom configs of that form")
    visual = getattr(clip, "visual", None)
    if not isinstance(visual, VisionTransformer):
        kind = type(visual).__name__ if visual is not None else "no image tower"
        raise UnsupportedModelError(
            f"model '{model_name}' has an image tower of type {kind}; DenseRC supports {supported}. "
            "timm trunks (EVA, ConvNeXt, ...) and ModifiedResNet cannot be decomposed into heads.")
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
    if problems:
        raise UnsupportedModelError(
            f"model '{model_name}' has an image tower DenseRC cannot decompose ({'; '.join(problems)}); "
            f"DenseRC supports {supported}.")


class DenseRCModel(nn.Module):
    """open_clip CLIP + dense construction. ``encode_image``/``encode_text`` behave as open_clip's."""

    def __init__(self, clip: nn.Module, *, model_name: str, model_cfg: dict, preprocess_cfg: dict,
                 construction: str = "multi-v", gating: str = "hsg", num_layers: int | None = None):
        super().__init__()
        if construction not in CONSTRUCTIONS:
            raise ValueError(f"construction must be one of {CONSTRUCTIONS}, got {construction!r}")
        if gating not in GATINGS:
            raise ValueError(f"gating must be one of {GATINGS}, got {gating!r}")
        if num_layers is None:
            num_layers = DEFAULT_NUM_LAYERS if construction == "multi-v" else 1
        if construction != "multi-v" and num_layers != 1:
            raise ValueError(f"construction {construction!r} uses the last block only: num_layers must "
                             f"be 1 (got {num_layers}); use construction='multi-v' for more layers")
        check_decomposable(clip, model_name)
        depth = len(clip.visual.transformer.resblocks)
        if not 1 <= num_layers <= depth:
            raise ValueError(f"num_layers must be in 1..{depth} for {model_name} ({depth} blocks), "
                             f"got {num_layers}")
        self.clip = clip
        self.model_name = model_name
        self.model_cfg = model_cfg
        self.preprocess_cfg = preprocess_cfg
        self.construction = construction
        self.gating = gating
        self.num_layers = num_layers
        self.gate = HeadSelectionGate(self.width, self.heads) if gating == "hsg" else None
        self.grad_checkpointing = False
        self._pos_cache: dict = {}

    # ----------------------------------------------------------------------------------- facts
    @property
    def visual(self) -> VisionTransformer:
        return self.clip.visual

    @property
    def patch_size(self) -> int:
        return self.visual.patch_size[0]

    @property
    def native_size(self) -> tuple[int, int]:
        """The input size the image tower was trained at (its cls embedding's native resolution)."""
        return tuple(self.visual.image_size)

    @property
    def width(self) -> int:
        return self.visual.transformer.width

    @property
    def heads(self) -> int:
        return self.visual.transformer.resblocks[0].attn.num_heads

    @property
    def embed_dim(self) -> int:
        return self.visual.proj.shape[1]

    @property
    def config(self) -> dict:
        """What ``save`` records and ``denserc.load`` rebuilds from."""
        return {"model_name": self.model_name, "construction": self.construction,
                "gating": self.gating, "num_layers": self.num_layers}

    def image_tower_parameters(self):
        """The parameters DenseRC trains: the image tower and the gate (the text tower stays frozen)."""
        yield from self.visual.parameters()
        if self.gate is not None:
            yield from self.gate.parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each image block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------------------- encoders
    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=normalize)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Global embedding (B, E): open_clip's computation, at any resolution divisible by the patch."""
        x, _ = self._embed(images)
        x = self.visual.patch_dropout(x)
        for block in self.visual.transformer.resblocks:
            x = self._checkpointed(block, x)
        pooled = self.visual.ln_post(x[:, 0]) @ self.visual.proj
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_dense(self, images: torch.Tensor) -> torch.Tensor:
        """Dense features (B, E, H/p, W/p) in the joint image-text space, not normalised."""
        x, (h, w) = self._embed(images)
        blocks = self.visual.transformer.resblocks
        first = len(blocks) - self.num_layers
        for block in blocks[:first]:
            x = self._checkpointed(self._block, block, x)
        if self.construction == "x+v":
            block = blocks[-1]
            y = x[:, 1:] + self._value_branch(block, x)
            y = y + block.ls_2(block.mlp(block.ln_2(y)))
        else:
            y = self._value_branch(blocks[first], x)
            for prev, block in zip(blocks[first:-1], blocks[first + 1:]):
                x = self._checkpointed(self._block, prev, x)
                y = y + self._value_branch(block, x)
        y = self.visual.ln_post(y) @ self.visual.proj
        return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], h, w)

    def encode_regions(self, images: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """L2-normalised region embeddings (K, E): RoIAlign 1x1 (aligned) on normalised dense features.

        ``boxes`` holds one (Ki, 4) tensor per image, (x1, y1, x2, y2) in input pixels; rows follow
        the images' order.
        """
        dense = F.normalize(self.encode_dense(images), dim=1)
        return pool_boxes(dense, boxes, self.patch_size)

    def encode_masks(self, images: torch.Tensor, masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """L2-normalised mask embeddings (K, E): normalised dense features averaged over each mask.

        ``masks`` holds one (Ki, H, W) boolean/float tensor per image at input resolution.
        """
        dense = F.normalize(self.encode_dense(images), dim=1)
        return pool_masks(dense, masks)

    # ------------------------------------------------------------------------------ internals
    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch embedding + cls + (interpolated) position embedding + ln_pre: (B, 1 + h*w, D)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        p = self.patch_size
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"image height and width must be multiples of the patch size {p}, "
                             f"got {tuple(images.shape[-2:])}")
        x = self.visual.conv1(images)
        h, w = x.shape[-2:]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + self._position_embedding(h, w).to(x.dtype)
        return self.visual.ln_pre(x), (h, w)

    def _position_embedding(self, h: int, w: int) -> torch.Tensor:
        """Position embedding for an h x w grid, cached per grid when no gradient can flow into it."""
        pos = self.visual.positional_embedding
        native = tuple(self.visual.grid_size)
        cacheable = not (torch.is_grad_enabled() and pos.requires_grad) and not torch.compiler.is_compiling()
        if (h, w) == native or not cacheable:
            return resample_pos_embed(pos, native, (h, w))
        key = (h, w, pos.device, pos.dtype)
        version, cached = self._pos_cache.get(key, (None, None))
        if version != pos._version or cached is None:
            cached = resample_pos_embed(pos.detach(), native, (h, w))
            self._pos_cache[key] = (pos._version, cached)
        return cached

    def _checkpointed(self, function, *args) -> torch.Tensor:
        """``function(*args)``, recomputed in the backward pass when gradient checkpointing is on."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)

    @staticmethod
    def _block(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
        """The block's own computation with attention through ``scaled_dot_product_attention``.

        ``encode_dense`` runs its trunk this way because ``nn.MultiheadAttention``'s inference fast
        path materialises the (heads, N, N) attention matrix on the CPU (256 MiB for a 64 x 64 grid;
        benchmarks/RESULTS.md 4.1); ``encode_image`` keeps open_clip's module for bit-exact output.
        """
        x = x + block.ls_1(block.attn.out_proj(_attention(block.attn, block.ln_1(x))))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def _value_branch(self, block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
        """The block's attention branch for the patch tokens, with the attention replaced by gating.

        x: (B, 1 + N, D) block input. Returns (B, N, D) = ls_1(out_proj(combined per-head values)).
        """
        attn = block.attn
        batch, tokens, width = x.shape
        heads = attn.num_heads
        head_dim = width // heads
        u = block.ln_1(x)
        if self.gating in ("hsg", "none"):
            patches = u[:, 1:]
            values = F.linear(patches, attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:])
            if self.gate is not None:
                gates = self.gate(patches)
                values = (values.view(batch, tokens - 1, heads, head_dim) * gates.unsqueeze(-1))
                values = values.reshape(batch, tokens - 1, width)
        else:
            values = _attention(attn, u, self_self=self.gating == "qq", first_query=1)
        return block.ls_1(attn.out_proj(values))

    # ------------------------------------------------------------------------------ save/load
    def save(self, directory: str | Path) -> Path:
        """Write an open_clip ``local-dir:`` model plus the DenseRC settings and gate.

        The folder loads back with ``denserc.load(directory)``, and as a plain open_clip model with
        ``open_clip.create_model('local-dir:' + directory)``.
        """
        return save_model(self, directory)


def resample_pos_embed(pos_embed: torch.Tensor, native_grid: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(1 + gh*gw, D) position embedding -> (1 + h*w, D) for another patch grid, the cls entry kept.

    timm's ``resample_abs_pos_embed`` with open_clip's ``resize_pos_embed`` settings (bicubic,
    antialiased, align_corners=False), so a model run at 448 px equals open_clip created with
    ``force_image_size=448``; the native grid is returned unchanged (bit-exact open_clip).
    """
    if tuple(grid) == tuple(native_grid):
        return pos_embed
    return resample_abs_pos_embed(pos_embed[None], new_size=list(grid), old_size=list(native_grid),
                                  num_prefix_tokens=1, interpolation="bicubic", antialias=True)[0]


def _attention(attn: nn.MultiheadAttention, u: torch.Tensor, *, self_self: bool = False,
               first_query: int = 0) -> torch.Tensor:
    """Per-head softmax(q k^T / sqrt d) v (softmax(q q^T / sqrt d) v if ``self_self``), before out_proj.

    u: (B, T, D) normed tokens; queries are ``u[:, first_query:]``, keys/values all T tokens.
    Returns (B, T - first_query, D) with the heads concatenated, as ``out_proj`` expects.
    """
    batch, tokens, width = u.shape
    heads = attn.num_heads
    qkv = F.linear(u, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q[:, :, first_query:], q if self_self else k, v)
    return out.transpose(1, 2).reshape(batch, tokens - first_query, width)


def pool_boxes(dense: torch.Tensor, boxes: Sequence[torch.Tensor], patch_size: int) -> torch.Tensor:
    """RoIAlign 1x1 (aligned) of (B, E, h, w) features over per-image input-pixel boxes, normalised.

    Pooling runs in float32 (torchvision has no bfloat16 RoIAlign on the CPU); the result is cast back.
    """
    _check_per_image(dense, boxes, "box")
    features = dense.float()
    boxes = [b.to(device=dense.device, dtype=features.dtype).reshape(-1, 4) for b in boxes]
    pooled = roi_align(features, boxes, output_size=(1, 1), spatial_scale=1.0 / patch_size,
                       sampling_ratio=-1, aligned=True)
    return F.normalize(pooled.flatten(1), dim=-1).to(dense.dtype)


def pool_masks(dense: torch.Tensor, masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mask-average of (B, E, h, w) features; each mask is reduced to per-patch coverage first."""
    _check_per_image(dense, masks, "mask")
    h, w = dense.shape[-2:]
    pooled = []
    for features, image_masks in zip(dense, masks):
        if image_masks.numel() == 0:
            continue
        image_masks = image_masks.to(device=features.device, dtype=features.dtype)
        coverage = F.adaptive_avg_pool2d(image_masks[:, None], (h, w))[:, 0]
        weights = coverage.flatten(1)
        empty = weights.sum(1) == 0
        if empty.any():
            raise ValueError(f"{int(empty.sum())} mask(s) are empty: every mask needs at least one pixel")
        pooled.append(weights @ features.flatten(1).T / weights.sum(1, keepdim=True))
    if not pooled:
        return dense.new_zeros(0, dense.shape[1])
    return F.normalize(torch.cat(pooled), dim=-1)


def _check_per_image(dense: torch.Tensor, per_image: Sequence, what: str) -> None:
    if len(per_image) != dense.shape[0]:
        raise ValueError(f"expected one {what} tensor per image ({dense.shape[0]} images), got {len(per_image)}")
