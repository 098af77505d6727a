"""Training configuration: dataclasses as the schema (holding the paper's defaults), read through OmegaConf.

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

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, \
    ValidationError

from ..data import ASPECT_MODES, GRID_RULES
from ..losses import COHERENCE_FEATURES, COHERENCE_FORMS
from ..models import CONSTRUCTIONS, GATINGS, PRECISIONS
from ..models.vfm import DEFAULT_VFM
from .shipped import CONFIG_DIR, available_configs

NONFINITE_POLICIES = ("stop", "skip")  # train.on_nonfinite


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
    on_nonfinite: str = "stop"  # a NaN/inf loss term: stop (naming the step and term) | skip the step (counted)


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


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key or file."""


Schema = TypeVar("Schema")


def resolve_config_path(name_or_path: str | Path, relative_to: Path | None = None,
                        config_dir: Path = CONFIG_DIR) -> Path:
    """A YAML path as given (or relative to the including file), else a shipped config by name."""
    candidates = [Path(name_or_path)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name_or_path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    stem = Path(name_or_path).name.removesuffix(".yaml")
    shipped = config_dir / f"{stem}.yaml"
    if shipped.is_file() and not Path(name_or_path).suffix:
        return shipped
    raise ConfigError(f"config {str(name_or_path)!r} is neither a YAML file nor a shipped config; "
                      f"shipped configs: {available_configs(config_dir)}")


def load_structured(schema: type[Schema], name_or_path: str | Path, overrides: typing.Sequence[str] = (),
                    config_dir: Path = CONFIG_DIR) -> Schema:
    """An instance of the dataclass ``schema`` from a YAML file (following ``base:``) and ``key=value`` overrides.

    ``name_or_path`` is a YAML file, or the name of one in ``config_dir``. Unknown keys and values of
    the wrong type are ``ConfigError``s naming the key (and the file it came from).
    """
    config = OmegaConf.structured(schema)
    for path, layer in _read_with_bases(resolve_config_path(name_or_path, config_dir=config_dir), config_dir, ()):
        with _explained(schema, f" (in {path})"):
            config = OmegaConf.merge(config, layer)
    for override in overrides:
        key, value = _parse_override(override)
        with _explained(schema, f" (override {override!r})"):
            OmegaConf.update(config, key, value, merge=False)
    with _explained(schema, ""):
        return OmegaConf.to_object(config)


def load_config(name_or_path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """The distillation config: ``load_structured(Config, ...)``, then ranges and choices checked."""
    config = load_structured(Config, name_or_path, overrides)
    validate(config)
    return config


def from_dict(raw: dict) -> Config:
    """Validate a nested mapping against the distillation schema (unknown keys and bad values are errors)."""
    with _explained(Config, ""):
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), raw))
    validate(config)
    return config


def dump_config(config) -> str:
    """A config dataclass as YAML, sections in schema order."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def changed_keys(old: dict, new) -> list[str]:
    """'key: old -> new' for every dotted key whose value differs between a saved config and ``new``."""
    old, new = OmegaConf.create(old), OmegaConf.structured(new)
    keys = sorted(_dotted_keys(old) | _dotted_keys(new))
    pairs = [(key, OmegaConf.select(old, key), OmegaConf.select(new, key)) for key in keys]
    return [f"{key}: {before!r} -> {after!r}" for key, before, after in pairs if before != after]


def validate(config: Config) -> None:
    """Ranges and choices the types alone do not express."""
    choices = [("model.construction", config.model.construction, CONSTRUCTIONS),
               ("model.gating", config.model.gating, GATINGS),
               ("data.aspect", config.data.aspect, ASPECT_MODES),
               ("data.grid_rule", config.data.grid_rule, GRID_RULES),
               ("loss.coherence_form", config.loss.coherence_form, COHERENCE_FORMS),
               ("loss.coherence_features", config.loss.coherence_features, COHERENCE_FEATURES),
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
    non_negative = [("optim.weight_decay", config.optim.weight_decay),
                    ("optim.warmup_steps", config.optim.warmup_steps), ("optim.min_lr", config.optim.min_lr),
                    ("loss.coherence_weight", config.loss.coherence_weight),
                    ("data.num_workers", config.data.num_workers)]
    for key, value in non_negative:
        if value < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {value}")
    if config.model.unlocked_blocks is not None and config.model.unlocked_blocks < 1:
        raise ConfigError(f"model.unlocked_blocks: must be at least 1 or null, got {config.model.unlocked_blocks}")
    if config.model.unlocked_blocks is not None and config.model.train_stem_and_head:
        raise ConfigError("model.train_stem_and_head=true trains the whole image tower, every block included; "
                          f"model.unlocked_blocks must be null with it, got {config.model.unlocked_blocks}")
    if config.data.grid_max_boxes is not None and config.data.grid_max_boxes < 1:
        raise ConfigError(f"data.grid_max_boxes: must be at least 1 or null, got {config.data.grid_max_boxes}")
    if config.train.cpu_threads is not None and config.train.cpu_threads < 1:
        raise ConfigError(f"train.cpu_threads: must be at least 1 or null, got {config.train.cpu_threads}")
    if not 0.0 <= config.export.alpha <= 1.0:
        raise ConfigError(f"export.alpha: must be in [0, 1], got {config.export.alpha}")
    if len(config.optim.betas) != 2:
        raise ConfigError(f"optim.betas: expected two numbers, got {config.optim.betas}")


def accumulation_steps(train: TrainConfig, world_size: int, device_type: str) -> int:
    """Micro-batches per optimizer step for this many processes on this device type (or why it cannot work)."""
    if train.precision == "fp16" and device_type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    per_step = train.batch_size * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size={train.global_batch_size} is not a multiple of "
                          f"train.batch_size={train.batch_size} x {world_size} processes = {per_step}")
    return train.global_batch_size // per_step


# ---------------------------------------------------------------------------------- internals
def _read_with_bases(path: Path, config_dir: Path, seen: tuple[Path, ...]) -> list[tuple[Path, DictConfig]]:
    """(path, contents) of the file and its ``base:`` chain, the farthest base first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself ({' -> '.join(map(str, seen))})")
    try:
        layer = OmegaConf.load(path)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of sections, got a list")
    base = layer.pop("base", None)
    if base is None:
        return [(path, layer)]
    base_path = resolve_config_path(base, relative_to=path.parent, config_dir=config_dir)
    return _read_with_bases(base_path, config_dir, seen + (path,)) + [(path, layer)]


def _parse_override(override: str) -> tuple[str, object]:
    key, sep, _ = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form section.key=value (e.g. train.epochs=1)")
    try:
        return key, OmegaConf.select(OmegaConf.from_dotlist([override]), key)
    except (yaml.YAMLError, OmegaConfBaseException) as error:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {error}") from error


@contextlib.contextmanager
def _explained(schema: type, where: str):
    """Re-raise OmegaConf's errors as ``ConfigError``s that name the key (and list the valid ones)."""
    try:
        yield
    except (ConfigKeyError, ConfigAttributeError) as error:
        section = error.full_key.rpartition(".")[0]
        valid = sorted(f.name for f in dataclasses.fields(_hint_at(schema, section)))
        raise ConfigError(f"unknown config key '{error.full_key}'; valid keys in {section or 'the config'}: "
                          f"{valid}{where}") from None
    except MissingMandatoryValue as error:
        raise ConfigError(f"{error.full_key}: has no value; set it in the config or with {error.full_key}=..."
                          f"{where}") from None
    except ValidationError as error:
        problem = ("must not be null" if error.value is None else
                   f"expected {_type_name(_hint_at(schema, error.full_key))}, got {error.value!r}")
        raise ConfigError(f"{error.full_key}: {problem}{where}") from None
    except OmegaConfBaseException as error:  # e.g. a broken ${interpolation}
        raise ConfigError(f"{error.full_key}: {str(error).splitlines()[0]}{where}") from None


def _hint_at(schema: type, dotted_key: str):
    """The type annotation of a dotted key in a dataclass schema ('' is the schema itself)."""
    hint = schema
    for name in filter(None, dotted_key.split(".")):
        hint = typing.get_type_hints(hint)[name]
    return hint


def _type_name(hint) -> str:
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return " or ".join("null" if option is type(None) else getattr(option, "__name__", str(option))
                       for option in options)


def _dotted_keys(node: DictConfig, prefix: str = "") -> set[str]:
    """Every leaf's dotted key (mappings, empty ones included, are walked into, not leaves)."""
    keys = set()
    for key, value in node.items():
        keys |= _dotted_keys(value, f"{prefix}{key}.") if isinstance(value, DictConfig) else {f"{prefix}{key}"}
    return keys
