"""Detection configs: dataclasses as the schema, read like every config (``train.config.load_structured``).

``train`` and ``optim`` are the training engine's own sections (``denserc.train.config``); the rest is
the detector (``detector``), its frozen image tower (``backbone``: ``backbone.model`` names the CLIP, as
``clip.model`` does in CAT-Seg's configs and ``model.name`` in distillation's), the class prompts (``text``) and the
data. Shipped configs live in ``denserc/detect/configs/`` and are named without ``.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from ..engine.config import ConfigError, OptimConfig, TrainConfig, check_training, load_structured
from ..engine.shipped import available_configs as _available
from .model import DetectorConfig

CONFIG_DIR = Path(__file__).parent / "configs"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class BackboneConfig:
    """The frozen tower: a folder written by DenseRCModel.save / ``denserc train``, or NAME[:TAG|:FILE]."""
    model: str = "ViT-B-16:openai"
    construction: Optional[str] = None  # null: the folder's own; an open_clip name: CLIPSelf's x+v, gating none
    gating: Optional[str] = None
    num_layers: Optional[int] = None


@dataclass
class TextConfig:
    templates: Any = "vild"  # a bundled set (vild, openai, simple), a file, or a list of templates


@dataclass
class DetectDataConfig:
    protocol: str = "ov-coco"  # ov-coco | ov-lvis | a registered protocol (the testbed's: ov-testbed)
    train_annotations: str = "data/coco/annotations/instances_train2017.json"
    train_images: str = "data/coco/train2017"
    val_annotations: str = "data/coco/annotations/instances_val2017.json"
    val_images: str = "data/coco/val2017"
    image_size: int = 640  # square canvas
    # Pixel normalisation of 0..1 RGB: CLIPSelf's img_norm_cfg in every F-ViT config (ImageNet's
    # 123.675/116.28/103.53 and 58.395/57.12/57.375, to_rgb), not the tower's CLIP values; null: the tower's.
    mean: Optional[list] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: Optional[list] = field(default_factory=lambda: list(IMAGENET_STD))
    scale_range: list = field(default_factory=lambda: [0.1, 2.0])
    flip: float = 0.5
    num_workers: int = 8
    max_val_images: Optional[int] = None  # evaluate on the first N images only (quick checks)


def _detect_optim() -> OptimConfig:
    # CLIPSelf F-ViT: AdamW 1e-4 at batch 64, wd 0.1, clip 1.0, 250 warm-up steps, then no decay
    return OptimConfig(lr=1e-4, weight_decay=0.1, warmup_steps=250, min_lr=1e-4, clip_grad_norm=1.0)


def _detect_train() -> TrainConfig:
    return TrainConfig(epochs=3, global_batch_size=64, batch_size=8, precision="bf16")


@dataclass
class DetectConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DetectDataConfig = field(default_factory=DetectDataConfig)
    optim: OptimConfig = field(default_factory=_detect_optim)
    train: TrainConfig = field(default_factory=_detect_train)

    def to_dict(self) -> dict:
        return OmegaConf.to_container(OmegaConf.structured(self))


def available_configs() -> list[str]:
    return _available(CONFIG_DIR)


def load_detect_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> DetectConfig:
    """The training engine's ``load_structured`` on this schema (``base:`` chains, typed overrides), then
    the ranges the types do not express."""
    config = load_structured(DetectConfig, name_or_path, overrides, config_dir=CONFIG_DIR)
    check_training(config)
    if len(config.detector.taps) != 4:
        raise ConfigError(f"detector.taps must list 4 block indices, got {config.detector.taps}")
    if config.data.image_size <= 0:
        raise ConfigError(f"data.image_size must be positive, got {config.data.image_size}")
    data = config.data
    if (data.mean is None) != (data.std is None) or (data.mean is not None and not (
            len(data.mean) == len(data.std) == 3 and all(s > 0 for s in data.std))):
        raise ConfigError(f"data.mean and data.std must be 3 values each (std > 0), or both null for the tower's "
                          f"own; got {data.mean} and {data.std}")
    return config
