"""The distillation config: dataclasses as the schema (holding the paper's defaults), read through OmegaConf
by the engine's loader (``denserc.engine.config``).

A YAML file has one mapping per section (``model``, ``vfm``, ``data``, ``loss``, ``optim``,
``train``, ``export``) and may start from another config with ``base: NAME_OR_PATH``; its mappings
merge into the base's (``OmegaConf.merge`` on the structured config). Command-line overrides are
dotted ``section.key=value`` pairs (``OmegaConf.from_dotlist``: values read as YAML, ``1e-5``,
``true``, ``null``, ``[0.9, 0.98]``); an override replaces the value, a mapping included. Any key
that is not a field of the schema is an error naming the valid keys, a value of the wrong type one
naming the key and the expected type. ``load_structured`` does all this for any dataclass schema
(another task's config reuses ``TrainConfig`` and ``OptimConfig`` as its ``train`` and ``optim``
sections); ``load_config`` reads the distillation ``Config`` and checks its ranges and choices.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path


from ..data import ASPECT_MODES, GRID_RULES, TEACHER_CROPS
from ..engine.config import ConfigError, OptimConfig, TrainConfig, check_training, load_structured
from ..losses import COHERENCE_FEATURES, COHERENCE_FORMS
from ..models import CONSTRUCTIONS, GATINGS
from .shipped import CONFIG_DIR
from .vfm import DEFAULT_VFM


@dataclass
class ModelConfig:
    """The student (and, frozen, the teacher): an open_clip CLIP of a supported family, DenseRC settings."""
    name: str = "ViT-B-16"
    pretrained: str | None = "openai"  # open_clip tag or local weights file; null = random init
    construction: str = "multi-v"
    gating: str = "hsg"
    num_layers: int | None = None  # null: 3 for multi-v, 1 for v / x+v
    unlocked_blocks: int | None = None  # null: every image block trains; N: only the last N blocks (+ gate)
    train_stem_and_head: bool = False  # true: the whole image tower trains (stem, ln_post, proj too)
    grad_checkpointing: bool = False
    compile: bool = False


@dataclass
class VFMConfig:
    """The frozen vision foundation model whose patch correlations L_coherence matches."""
    name: str = DEFAULT_VFM
    pretrained: bool = True  # timm pretrained weights (from the hub or its cache)
    weights: str | None = None  # local weights file instead of the hub
    model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments


@dataclass
class DataConfig:
    type: str = "coco"  # coco | folder | generated | any registered type
    root: str | None = None  # image folder (COCO: e.g. coco/train2017)
    annotations: str | None = None  # COCO instances_*.json; null: every image under root
    num_images: int = 0  # generated images only
    seed: int = 0  # content seed of generated images
    image_size: int = 1024  # square training input
    aspect: str = "pad"  # pad (keep aspect, black bottom/right padding, as CLIPSelf) | stretch
    grid_rule: str = "clipself"  # clipself (uniform over CLIPSelf's 24 pairs) | uniform (rows, cols independent)
    grid_max_cells: int = 6
    grid_max_boxes: int | None = 20  # cells kept per image, chosen at random (CLIPSelf --max-boxes); null: all
    # where the teacher's crops come from: batch (RoIAlign on the resized batch, on the device) | source (the
    # loader cuts them from the source image with PIL and letterboxes them bicubically, as the peers do)
    teacher_crops: str = "batch"
    strict: bool = False  # unreadable image: error instead of skip-and-count
    num_workers: int = 8
    options: dict = field(default_factory=dict)  # settings of a registered custom data type


@dataclass
class LossConfig:
    coherence_weight: float = 0.025  # lambda in L = L_semantics + lambda * L_coherence
    coherence_form: str = "declip"  # declip (mean row L2 norm, DeCLIP's) | mse (mean squared entry)
    # what L_coherence correlates: dense (DenseRC's single stream: the dense features themselves) | queries
    # (DeCLIP's context stream: the last block's patch queries, while L_semantics reads the dense features)
    coherence_features: str = "dense"


@dataclass
class ExportConfig:
    alpha: float = 1.0  # exported image tower = alpha * student + (1 - alpha) * teacher


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    vfm: VFMConfig = field(default_factory=VFMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def load_config(name_or_path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """The distillation config: ``load_structured(Config, ...)``, then ranges and choices checked."""
    config = load_structured(Config, name_or_path, overrides, config_dir=CONFIG_DIR)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Ranges and choices the types alone do not express: the engine's sections, then distillation's."""
    check_training(config)
    choices = [("model.construction", config.model.construction, CONSTRUCTIONS),
               ("model.gating", config.model.gating, GATINGS),
               ("data.aspect", config.data.aspect, ASPECT_MODES),
               ("data.grid_rule", config.data.grid_rule, GRID_RULES),
               ("data.teacher_crops", config.data.teacher_crops, TEACHER_CROPS),
               ("loss.coherence_form", config.loss.coherence_form, COHERENCE_FORMS),
               ("loss.coherence_features", config.loss.coherence_features, COHERENCE_FEATURES)]
    for key, value, allowed in choices:
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {list(allowed)}, got {value!r}")
    for key, value in (("data.image_size", config.data.image_size), ("data.grid_max_cells", config.data.grid_max_cells)):
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    for key, value in (("loss.coherence_weight", config.loss.coherence_weight),
                       ("data.num_workers", config.data.num_workers)):
        if value < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {value}")
    if config.model.unlocked_blocks is not None and config.model.unlocked_blocks < 1:
        raise ConfigError(f"model.unlocked_blocks: must be at least 1 or null, got {config.model.unlocked_blocks}")
    if config.model.unlocked_blocks is not None and config.model.train_stem_and_head:
        raise ConfigError("model.train_stem_and_head=true trains the whole image tower, every block included; "
                          f"model.unlocked_blocks must be null with it, got {config.model.unlocked_blocks}")
    if config.data.grid_max_boxes is not None and config.data.grid_max_boxes < 1:
        raise ConfigError(f"data.grid_max_boxes: must be at least 1 or null, got {config.data.grid_max_boxes}")
    if not 0.0 <= config.export.alpha <= 1.0:
        raise ConfigError(f"export.alpha: must be in [0, 1], got {config.export.alpha}")
