"""The engine's configuration: its own sections (``train``, ``optim``) and the loader every task's config uses.

A task's config is a dataclass (its schema, holding the defaults) with ``train`` (``TrainConfig``) and
``optim`` (``OptimConfig``) sections beside its own. A YAML file has one mapping per section and may start
from another config with ``base: NAME_OR_PATH``; its mappings merge into the base's (``OmegaConf.merge`` on
the structured config). Command-line overrides are dotted ``section.key=value`` pairs
(``OmegaConf.from_dotlist``: values read as YAML, ``1e-5``, ``true``, ``null``, ``[0.9, 0.98]``); an override
replaces the value, a mapping included. Any key that is not a field of the schema is an error naming the
valid keys, a value of the wrong type one naming the key and the expected type (``load_structured``).
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

from ..models.variants import PRECISIONS
from .shipped import available_configs

NONFINITE_POLICIES = ("stop", "skip")  # train.on_nonfinite


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
    max_steps: int | None = None  # stop (and export) after this many optimizer steps: quick checks, benchmarks
    on_nonfinite: str = "stop"  # a NaN/inf loss term: stop (naming the step and term) | skip the step (counted)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key or file."""


Schema = TypeVar("Schema")


def resolve_config_path(name_or_path: str | Path, config_dir: Path, relative_to: Path | None = None) -> Path:
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
                    *, config_dir: Path) -> Schema:
    """An instance of the dataclass ``schema`` from a YAML file (following ``base:``) and ``key=value`` overrides.

    ``name_or_path`` is a YAML file, or the name of one in ``config_dir``. Unknown keys and values of
    the wrong type are ``ConfigError``s naming the key (and the file it came from).
    """
    config = OmegaConf.structured(schema)
    for path, layer in _read_with_bases(resolve_config_path(name_or_path, config_dir=config_dir), config_dir, ()):
        with explained(schema, f" (in {path})"):
            config = OmegaConf.merge(config, layer)
    for override in overrides:
        key, value = _parse_override(override)
        with explained(schema, f" (override {override!r})"):
            OmegaConf.update(config, key, value, merge=False)
    with explained(schema, ""):
        return OmegaConf.to_object(config)


def dump_config(config) -> str:
    """A config dataclass as YAML, sections in schema order."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def changed_keys(old: dict, new) -> list[str]:
    """'key: old -> new' for every dotted key whose value differs between a saved config and ``new``."""
    old, new = OmegaConf.create(old), OmegaConf.structured(new)
    keys = sorted(_dotted_keys(old) | _dotted_keys(new))
    pairs = [(key, OmegaConf.select(old, key), OmegaConf.select(new, key)) for key in keys]
    return [f"{key}: {before!r} -> {after!r}" for key, before, after in pairs if before != after]

def check_training(config) -> None:
    """The ranges and choices of the engine's own sections, ``train`` and ``optim``, of any task's config."""
    train, optim = config.train, config.optim
    choices = [("train.precision", train.precision, PRECISIONS), ("train.device", train.device, ("auto", "cuda", "cpu")),
               ("train.on_nonfinite", train.on_nonfinite, NONFINITE_POLICIES)]
    for key, value, allowed in choices:
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {list(allowed)}, got {value!r}")
    positive = [("train.epochs", train.epochs), ("train.global_batch_size", train.global_batch_size),
                ("train.batch_size", train.batch_size), ("train.log_every", train.log_every),
                ("train.checkpoint_every", train.checkpoint_every), ("train.keep_last", train.keep_last)]
    for key, value in positive:
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    for key, value in (("train.cpu_threads", train.cpu_threads), ("train.max_steps", train.max_steps)):
        if value is not None and value < 1:
            raise ConfigError(f"{key}: must be at least 1 or null, got {value}")
    if optim.lr <= 0:
        raise ConfigError(f"optim.lr: must be positive, got {optim.lr}")
    for key, value in (("optim.weight_decay", optim.weight_decay), ("optim.warmup_steps", optim.warmup_steps),
                       ("optim.min_lr", optim.min_lr)):
        if value < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {value}")
    if len(optim.betas) != 2:
        raise ConfigError(f"optim.betas: expected two numbers, got {optim.betas}")


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
def explained(schema: type, where: str):
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
