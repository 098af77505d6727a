"""CAT-Seg training configs: dataclasses holding CAT-Seg's released settings, YAML files, key=value overrides.

Defaults are ``cvlab-kaist/CAT-Seg`` ``configs/vitb_384.yaml`` over ``configs/config.yaml``: COCO-Stuff-171,
384 x 384 crops, batch 4 (one image per forward, ``train.batch_size: 1``, accumulated to 4 on one device;
one per device on four), 80k iterations, AdamW lr 2e-4 (CLIP attention x 0.01), weight decay 1e-4,
cosine decay without warm-up, full-model gradient clipping at norm 0.01, the single prompt
"A photo of a {} in the scene". ``catseg_vitl14.yaml`` switches to ViT-L/14 at 336 px.

The CLIP is one key, ``clip.model``: an open_clip ``NAME:TAG`` / ``NAME:FILE`` (e.g. ``ViT-B-16:openai``,
the plain CLIP) or a DenseRC checkpoint folder. ``clip.construction: null`` means CAT-Seg's own dense
path (``cls+v``, gating ``none``: ``model_vpt.py`` ``forward_dense``) for a plain CLIP and the folder's
saved construction for a DenseRC folder.

The schedule is counted in iterations, as CAT-Seg's is: one pass over ``iterations x global batch``
draws of the training images (each image recurs with fresh augmentation), so ``train.epochs`` is 1.
Files are read by ``train.config.load_structured`` (OmegaConf); a YAML may start from another with
``base: NAME_OR_PATH``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..engine.config import ConfigError, OptimConfig, TrainConfig, check_training, load_structured
from ..engine.shipped import available_configs as _available
from .defaults import CONFIG_DIR
from .model import HeadConfig



@dataclass
class ClipConfig:
    model: str = "ViT-B-16:openai"  # open_clip NAME:TAG / NAME:FILE, or a DenseRC checkpoint folder
    construction: str | None = None  # null: cls+v / none (CAT-Seg's dense path) for open_clip, the saved one for a folder
    gating: str | None = None
    num_layers: int | None = None


@dataclass
class DataConfig:
    dataset: str = "coco-stuff"  # a segmentation dataset with a training split (denserc.eval.datasets)
    root: str | None = None  # its folder (required)
    class_names: str = "catseg_coco_stuff"  # bundled list or file, one line per dataset class
    held_out: list[int] = field(default_factory=list)  # dataset class ids never trained on (open vocabulary)
    crop_size: int = 384
    workers: int = 8


def _optim() -> OptimConfig:
    return OptimConfig(lr=2e-4, weight_decay=1e-4, warmup_steps=0, min_lr=0.0, clip_grad_norm=0.01)


def _train() -> TrainConfig:
    # batch 4 as one image per forward, accumulated: CAT-Seg trains one image per GPU on four GPUs, and one
    # image at 384 px with 171 classes already takes about 14 GB (docs/segmentation.md, "Memory")
    return TrainConfig(epochs=1, global_batch_size=4, batch_size=1, precision="fp32", checkpoint_every=5000,
                       log_every=20)


@dataclass
class CATSegConfig:
    clip: ClipConfig = field(default_factory=ClipConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    templates: list[str] = field(default_factory=lambda: ["A photo of a {} in the scene"])
    clip_resolution: int = 384  # crops are resized to this before the CLIP (ViT-B/16: 384, ViT-L/14: 336)
    clip_lr_multiplier: float = 0.01
    iterations: int = 80000
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=_optim)
    train: TrainConfig = field(default_factory=_train)


def available_configs() -> list[str]:
    return _available(CONFIG_DIR)


def load_config(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> CATSegConfig:
    """A shipped config name or a YAML file (following ``base:``), then ``key=value`` overrides, validated."""
    config = load_structured(CATSegConfig, name_or_path, overrides, config_dir=CONFIG_DIR)
    _validate(config)
    return config


def _validate(config: CATSegConfig) -> None:
    check_training(config)
    problems = []
    if config.data.root is None:
        problems.append("data.root is required (the training dataset's folder)")
    if config.train.epochs != 1:
        problems.append(f"train.epochs must be 1 (the schedule is set by iterations), got {config.train.epochs}")
    if config.iterations < 1:
        problems.append(f"iterations must be >= 1, got {config.iterations}")
    if not config.templates or any("{}" not in template for template in config.templates):
        problems.append(f"templates must be a non-empty list of strings with '{{}}', got {config.templates}")
    if config.train.precision not in ("fp32", "bf16", "fp16"):
        problems.append(f"train.precision must be fp32, bf16 or fp16, got {config.train.precision!r}")
    if problems:
        raise ConfigError("invalid CAT-Seg config: " + "; ".join(problems))
