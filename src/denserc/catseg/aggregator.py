"""CAT-Seg's cost aggregation (Cho et al., CVPR 2024), in plain PyTorch.

Settings and structure follow the released code, ``cvlab-kaist/CAT-Seg``
``cat_seg/modeling/transformer/model.py`` (class ``Aggregator`` and its layers):

    cost volume   C[b, p, t] = cos(dense image feature, text embedding of class t under prompt p)
    embedding     Conv2d(P -> hidden, 7x7) on each class's cost map
    L times:      spatial aggregation: two Swin blocks (windows, then shifted windows) per class,
                  the projected dense image features concatenated into queries and keys (guidance)
                  class aggregation: at every (pooled) position a transformer layer across the
                  classes, linear attention, no position embedding, projected text embeddings as
                  guidance; the class list is padded to ``pad_len`` with learned tokens (or, when
                  longer, cut to the ``pad_len`` classes with the highest cost, the rest scoring -100)
    decoder       two upsampling stages (x2 each), each fed with a projected intermediate CLIP feature
    head          Conv2d(32 -> 1, 3x3): one logit map per class at 4x the feature resolution

Nothing in the class aggregation depends on a class's position in the list, so permuting the
classes permutes the output.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.swin_transformer import window_partition, window_reverse
from torch import nn

PADDED_CLASS_LOGIT = -100.0  # logit of the classes cut from a vocabulary longer than pad_len (CAT-Seg's value)


def cost_volume(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """(B, E, H, W) image features and (B, T, P, E) text embeddings -> (B, P, T, H, W) cosine similarities."""
    image_features = F.normalize(image_features, dim=1)
    text_features = F.normalize(text_features, dim=-1)
    return torch.einsum("behw,btpe->bpthw", image_features, text_features)


def _shift_mask(height: int, width: int, window: int, shift: int, device) -> torch.Tensor:
    """(windows, window^2, window^2) additive mask: tokens from different regions of a rolled map do not attend."""
    regions = torch.zeros(1, height, width, 1, device=device)
    count = 0
    for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[:, rows, cols] = count
            count += 1
    ids = window_partition(regions, (window, window)).reshape(-1, window * window)
    different = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, -100.0)


class GuidedWindowAttention(nn.Module):
    """Multi-head attention inside windows; queries and keys also see the guidance, values do not."""

    def __init__(self, dim: int, guidance_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, dim: int, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (windows * N, window^2, dim + guidance_dim) -> (windows * N, window^2, dim)."""
        batch, tokens, _ = x.shape
        q, k = (layer(x).view(batch, tokens, self.heads, -1).transpose(1, 2) for layer in (self.q, self.k))
        v = self.v(x[..., :dim]).view(batch, tokens, self.heads, -1).transpose(1, 2)
        attention = (q * self.scale) @ k.transpose(-2, -1)
        if mask is not None:
            windows = mask.shape[0]
            attention = (attention.view(batch // windows, windows, self.heads, tokens, tokens) + mask[None, :, None])
            attention = attention.view(batch, self.heads, tokens, tokens)
        out = attention.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class GuidedSwinBlock(nn.Module):
    """A Swin block (pre-norm window attention + MLP) whose attention takes guidance features.

    As in CAT-Seg (and Swin), a map no larger than the window is one window and is never shifted.
    """

    def __init__(self, dim: int, guidance_dim: int, heads: int, window: int, shifted: bool):
        super().__init__()
        self.window = window
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GuidedWindowAttention(dim, guidance_dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self._masks: dict = {}

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """x: (N, H, W, dim); guidance: (N, H, W, guidance_dim) or None."""
        batch, height, width, dim = x.shape
        window, shift = self.window, (self.window // 2 if self.shifted else 0)
        if min(height, width) <= window:
            window, shift = min(height, width), 0
        if height % window or width % window:
            raise ValueError(f"the cost map ({height}x{width}) must be a multiple of the Swin window {window}")
        y = self.norm1(x)
        if guidance is not None:
            y = torch.cat([y, guidance], dim=-1)
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(y, (window, window)).reshape(-1, window * window, y.shape[-1])
        mask = self._mask(height, width, window, shift, x.device) if shift else None
        out = self.attn(windows, dim, mask).view(-1, window, window, dim)
        out = window_reverse(out, (window, window), height, width)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        x = x + out
        return x + self.mlp(self.norm2(x))

    def _mask(self, height: int, width: int, window: int, shift: int, device) -> torch.Tensor:
        key = (height, width, window, shift, device)
        if key not in self._masks:
            self._masks[key] = _shift_mask(height, width, window, shift, device)
        return self._masks[key]


class SpatialAggregation(nn.Module):
    """Two guided Swin blocks (plain, then shifted windows) applied to every class's cost map alone."""

    def __init__(self, dim: int, guidance_dim: int, heads: int, window: int):
        super().__init__()
        self.blocks = nn.ModuleList([GuidedSwinBlock(dim, guidance_dim, heads, window, shifted)
                                     for shifted in (False, True)])
        self.guidance_norm = nn.LayerNorm(guidance_dim) if guidance_dim > 0 else None

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """x: (B, C, T, H, W); guidance: (B, G, H, W) shared by all classes."""
        batch, channels, classes, height, width = x.shape
        y = x.permute(0, 2, 3, 4, 1).reshape(batch * classes, height, width, channels)
        if guidance is not None:
            guidance = self.guidance_norm(guidance.permute(0, 2, 3, 1))
            guidance = guidance.repeat_interleave(classes, dim=0)
        for block in self.blocks:
            y = block(y, guidance)
        return y.view(batch, classes, height, width, channels).permute(0, 4, 1, 2, 3)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Katharopoulos et al.'s linear attention with the elu + 1 feature map; (N, L, heads, d) each."""
    q, k = F.elu(q) + 1, F.elu(k) + 1
    length = v.shape[1]
    v = v / length  # as CAT-Seg: keeps the key-value sums in fp16 range
    kv = torch.einsum("nshd,nshv->nhdv", k, v)
    normaliser = 1 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + eps)
    return torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, normaliser) * length


class ClassAggregation(nn.Module):
    """A transformer layer across classes at every pooled position (no position embedding)."""

    def __init__(self, dim: int, guidance_dim: int, heads: int, pad_len: int):
        super().__init__()
        self.heads = heads
        self.pooling = (1, 1)
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.pad_len = pad_len
        self.padding_tokens = nn.Parameter(torch.zeros(dim)) if pad_len > 0 else None
        self.padding_guidance = nn.Parameter(torch.zeros(guidance_dim)) if pad_len > 0 and guidance_dim > 0 else None

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """x: (B, C, T, H, W); guidance: (B, T, G). Pools by ``self.pooling``, attends, upsamples, adds."""
        batch, channels, classes, height, width = x.shape
        pooled = F.avg_pool2d(x.flatten(1, 2), self.pooling) if self.pooling != (1, 1) else x.flatten(1, 2)
        pooled = pooled.view(batch, channels, classes, *pooled.shape[-2:])
        pooled_h, pooled_w = pooled.shape[-2:]
        padding = max(0, self.pad_len - classes) if self.padding_tokens is not None else 0
        if padding:
            tokens = self.padding_tokens.view(1, -1, 1, 1, 1).expand(batch, -1, padding, pooled_h, pooled_w)
            pooled = torch.cat([pooled, tokens.to(pooled.dtype)], dim=2)
            if guidance is not None and self.padding_guidance is not None:
                extra = self.padding_guidance.view(1, 1, -1).expand(batch, padding, -1)
                guidance = torch.cat([guidance, extra.to(guidance.dtype)], dim=1)
        sequence = pooled.permute(0, 3, 4, 2, 1).reshape(batch * pooled_h * pooled_w, classes + padding, channels)
        if guidance is not None:
            guidance = guidance.repeat_interleave(pooled_h * pooled_w, dim=0)
        sequence = sequence + self._attention(self.norm1(sequence), guidance)
        sequence = sequence + self.mlp(self.norm2(sequence))
        out = sequence.view(batch, pooled_h, pooled_w, classes + padding, channels)[..., :classes, :]
        out = out.permute(0, 3, 4, 1, 2).reshape(batch * classes, channels, pooled_h, pooled_w)
        if (pooled_h, pooled_w) != (height, width):
            out = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=True)
        return x + out.view(batch, classes, channels, height, width).transpose(1, 2)

    def _attention(self, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        with_guidance = torch.cat([x, guidance], dim=-1) if guidance is not None else x
        n, length, _ = x.shape
        q, k = (layer(with_guidance).view(n, length, self.heads, -1) for layer in (self.q, self.k))
        v = self.v(x).view(n, length, self.heads, -1)
        return linear_attention(q, k, v).reshape(n, length, -1)


class DoubleConv(nn.Module):
    """(3x3 conv -> GroupNorm -> ReLU) twice; GroupNorm with channels / 16 groups."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        if out_channels % 16:
            raise ValueError(f"decoder dims must be multiples of 16 (GroupNorm groups of 16), got {out_channels}")
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(out_channels // 16, out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(out_channels // 16, out_channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class UpsamplingStage(nn.Module):
    """x2 transposed convolution, concatenation with a guidance map, DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, guidance_channels: int):
        super().__init__()
        if guidance_channels >= in_channels:
            raise ValueError(f"a decoder stage with {in_channels} input channels cannot take {guidance_channels} "
                             "guidance channels (the upsampled cost keeps in - guidance channels; need guidance < in)")
        self.up = nn.ConvTranspose2d(in_channels, in_channels - guidance_channels, 2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor, classes: int) -> torch.Tensor:
        """x: (B * T, C, H, W); guidance: (B, G, 2H, 2W) shared by the T classes of each image."""
        x = self.up(x)
        return self.conv(torch.cat([x, guidance.repeat_interleave(classes, dim=0)], dim=1))


class CostAggregator(nn.Module):
    """Cost volume -> aggregated cost -> per-class logit maps at 4x the feature resolution."""

    def __init__(self, *, embed_dim: int, prompts: int, hidden_dim: int = 128, guidance_proj_dim: int = 128,
                 text_guidance_proj_dim: int = 128, decoder_dims: Sequence[int] = (64, 32),
                 decoder_guidance_dims: Sequence[int] = (256, 128),
                 decoder_guidance_proj_dims: Sequence[int] = (32, 16), num_layers: int = 2, heads: int = 4,
                 window: int = 12, pad_len: int = 256):
        super().__init__()
        self.pad_len = pad_len
        self.cost_embedding = nn.Conv2d(prompts, hidden_dim, 7, padding=3)
        self.guidance_projection = nn.Sequential(nn.Conv2d(embed_dim, guidance_proj_dim, 3, padding=1), nn.ReLU())
        self.text_guidance_projection = nn.Sequential(nn.Linear(embed_dim, text_guidance_proj_dim), nn.ReLU())
        self.decoder_guidance_projection = nn.ModuleList([
            nn.Sequential(nn.Conv2d(d, p, 3, padding=1), nn.ReLU())
            for d, p in zip(decoder_guidance_dims, decoder_guidance_proj_dims)])
        self.spatial = nn.ModuleList([SpatialAggregation(hidden_dim, guidance_proj_dim, heads, window)
                                      for _ in range(num_layers)])
        self.classes = nn.ModuleList([ClassAggregation(hidden_dim, text_guidance_proj_dim, heads, pad_len)
                                      for _ in range(num_layers)])
        self.decoder = nn.ModuleList([
            UpsamplingStage(hidden_dim, decoder_dims[0], decoder_guidance_proj_dims[0]),
            UpsamplingStage(decoder_dims[0], decoder_dims[1], decoder_guidance_proj_dims[1])])
        self.head = nn.Conv2d(decoder_dims[1], 1, 3, padding=1)

    def set_class_pooling(self, size: int) -> None:
        """Average-pool the cost maps by ``size`` inside class aggregation (CAT-Seg: 2 to train, 1 to test)."""
        for layer in self.classes:
            layer.pooling = (size, size)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                decoder_guidance: Sequence[torch.Tensor]) -> torch.Tensor:
        """image_features (B, E, H, W), text_features (B, T, P, E), decoder_guidance at 2x and 4x -> (B, T, 4H, 4W)."""
        cost = cost_volume(image_features, text_features)
        batch, prompts, classes, height, width = cost.shape
        kept = None
        if self.pad_len > 0 and classes > self.pad_len:
            best = cost.permute(0, 2, 1, 3, 4).flatten(2).max(dim=-1).values
            kept = best.topk(self.pad_len, dim=-1, sorted=False).indices  # (B, pad_len)
            text_features = torch.gather(text_features, 1, kept[..., None, None].expand(
                -1, -1, *text_features.shape[2:]))
            cost = torch.gather(cost, 2, kept[:, None, :, None, None].expand(-1, prompts, -1, height, width))
        used = cost.shape[2]
        x = self.cost_embedding(cost.transpose(1, 2).reshape(batch * used, prompts, height, width))
        x = x.view(batch, used, -1, height, width).transpose(1, 2)
        guidance = self.guidance_projection(image_features)
        text_guidance = self.text_guidance_projection(F.normalize(F.normalize(text_features, dim=-1).mean(dim=2),
                                                                  dim=-1))
        for spatial, class_layer in zip(self.spatial, self.classes):
            x = class_layer(spatial(x, guidance), text_guidance)
        x = x.transpose(1, 2).reshape(batch * used, -1, height, width)
        for stage, projection, extra in zip(self.decoder, self.decoder_guidance_projection, decoder_guidance):
            x = stage(x, projection(extra), used)
        logits = self.head(x).view(batch, used, *x.shape[-2:])
        if kept is None:
            return logits
        out = logits.new_full((batch, classes, *logits.shape[-2:]), PADDED_CLASS_LOGIT)
        return out.scatter(1, kept[..., None, None].expand(-1, -1, *logits.shape[-2:]), logits)
