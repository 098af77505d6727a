"""Detection configs: dataclasses as the schema, OmegaConf for YAML (``base:`` inheritance) and overrides.

``train`` and ``optim`` are the training engine's own sections (``denserc.train.config``); the rest is
the detector (``model``), its frozen image tower (``backbone``), the class prompts (``text``) and the
data. Shipped configs live in ``denserc/detect/configs/`` and are named without ``.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..train.config import ConfigError, OptimConfig, TrainConfig
from .model import DetectorConfig

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class BackboneConfig:
    """The frozen tower: a folder written by DenseRCModel.save / ``denserc train``, or NAME[:TAG|:FILE]."""
    model: str = "ViT-B-16:openai"
    construction: Optional[str] = None  # null: the folder's own (or multi-v for an open_clip name)
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
    model: DetectorConfig = field(default_factory=DetectorConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DetectDataConfig = field(default_factory=DetectDataConfig)
    optim: OptimConfig = field(default_factory=_detect_optim)
    train: TrainConfig = field(default_factory=_detect_train)

    def to_dict(self) -> dict:
        return OmegaConf.to_container(OmegaConf.structured(self))


def available_configs() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def resolve_config(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    candidates = [Path(name_or_path)] + ([relative_to / name_or_path] if relative_to else [])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shipped = CONFIG_DIR / f"{Path(name_or_path).name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"detection config {str(name_or_path)!r} is neither a YAML file nor a shipped config; "
                      f"shipped: {available_configs()}")


def load_detect_config(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DetectConfig:
    """Schema <- ``base:`` chain <- file <- ``section.key=value`` overrides; unknown keys and bad types fail."""
    schema = OmegaConf.structured(DetectConfig)
    try:
        merged = OmegaConf.merge(schema, *_chain(resolve_config(name_or_path), ()),
                                 OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as error:
        raise ConfigError(f"detection config {name_or_path}: {error}") from error
    config: DetectConfig = OmegaConf.to_object(merged)
    if len(config.model.taps) != 4:
        raise ConfigError(f"model.taps must list 4 block indices, got {config.model.taps}")
    if config.data.image_size <= 0:
        raise ConfigError(f"data.image_size must be positive, got {config.data.image_size}")
    return config


def dump_detect_config(config: DetectConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _chain(path: Path, seen: tuple[Path, ...]) -> list:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        raw = OmegaConf.load(path)
    except Exception as error:  # yaml errors come in several types
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    base = raw.pop("base", None)
    return ([] if base is None else _chain(resolve_config(base, path.parent), seen + (path,))) + [raw]
