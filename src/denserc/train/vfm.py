"""The frozen vision foundation model (VFM): any timm ViT (DINOv2 by default, DINOv3, ...) giving patch features.

Its patch-to-patch similarity is the target of L_coherence, so it must see the student's image on
the student's patch grid: the image is resized to (grid_h * p, grid_w * p) for the VFM's patch
size p (student 1024 / 16 = 64 x 64 -> DINOv2/14 at 896 px, DINOv3/16 at 1024 px) and its prefix
tokens (cls and registers, ``num_prefix_tokens``) are dropped.
"""
from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models import is_model, split_model_name_tag
from torch import nn

from ..plugins import load_plugins
from ..models import hub
from ..models import normalize_images

DEFAULT_VFM = "vit_base_patch14_reg4_dinov2"


class VFM(nn.Module):
    """Frozen timm ViT. ``weights``: a local file (timm or original DINOv2 format) instead of the hub."""

    def __init__(self, name: str = DEFAULT_VFM, *, pretrained: bool = True, weights: str | os.PathLike | None = None,
                 model_kwargs: dict | None = None):
        super().__init__()
        kwargs = {"dynamic_img_size": True, "num_classes": 0, **(model_kwargs or {})}
        if not is_vfm(name):
            raise ValueError(f"vfm.name: unknown timm model {name!r}; DINOv2 and DINOv3 models include "
                             f"{timm.list_models('*dinov2*') + timm.list_models('*dinov3*')}")
        try:
            if weights is not None:
                if not Path(weights).is_file():
                    raise FileNotFoundError(f"vfm.weights: {weights} does not exist (expected a timm or DINOv2 "
                                            f"checkpoint file for {name})")
                try:
                    self.model = timm.create_model(name, pretrained=True,
                                                   pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
                except RuntimeError as error:
                    raise ValueError(f"vfm.weights: {weights} does not fit timm model {name}: {error}") from error
            elif pretrained:
                self.model = _create_pretrained(name, kwargs)
            else:
                self.model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as error:  # e.g. a CNN: no dynamic_img_size
            raise ValueError(f"vfm.name: {name} is not a timm ViT that runs at any input size ({error}); "
                             "use one such as vit_base_patch14_reg4_dinov2 or vit_base_patch16_dinov3") from error
        if not hasattr(self.model, "patch_embed") or not hasattr(self.model, "num_prefix_tokens"):
            raise ValueError(f"vfm.name: {name} is not a timm ViT (it needs patch_embed and num_prefix_tokens)")
        self.name = name
        self.model.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "VFM":
        """The VFM stays in eval mode whatever its parent does."""
        return super().train(False)

    @property
    def patch_size(self) -> int:
        return self.model.patch_embed.patch_size[0]

    @property
    def width(self) -> int:
        return self.model.num_features

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch features (B, grid_h * grid_w, C), row-major, of images with values in [0, 1]."""
        size = (grid[0] * self.patch_size, grid[1] * self.patch_size)
        if tuple(pixels.shape[-2:]) != size:
            pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
        tokens = self.model.forward_features(normalize_images(pixels, self.model.pretrained_cfg, white=1.0))
        return tokens[:, self.model.num_prefix_tokens:]


def is_vfm(name: str) -> bool:
    """Whether timm knows the model ``name`` (tag allowed), looking in the plug-ins if it does not at first."""
    if not is_model(split_model_name_tag(name)[0]):
        load_plugins()
    return is_model(split_model_name_tag(name)[0])


def _create_pretrained(name: str, kwargs: dict) -> nn.Module:
    """timm's pretrained download, failing in seconds with a clear message when the hub is unreachable."""
    return hub.download(
        lambda: timm.create_model(name, pretrained=True, **kwargs), host=hub.hub_host(), what=f"for VFM {name}",
        remedy=f"Download them on a machine with access (timm model {name}) and pass the file with "
               "vfm.weights=/path/to/file, or train with vfm.pretrained=false (random VFM, for tests only)")
