"""CAT-Seg with a DenseRC (or plain) CLIP: the segmenter, its trainable parameters and its loss.

Following ``cvlab-kaist/CAT-Seg`` ``cat_seg/cat_seg_model.py`` and ``cat_seg_predictor.py``:

- the image (a crop, resized to ``clip_resolution``) goes through the CLIP image tower once;
  ``encode_dense`` gives the dense features of the cost volume and the appearance guidance, and the
  outputs of two intermediate blocks ([3, 7] for ViT-B, [7, 15] for ViT-L) are upsampled by
  transposed convolutions (x2 to 256 channels, x4 to 128) as the decoder's guidance;
- class embeddings come from the CLIP text tower, one per prompt template, recomputed with
  gradients at every training step (the text tower's attention is fine-tuned too);
- only the query and value projections of every attention block of both towers train, at the
  CLIP learning rate (``fine_tuned_clip_parameters``); the rest of the CLIP stays frozen;
- the loss is a per-class binary cross-entropy over all pixels of the crop (logits upsampled to
  the label size); pixels labelled 255 are negatives for every class, as in CAT-Seg.

A plain CLIP runs CAT-Seg's own dense path, ``construction="cls+v"`` (``PEER_PATHS["CAT-Seg"]``: the last
block's value path plus the class token's residual, then the MLP residual, ``model_vpt.py``
``forward_dense``); a DenseRC folder brings its own construction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..eval.metrics import IGNORE_INDEX
from ..eval.text import render
from ..models import DenseRCModel, text_attention_weights
from ..models.towers import EvaTower
from .aggregator import CostAggregator


@dataclass
class HeadConfig:
    """The aggregator's sizes (CAT-Seg ``configs/vitb_384.yaml`` / ``vitl_336.yaml``, ``SEM_SEG_HEAD``)."""

    hidden_dim: int = 128
    guidance_proj_dim: int = 128
    text_guidance_proj_dim: int = 128
    decoder_dims: list[int] = field(default_factory=lambda: [64, 32])
    decoder_guidance_dims: list[int] = field(default_factory=lambda: [256, 128])
    decoder_guidance_proj_dims: list[int] = field(default_factory=lambda: [32, 16])
    num_layers: int = 2
    heads: int = 4
    window: int = 12
    pad_len: int = 256
    train_class_pooling: int = 2
    test_class_pooling: int = 1
    intermediate_blocks: list[int] = field(default_factory=lambda: [3, 7])


class CATSeg(nn.Module):
    """Image batch + class embeddings -> per-class logit maps (B, T, 4h, 4w) on the CLIP's patch grid h x w."""

    def __init__(self, clip: DenseRCModel, head: HeadConfig, prompts: int, clip_resolution: int):
        super().__init__()
        if clip_resolution % clip.patch_size:
            raise ValueError(f"clip_resolution {clip_resolution} is not a multiple of the patch size {clip.patch_size}")
        if len(head.intermediate_blocks) != 2 or len(head.decoder_guidance_dims) != 2:
            raise ValueError("CAT-Seg's decoder has two stages: intermediate_blocks and decoder_guidance_dims "
                             f"need two entries each, got {head.intermediate_blocks} and {head.decoder_guidance_dims}")
        self.clip = clip
        self.head_config = head
        self.clip_resolution = clip_resolution
        width = clip.width
        self.upsample = nn.ModuleList([
            nn.ConvTranspose2d(width, head.decoder_guidance_dims[0], kernel_size=2, stride=2),
            nn.ConvTranspose2d(width, head.decoder_guidance_dims[1], kernel_size=4, stride=4)])
        self.aggregator = CostAggregator(
            embed_dim=clip.embed_dim, prompts=prompts, hidden_dim=head.hidden_dim,
            guidance_proj_dim=head.guidance_proj_dim, text_guidance_proj_dim=head.text_guidance_proj_dim,
            decoder_dims=head.decoder_dims, decoder_guidance_dims=head.decoder_guidance_dims,
            decoder_guidance_proj_dims=head.decoder_guidance_proj_dims, num_layers=head.num_layers,
            heads=head.heads, window=head.window, pad_len=head.pad_len)
        self.train(True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.aggregator.set_class_pooling(self.head_config.train_class_pooling if mode
                                          else self.head_config.test_class_pooling)
        return self

    def encode_classes(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T, P, L) prompt tokens -> (T, P, E) L2-normalised text embeddings."""
        classes, prompts, length = tokens.shape
        return self.clip.encode_text(tokens.reshape(-1, length), normalize=True).view(classes, prompts, -1)

    def forward(self, images: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) normalised with CLIP's mean/std; class_embeddings (T, P, E)."""
        if images.shape[-2:] != (self.clip_resolution, self.clip_resolution):
            images = F.interpolate(images, size=(self.clip_resolution,) * 2, mode="bilinear", align_corners=False)
        dense, taps = self.clip.encode_dense_with_taps(images, self.head_config.intermediate_blocks)
        guidance = [upsample(tap) for upsample, tap in zip(self.upsample, taps)]
        text = class_embeddings.unsqueeze(0).expand(images.shape[0], -1, -1, -1)
        return self.aggregator(dense, text, guidance)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CAT-Seg's loss: BCE-with-logits of every class map against one-hot labels, averaged over all pixels.

    logits (B, T, h, w) are upsampled (bilinear) to the labels' (B, H, W) size; labels 0..T-1 or 255.
    """
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    valid = labels != IGNORE_INDEX
    targets = F.one_hot(torch.where(valid, labels, 0).long(), logits.shape[1]).permute(0, 3, 1, 2)
    targets = targets * valid[:, None]
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def fine_tuned_clip_parameters(clip: DenseRCModel) -> list[tuple[str, nn.Parameter]]:
    """The CLIP weights CAT-Seg fine-tunes (``CLIP_FINETUNE: attention``), found through the tower adapters.

    - Image tower: every block's query and value projection weights (``Tower.query_value_weights``). CAT-Seg
      (``cat_seg/third_party/model_vpt.py``) splits open_clip's ``in_proj_weight`` into q/k/v and trains q
      and v; here a packed weight trains with its key rows' gradient zeroed by a hook. EVA-CLIP has separate
      ``q_proj``/``v_proj``, trained whole, as DeCLIP's CAT-Seg branch does (``configs/eva_vitb_384.yaml``,
      ``frozen_backbone``).
    - Text tower: every block's ``in_proj_weight``, query and value rows (CAT-Seg); on EVA-CLIP the whole
      weight, keys included (DeCLIP's CAT-Seg branch).

    Biases, output projections, MLPs, norms and embeddings stay frozen. Every CLIP parameter's
    ``requires_grad`` is set accordingly; returns the trainable ones by name. A tower that yields no image
    weight is refused: nothing of it would train.
    """
    for parameter in clip.parameters():
        parameter.requires_grad_(False)
    tower = clip.tower
    image = [(f"clip.visual.{name}", weight, frozen) for name, weight, frozen in tower.query_value_weights()]
    if not image:
        raise ValueError(f"CAT-Seg fine-tunes the image tower's query and value projections, and {clip.model_name} "
                         f"({tower.family}) has none that can be found")
    whole_text = isinstance(tower, EvaTower)
    text = [(f"clip.{name}", weight, None if whole_text else frozen)
            for name, weight, frozen in text_attention_weights(clip.clip)]
    trained = []
    for name, weight, frozen in image + text:
        weight.requires_grad_(True)
        if frozen is not None:
            keep = torch.ones_like(weight[:, :1])
            keep[frozen] = 0
            weight.register_hook(lambda grad, keep=keep: grad * keep.to(grad.dtype))
        trained.append((name, weight))
    return trained


def class_tokens(tokenizer, class_names: Sequence[Sequence[str]], templates: Sequence[str]) -> torch.Tensor:
    """(T, P, L) tokens: every template filled with each class's first name (CAT-Seg's prompts)."""
    prompts = [render(template, names[0]) for names in class_names for template in templates]
    tokens = tokenizer(prompts)
    return tokens.view(len(class_names), len(templates), -1)
