"""The testbed's "vision foundation model": hand-crafted per-patch appearance statistics.

L_coherence needs a frozen dense feature extractor whose patch-to-patch similarities say which
patches belong together (DINOv2's role on real images). No self-supervised model exists in the
testbed's world and none can be downloaded, but in that world a segment *is* a region of uniform
colour (objects) or of one texture (stuff), so classic low-level descriptors group patches the way
DINOv2 groups real ones, without knowing any class:

    colour:  a soft histogram of the patch's pixels over a 3 x 3 x 3 grid of RGB prototypes
    texture: a histogram of gradient orientations (unsigned, ``orientations`` bins) weighted by
             gradient magnitude, scaled by ``texture_weight``

Both are per-pixel maps averaged over each patch, so the features have no learnt weights at all.
The plug-in registers ``testbed_appearance`` with timm (timm's ``register_model``, the core's way to add
a VFM), so that the trainer's unmodified VFM wrapper loads it from a config
(``vfm.name: testbed_appearance``, ``vfm.pretrained: false``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VFM_NAME = "testbed_appearance"


class PatchGrid(nn.Module):
    """What the VFM wrapper reads from a timm ViT's ``patch_embed``: the patch size."""

    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = (patch_size, patch_size)


class AppearanceFeatures(nn.Module):
    """(B, 3, H, W) images in [0, 1] -> (B, H/p * W/p, 27 + orientations) appearance statistics."""

    num_prefix_tokens = 0

    def __init__(self, patch_size: int = 8, colour_levels: int = 3, colour_sigma: float = 0.15,
                 orientations: int = 6, texture_weight: float = 4.0):
        super().__init__()
        self.patch_embed = PatchGrid(patch_size)
        levels = (torch.arange(colour_levels, dtype=torch.float32) + 0.5) / colour_levels
        prototypes = torch.cartesian_prod(levels, levels, levels)  # (levels^3, 3) RGB
        self.register_buffer("prototypes", prototypes, persistent=False)
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
        self.register_buffer("sobel", torch.stack([sobel, sobel.T])[:, None], persistent=False)
        self.colour_sigma = colour_sigma
        self.orientations = orientations
        self.texture_weight = texture_weight
        self.num_features = len(prototypes) + orientations
        # the VFM wrapper normalises with these; identity keeps the input in [0, 1]
        self.pretrained_cfg = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        patch = self.patch_embed.patch_size[0]
        if images.shape[-2] % patch or images.shape[-1] % patch:
            raise ValueError(f"{VFM_NAME}: image size {tuple(images.shape[-2:])} is not a multiple of the "
                             f"patch size {patch}")
        # squared distance to every prototype, |x|^2 - 2 x.p + |p|^2, as a 1 x 1 convolution (no (B, K, 3, H, W) tensor)
        prototypes = self.prototypes.view(-1, 3, 1, 1)
        distance = (images.square().sum(dim=1, keepdim=True) - 2 * F.conv2d(images, prototypes)
                    + prototypes.square().sum(dim=1).view(1, -1, 1, 1))  # (B, K, H, W)
        colour = torch.softmax(-distance / (2 * self.colour_sigma ** 2), dim=1)
        gray = F.pad(images.mean(dim=1, keepdim=True), (1, 1, 1, 1), mode="replicate")
        gradient = F.conv2d(gray, self.sobel)  # (B, 2, H, W): d/dx, d/dy
        magnitude = torch.hypot(gradient[:, 0], gradient[:, 1])  # as norm(dim=1), without its slow strided path
        angle = torch.atan2(gradient[:, 1], gradient[:, 0]) % math.pi
        bins = (angle / math.pi * self.orientations).long().clamp(max=self.orientations - 1)
        texture = F.one_hot(bins, self.orientations).permute(0, 3, 1, 2) * magnitude[:, None]
        features = torch.cat([colour, self.texture_weight * texture], dim=1)
        return F.avg_pool2d(features, patch).flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)


def testbed_appearance(pretrained: bool = False, num_classes: int = 0, dynamic_img_size: bool = True,
                       pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
                       **settings) -> AppearanceFeatures:
    """timm entry point; ``settings`` are AppearanceFeatures' arguments (``vfm.model_kwargs``)."""
    if pretrained or pretrained_cfg_overlay:
        raise ValueError(f"{VFM_NAME} has no weights to load: set vfm.pretrained=false and no vfm.weights")
    if num_classes:
        raise ValueError(f"{VFM_NAME} is a feature extractor without a classifier (num_classes must be 0)")
    return AppearanceFeatures(**settings)
