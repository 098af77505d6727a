"""DenseRC model: an open_clip CLIP whose image tower also yields dense, text-aligned patch features.

Notation follows docs/method.md (#extraction, #gating, #variants). For a pre-LN block with input
tokens x (prefix tokens + N patches):

    u   = ln_1(x)
    v_h = u @ W_v[h]^T + b_v[h]           value of head h (rows [2D:3D] of attn.in_proj_*)
    o_h = v_h @ W_o[:, h]^T               head h's share of out_proj

``construction`` chooses what is extracted from the last blocks, ``gating`` how the per-head values
are combined at each patch:

    multi-v  X[n] = proj(ln_post(sum_{last L blocks} ls_1(sum_h A[n,h] o_h[n] + b_o)))
    v        the same with L = 1 (DeCLIP-style single value path)
    x+v      CLIPSelf-style last block: x' = x + ls_1(value branch), x'' = x' + ls_2(mlp(ln_2 x'))
    cls+v    CAT-Seg's last block: x' = x_cls + ls_1(value branch) (the class token's residual at
             every patch), x'' = x' + ls_2(mlp(ln_2 x'))

    hsg   A = sigmoid(ln_1(x) @ W_H^T + b_H), one gate per token and head (no token mixing)
    none  A = 1
    qk    each head's values attended with the block's own softmax(q k^T / sqrt(d)) (vanilla CLIP)
    qq    each head's values attended with softmax(q q^T / sqrt(d)) (DeCLIP/SCLIP self-self)
    declip  DeCLIP's released content attention: softmax(q q^T) without the 1/sqrt(d) scale and without
          RoPE (xiaomoguhz/DeCLIP src/open_clip/eva_clip/eva_vit_model.py, ``Attention.ss_attn``)

``ls_1`` is the block's LayerScale (identity for CLIP models without it), kept so the value branch
is exactly the block's own attention branch with the attention weights replaced. Written once for
every family: the ``towers`` package says where ln_1, the values, out_proj (for EVA after its inner attention
LayerNorm, so the gates act before it), RoPE, ln_post and proj live in each image tower.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import roi_align

from .gating import HeadSelectionGate
from .serialization import save_model
from .towers import Tower, run_block, tower_for
from .variants import CONSTRUCTIONS, GATINGS

DEFAULT_NUM_LAYERS = 3


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
        self.tower: Tower = tower_for(clip, model_name)
        depth = self.tower.depth
        if construction == "cls+v" and self.tower.num_prefix_tokens < 1:
            raise ValueError(f"construction 'cls+v' adds the class token's residual, and {model_name} has no class "
                             "token; use 'x+v' or 'v'")
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
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def family(self) -> str:
        """The image tower's family: "open_clip ViT", "EVA (timm Eva)" or "timm ViT (SigLIP)"."""
        return self.tower.family

    @property
    def patch_size(self) -> int:
        return self.tower.patch_size

    @property
    def native_size(self) -> tuple[int, int]:
        """The input size the image tower was trained at (its global embedding's native resolution)."""
        return self.tower.native_size

    @property
    def width(self) -> int:
        return self.tower.width

    @property
    def depth(self) -> int:
        """Number of image-tower blocks (taps are 0-based indices below it)."""
        return self.tower.depth

    @property
    def heads(self) -> int:
        return self.tower.heads

    @property
    def embed_dim(self) -> int:
        return self.model_cfg["embed_dim"]

    @property
    def config(self) -> dict:
        """What ``save`` records and ``denserc.load`` rebuilds from."""
        return {"model_name": self.model_name, "construction": self.construction,
                "gating": self.gating, "num_layers": self.num_layers}

    def image_tower_parameters(self, unlocked_blocks: int | None = None, *,
                               whole_tower: bool = False) -> Iterator[nn.Parameter]:
        """The parameters DenseRC trains: the image tower's blocks and the gate (the text tower stays frozen).

        By default every block trains and the stem (patch embedding, class and position embeddings,
        ln_pre), the final norm and the projection stay as they are, as in CLIPSelf and DeCLIP
        (``VisionTransformer.lock`` with ``ln_post``/``proj`` left out of the groups,
        ``--lock-image-unlocked-groups``). ``unlocked_blocks`` = N: only the last N blocks (and the
        gate). ``whole_tower``: every image tower parameter (DenseRC's earlier recipe).
        """
        blocks = self.tower.blocks
        if whole_tower:
            if unlocked_blocks is not None:
                raise ValueError(f"whole_tower trains every block; unlocked_blocks must be None, got {unlocked_blocks}")
            yield from self.visual.parameters()
        elif unlocked_blocks is None or 1 <= unlocked_blocks <= len(blocks):
            for block in blocks[len(blocks) - (unlocked_blocks or len(blocks)):]:
                yield from block.parameters()
        else:
            raise ValueError(f"unlocked_blocks must be in 1..{len(blocks)} for {self.model_name} "
                             f"({len(blocks)} blocks) or None (all blocks), got {unlocked_blocks}")
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
        x, rope, _ = self._embed(images)
        pooled = self.tower.encode_global(x, rope, self._checkpointed)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_dense(self, images: torch.Tensor) -> torch.Tensor:
        """Dense features (B, E, H/p, W/p) in the joint image-text space, not normalised."""
        return self.encode_dense_with_taps(images, ())[0]

    def encode_dense_with_queries(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode_dense`` plus the last block's queries of the patch tokens (B, H * d, H/p, W/p), heads
        concatenated, before any RoPE: the features of DeCLIP's context stream (``ss_attn`` returns
        ``q[:, 1:]``), in the same pass."""
        dense, _, queries = self._dense_pass(images, (), queries=True)
        return dense, queries

    def encode_dense_with_taps(self, images: torch.Tensor,
                               taps: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``encode_dense`` plus the patch tokens after the image blocks ``taps`` (0-based), in one pass.

        Returns the dense features and, in the order of ``taps``, one (B, D, H/p, W/p) map per tapped
        block output (its residual stream, prefix tokens dropped, no norm): the intermediate features
        that downstream heads build on (F-ViT's pyramid taps blocks 3, 5, 7, 11 of a ViT-B; CAT-Seg's
        decoder taps earlier blocks). The constructions that replace the last block (``x+v``, ``cls+v``)
        tap that replaced block for the last index, as CLIPSelf's F-ViT backbone does
        (``F-ViT/models/evaclip_vit.py``, ``forward``: ``blocks[-1].forward_without_attn``); the others tap
        the last block's own output.
        """
        dense, tapped, _ = self._dense_pass(images, taps)
        return dense, tapped

    def _dense_pass(self, images: torch.Tensor, taps: Sequence[int], queries: bool = False
                    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """One pass of the trunk: dense features, the tapped block outputs and (optionally) the last block's
        patch queries."""
        tower = self.tower
        blocks = tower.blocks
        depth = tower.depth
        tower.check_block_indices(taps, "taps", self.model_name)
        x, rope, (h, w) = self._embed(images)
        tapped: dict[int, torch.Tensor] = {}
        prefix = tower.num_prefix_tokens

        def to_map(patches: torch.Tensor) -> torch.Tensor:
            return patches.transpose(1, 2).reshape(patches.shape[0], -1, h, w)

        def advance(index: int, tokens: torch.Tensor) -> torch.Tensor:
            tokens = self._checkpointed(self._block, blocks[index], tokens, rope)
            if index in taps:
                tapped[index] = to_map(tokens[:, prefix:])
            return tokens

        first = depth - self.num_layers
        for index in range(first):
            x = advance(index, x)
        if self.construction in ("x+v", "cls+v"):
            y = self._replaced_last_block(x, rope)
            if depth - 1 in taps:
                tapped[depth - 1] = to_map(y)
        else:
            y = self._value_branch(blocks[first], x, rope)
            for index in range(first, depth - 1):
                x = advance(index, x)
                y = y + self._value_branch(blocks[index + 1], x, rope)
            if depth - 1 in taps:  # the dense path itself never needs the last block's full output
                advance(depth - 1, x)
        last_queries = None
        if queries:  # x is the last block's input on every path above
            q = tower.queries_keys_values(blocks[-1], tower.norm1(blocks[-1], x), None)[0]
            last_queries = to_map(q[:, :, prefix:].transpose(1, 2).flatten(2))
        return to_map(tower.to_joint(y)), [tapped[t] for t in taps], last_queries

    def block_inputs(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None, tuple[int, int]]:
        """The residual stream entering every image block, for analyses (``denserc analyze``).

        Returns ``depth + 1`` tensors (B, P + h*w, D): the input of block 0, 1, ..., and the last block's
        output; then the grid's RoPE table (or None) and the patch grid (h, w).
        """
        x, rope, grid = self._embed(images)
        states = [x]
        for block in self.tower.blocks:
            x = self._block(block, x, rope)
            states.append(x)
        return states, rope, grid

    def dense_from_block_inputs(self, inputs: Sequence[torch.Tensor], grid: tuple[int, int],
                                rope: torch.Tensor | None = None) -> torch.Tensor:
        """X_dense (B, E, h, w) from the inputs of its value blocks, the trunk between them left out.

        ``inputs``: the inputs of the last ``num_layers`` blocks, oldest first (``block_inputs(images)[0]
        [depth - num_layers:depth]``); with those, the result equals ``encode_dense(images)``. A gradient
        through it reaches each input through the construction alone (the value branch, the gating or
        attention, and for x+v / cls+v the last block's residual and MLP), not through the trunk.
        """
        tower = self.tower
        if len(inputs) != self.num_layers:
            raise ValueError(f"expected the inputs of the last {self.num_layers} block(s), got {len(inputs)}")
        blocks = tower.blocks[tower.depth - self.num_layers:]
        if self.construction in ("x+v", "cls+v"):
            y = self._replaced_last_block(inputs[-1], rope)
        else:
            y = sum(self._value_branch(block, x, rope) for block, x in zip(blocks, inputs))
        return tower.to_joint(y).transpose(1, 2).reshape(y.shape[0], -1, *grid)

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
    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """Tokens entering the first block (B, P + h*w, D), the grid's RoPE table (or None) and (h, w)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        p = self.patch_size
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"image height and width must be multiples of the patch size {p}, "
                             f"got {tuple(images.shape[-2:])}")
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        x, rope = self.tower.embed(images, self._position_embedding(*grid))
        return x, rope, grid

    def _position_embedding(self, h: int, w: int) -> torch.Tensor | None:
        """Position embedding for an h x w grid, cached per grid when no gradient can flow into it."""
        pos = self.tower.pos_embed
        if pos is None:
            return None
        cacheable = not (torch.is_grad_enabled() and pos.requires_grad) and not torch.compiler.is_compiling()
        if (h, w) == self.tower.native_grid or not cacheable:
            return self.tower.resample_pos_embed(pos, (h, w))
        key = (h, w, pos.device, pos.dtype)
        version, cached = self._pos_cache.get(key, (None, None))
        if version != pos._version or cached is None:
            cached = self.tower.resample_pos_embed(pos.detach(), (h, w))
            self._pos_cache[key] = (pos._version, cached)
        return cached

    def _checkpointed(self, function, *args) -> torch.Tensor:
        """``function(*args)``, recomputed in the backward pass when gradient checkpointing is on."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)

    _block = staticmethod(run_block)  # one trunk block as encode_dense runs it (towers.run_block)

    def _replaced_last_block(self, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        """x+v / cls+v: the last block on its input ``x`` with attention replaced by the value path, plus the
        patch's own residual (x+v) or the class token's (cls+v), then the MLP residual: (B, N, D) patches."""
        block, tower = self.tower.blocks[-1], self.tower
        residual = x[:, tower.num_prefix_tokens:] if self.construction == "x+v" else x[:, :1]
        return tower.mlp_residual(block, residual + self._value_branch(block, x, rope))

    def _value_branch(self, block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """The block's attention branch for the patch tokens, with the attention replaced by gating.

        x: (B, P + N, D) block input. Returns (B, N, D) = ls_1(out_proj(combined per-head values)).
        """
        tower = self.tower
        prefix = tower.num_prefix_tokens
        u = tower.norm1(block, x)
        if self.gating in ("hsg", "none"):
            patches = u[:, prefix:]
            values = tower.values(block, patches)
            if self.gate is not None:
                batch, tokens, size = values.shape
                gates = self.gate(patches)
                values = values.view(batch, tokens, self.heads, size // self.heads) * gates.unsqueeze(-1)
                values = values.reshape(batch, tokens, size)
        elif self.gating == "declip":
            values = tower.attend(block, u, None, self_self=True, first_query=prefix, scale=1.0)
        else:
            values = tower.attend(block, u, rope, self_self=self.gating == "qq", first_query=prefix)
        return tower.attention_out(block, values)

    # ------------------------------------------------------------------------------ save/load
    def save(self, directory: str | Path) -> Path:
        """Write an open_clip ``local-dir:`` model plus the DenseRC settings and gate.

        The folder loads back with ``denserc.load(directory)``, and as a plain open_clip model with
        ``open_clip.create_model('local-dir:' + directory)``.
        """
        return save_model(self, directory)


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
