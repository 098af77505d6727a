"""Training configuration: dataclasses holding the paper's defaults, YAML files and key=value overrides.

A YAML file has one mapping per section (``model``, ``vfm``, ``data``, ``loss``, ``optim``,
``train``, ``export``) and may start from another config with ``base: NAME_OR_PATH``. Command-line
overrides are dotted ``section.key=value`` pairs whose values are read as YAML (``1e-5``, ``true``,
``null``, ``[0.9, 0.98]``). Any key that is not a field below is an error naming the valid keys.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data import ASPECT_MODES, GRID_RULES
from ..models import CONSTRUCTIONS, GATINGS
from ..models.vfm import DEFAULT_VFM

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class ModelConfig:
    """The student (and, frozen, the teacher): an open_clip CLIP of a supported family, DenseRC settings."""
    name: str = "ViT-B-16"
    pretrained: str | None = "openai"  # open_clip tag or local weights file; null = random init
    construction: str = "multi-v"
    gating: str = "hsg"
    num_layers: int | None = None  # null: 3 for multi-v, 1 for v / x+v
    unlocked_blocks: int | None = None  # null: the whole image tower trains; N: only its last N blocks (+ gate)
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
    aspect: str = "stretch"  # stretch | pad (CLIPSelf-style: keep aspect, pad)
    grid_rule: str = "uniform"  # uniform | clipself
    grid_max_cells: int = 6
    strict: bool = False  # unreadable image: error instead of skip-and-count
    num_workers: int = 8
    options: dict = field(default_factory=dict)  # settings of a registered custom data type


@dataclass
class LossConfig:
    coherence_weight: float = 0.025  # lambda in L = L_semantics + lambda * L_coherence


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 1000  # linear warm-up, then cosine decay to min_lr
    min_lr: float = 0.0
    clip_grad_norm: float | None = None  # null: no clipping


@dataclass
class TrainConfig:
    epochs: int = 6
    global_batch_size: int = 16  # images per optimizer step over all processes
    batch_size: int = 4  # images per process per forward; accumulation makes up the rest
    precision: str = "bf16"  # fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler)
    device: str = "auto"  # auto | cuda | cpu
    cpu_threads: int | None = None  # torch intra-op threads on CPU; null: torch's default
    seed: int = 0
    output_dir: str | None = None  # null: runs/<config name>
    log_every: int = 10
    checkpoint_every: int = 1000  # optimizer steps; also at every epoch end
    keep_last: int = 3


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key or file."""


def available_configs() -> list[str]:
    """Names of the configs shipped with the package (usable as ``denserc train NAME``)."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """A YAML path as given (or relative to the including file), else a shipped config by name."""
    candidates = [Path(name_or_path)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name_or_path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    stem = Path(name_or_path).name.removesuffix(".yaml")
    shipped = CONFIG_DIR / f"{stem}.yaml"
    if shipped.is_file() and not Path(name_or_path).suffix:
        return shipped
    raise ConfigError(f"config {str(name_or_path)!r} is neither a YAML file nor a shipped config; "
                      f"shipped configs: {available_configs()}")


def load_config(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a config (following ``base:``), apply ``key=value`` overrides and validate everything."""
    raw = _read_with_bases(resolve_config_path(name_or_path), seen=())
    for override in overrides:
        _apply_override(raw, override)
    return from_dict(raw)


def from_dict(raw: dict) -> Config:
    """Validate a nested mapping against the dataclasses (unknown keys and bad values are errors)."""
    config = _build(Config, raw, prefix="")
    _check_choices(config)
    return config


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------- internals
def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself ({' -> '.join(map(str, seen))})")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    merged = _read_with_bases(resolve_config_path(base, relative_to=path.parent), seen + (path,))
    _deep_update(merged, raw)
    return merged


def _deep_update(target: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form section.key=value (e.g. train.epochs=1)")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {error}") from error
    *sections, leaf = key.split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {section!r} is not a section")
    node[leaf] = value


def _build(cls, raw: Any, prefix: str):
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; valid keys in {where}: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, prefix=f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, hint, key: str):
    """Check ``value`` against a simple type hint (str, int, float, bool, dict, list, X | None)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key}: must not be null")
    for option in options:
        option = typing.get_origin(option) or option
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-5" as a string
            except ValueError:
                pass
        if option is str and isinstance(value, str):
            return value
        if option in (dict, list) and isinstance(value, option):
            return value
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _check_choices(config: Config) -> None:
    choices = [("model.construction", config.model.construction, CONSTRUCTIONS),
               ("model.gating", config.model.gating, GATINGS),
               ("data.aspect", config.data.aspect, ASPECT_MODES),
               ("data.grid_rule", config.data.grid_rule, GRID_RULES),
               ("train.precision", config.train.precision, PRECISIONS),
               ("train.device", config.train.device, ("auto", "cuda", "cpu"))]
    for key, value, allowed in choices:
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {list(allowed)}, got {value!r}")
    positive = [("data.image_size", config.data.image_size), ("data.grid_max_cells", config.data.grid_max_cells),
                ("train.epochs", config.train.epochs), ("train.global_batch_size", config.train.global_batch_size),
                ("train.batch_size", config.train.batch_size), ("train.log_every", config.train.log_every),
                ("train.checkpoint_every", config.train.checkpoint_every), ("train.keep_last", config.train.keep_last)]
    for key, value in positive:
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    if config.optim.lr <= 0:
        raise ConfigError(f"optim.lr: must be positive, got {config.optim.lr}")
    non_negative = [("optim.weight_decay", config.optim.weight_decay), ("optim.warmup_steps", config.optim.warmup_steps),
                    ("optim.min_lr", config.optim.min_lr), ("loss.coherence_weight", config.loss.coherence_weight),
                    ("data.num_workers", config.data.num_workers)]
    for key, value in non_negative:
        if value < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {value}")
    if config.model.unlocked_blocks is not None and config.model.unlocked_blocks < 1:
        raise ConfigError(f"model.unlocked_blocks: must be at least 1 or null, got {config.model.unlocked_blocks}")
    if config.train.cpu_threads is not None and config.train.cpu_threads < 1:
        raise ConfigError(f"train.cpu_threads: must be at least 1 or null, got {config.train.cpu_threads}")
    if not 0.0 <= config.export.alpha <= 1.0:
        raise ConfigError(f"export.alpha: must be in [0, 1], got {config.export.alpha}")
    if len(config.optim.betas) != 2:
        raise ConfigError(f"optim.betas: expected two numbers, got {config.optim.betas}")
