"""Creating, saving and loading DenseRC models on top of open_clip."""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import socket
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import open_clip
import torch
from open_clip.model import get_model_preprocess_cfg, set_model_preprocess_cfg
from open_clip.transform import merge_preprocess_dict
from safetensors.torch import load_file
from torch import nn

from ..io import save_json, save_tensors
from .dense import DenseRCModel

BUNDLED_CONFIGS = Path(__file__).parent / "model_configs"
open_clip.add_model_config(BUNDLED_CONFIGS)

DENSERC_CONFIG = "denserc_config.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's `local-dir:` format
CLIP_WEIGHTS = "open_clip_model.safetensors"
GATE_WEIGHTS = "denserc_gate.safetensors"
FORMAT_VERSION = 1


def create_model(model_name: str, pretrained: str | os.PathLike | None = None, *,
                 construction: str = "multi-v", gating: str = "hsg", num_layers: int | None = None,
                 device: str | torch.device = "cpu", precision: str = "fp32",
                 cache_dir: str | None = None) -> DenseRCModel:
    """Build a DenseRC model from an open_clip CLIP of a supported family (docs/models.md).

    ``pretrained`` is None (random weights), an open_clip pretrained tag (e.g. "openai") or the path
    of an open_clip checkpoint file (.bin/.pt/.pth/.safetensors). ``num_layers`` defaults to 3 for
    ``multi-v`` and must be 1 for ``v``/``x+v``. A saved DenseRC folder loads with ``denserc.load``.
    """
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model '{model_name}'; known ViTs include "
                         f"{[m for m in open_clip.list_models() if m.startswith('ViT-')][:12]} "
                         "(see open_clip.list_models()); register a custom config with "
                         "open_clip.add_model_config(path)")
    force_quick_gelu = False
    weights_file = None
    tag_cfg = None
    if pretrained is not None:
        pretrained = str(pretrained)
        if os.path.isdir(pretrained):
            raise ValueError(f"pretrained={pretrained!r} is a folder; pass a weights file, or load a "
                             "folder written by DenseRCModel.save() with denserc.load(folder)")
        if os.path.isfile(pretrained):
            weights_file = pretrained
        else:
            tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
            if not tag_cfg:
                raise ValueError(
                    f"pretrained={pretrained!r} is neither a file nor a pretrained tag of {model_name}; "
                    f"known tags: {open_clip.list_pretrained_tags_by_model(model_name)}")
            force_quick_gelu = bool(tag_cfg.get("quick_gelu", False))
            weights_file = _download_pretrained(model_name, pretrained, tag_cfg, cache_dir)
    if force_quick_gelu:
        model_cfg["quick_gelu"] = True
    with _quiet_random_init() if weights_file is not None else contextlib.nullcontext():
        clip = open_clip.create_model(model_name, force_quick_gelu=force_quick_gelu, device="cpu",
                                      precision="fp32", pretrained_text=False)
    if weights_file is not None:
        _load_open_clip_checkpoint(clip, weights_file, model_name)
        set_model_preprocess_cfg(clip, _weights_preprocess_cfg(clip, model_name, tag_cfg))
    model = DenseRCModel(clip, model_name=model_name, model_cfg=model_cfg,
                         preprocess_cfg=get_model_preprocess_cfg(clip), construction=construction,
                         gating=gating, num_layers=num_layers)
    return _to(model, device, precision)


def from_spec(spec: str | os.PathLike, **settings) -> DenseRCModel:
    """Build a model from a command-line spec: a saved DenseRC folder, ``NAME``, ``NAME:TAG`` or ``NAME:FILE``.

    ``settings`` (construction, gating, num_layers, device, precision) apply to both kinds; for a
    saved folder, construction settings rebuild its weights under another variant.
    """
    spec = str(spec)
    if Path(spec).is_dir():
        return load(spec, **{k: v for k, v in settings.items() if v is not None})
    name, _, pretrained = spec.partition(":")
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"model spec {spec!r} is neither a folder written by DenseRCModel.save() nor "
                         "NAME[:TAG|:FILE] with an open_clip model NAME (e.g. ViT-B-16:openai)")
    construction = {k: v for k, v in settings.items() if v is not None}
    return create_model(name, pretrained or None, **construction)


def get_tokenizer(model_name: str | os.PathLike):
    """open_clip's tokenizer for a model name, or for a folder written by ``DenseRCModel.save``."""
    if Path(model_name).is_dir():
        return open_clip.get_tokenizer(f"local-dir:{model_name}")
    return open_clip.get_tokenizer(str(model_name))


def save_model(model: DenseRCModel, directory: str | os.PathLike) -> Path:
    """Write ``model`` as an open_clip ``local-dir:`` folder plus DenseRC's settings and gate."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(model.clip.state_dict(), directory / CLIP_WEIGHTS)
    save_json({"model_cfg": model.model_cfg, "preprocess_cfg": model.preprocess_cfg},
              directory / OPEN_CLIP_CONFIG)
    if model.gate is not None:
        save_tensors(model.gate.state_dict(), directory / GATE_WEIGHTS)
    save_json({"format_version": FORMAT_VERSION, **model.config}, directory / DENSERC_CONFIG)
    return directory


def load(directory: str | os.PathLike, *, device: str | torch.device = "cpu",
         precision: str = "fp32", **overrides) -> DenseRCModel:
    """Load a folder written by ``DenseRCModel.save``.

    ``overrides`` (construction, gating, num_layers) rebuild the saved weights under another
    construction; a gate that the new gating does not use is dropped, a missing one starts at init.
    """
    directory = Path(directory)
    expected = f"{DENSERC_CONFIG}, {OPEN_CLIP_CONFIG} and {CLIP_WEIGHTS} written by DenseRCModel.save()"
    for name in (DENSERC_CONFIG, OPEN_CLIP_CONFIG, CLIP_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a DenseRC model folder: missing {name} "
                                    f"(expected {expected})")
    config = _read_json(directory / DENSERC_CONFIG)
    open_clip_config = _read_json(directory / OPEN_CLIP_CONFIG)
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory / DENSERC_CONFIG}: format_version {config.get('format_version')!r} "
                         f"is not supported (expected {FORMAT_VERSION})")
    unknown = set(overrides) - {"construction", "gating", "num_layers"}
    if unknown:
        raise TypeError(f"load() got unknown overrides {sorted(unknown)}")
    settings = {k: config[k] for k in ("construction", "gating", "num_layers")}
    settings.update(overrides)
    if "construction" in overrides and "num_layers" not in overrides:
        settings["num_layers"] = None
    with _quiet_random_init():
        clip = open_clip.create_model(f"local-dir:{directory}", load_weights=False, pretrained_text=False)
    load_state_dict_checked(clip, load_file(directory / CLIP_WEIGHTS), directory / CLIP_WEIGHTS)
    model = DenseRCModel(clip, model_name=config["model_name"], model_cfg=open_clip_config["model_cfg"],
                         preprocess_cfg=open_clip_config.get("preprocess_cfg", get_model_preprocess_cfg(clip)),
                         **settings)
    gate_file = directory / GATE_WEIGHTS
    if model.gate is not None and gate_file.is_file():
        load_state_dict_checked(model.gate, load_file(gate_file), gate_file)
    elif model.gate is not None and config["gating"] == "hsg":
        raise FileNotFoundError(f"{directory} was saved with gating='hsg' but {GATE_WEIGHTS} is missing")
    return _to(model, device, precision)


def load_state_dict_checked(module: nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """``load_state_dict(strict=True)`` with an error that names the first offending key."""
    expected = module.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise ValueError(f"{source}: missing key '{key}' (the model expects shape "
                             f"{tuple(tensor.shape)}); is it a checkpoint of a different model?")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(f"{source}: key '{key}' has shape {tuple(state[key].shape)} but the model "
                             f"expects {tuple(tensor.shape)}; is it a checkpoint of a different model?")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{source}: unexpected key '{unexpected[0]}' ({len(unexpected)} in all) that "
                         "the model does not have; is it a checkpoint of a different model?")
    module.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------- internals
@contextlib.contextmanager
def _quiet_random_init():
    """Drop open_clip's "initialized randomly" warning: the weights are loaded right after creation."""
    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()
    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _to(model: DenseRCModel, device, precision: str) -> DenseRCModel:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision must be one of {list(dtypes)}, got {precision!r}")
    return model.to(device=device, dtype=dtypes[precision])


def _load_open_clip_checkpoint(clip: nn.Module, path: str, model_name: str) -> None:
    """open_clip's loader (format conversions, pos-embed resize) with a named-key error on mismatch."""
    try:
        open_clip.load_checkpoint(clip, path, strict=True, weights_only=True)
    except RuntimeError as error:
        from open_clip.factory import load_state_dict
        state = load_state_dict(path, weights_only=True)
        load_state_dict_checked(clip, state, f"{path} (for {model_name})")
        raise error


def _weights_preprocess_cfg(clip: nn.Module, model_name: str, tag_cfg: dict | None) -> dict:
    """The image normalisation that goes with the loaded weights (SigLIP's differs from open_clip's default).

    A pretrained tag brings its own; a weights file gets the one that every pretrained tag of the
    architecture shares, if they agree (all SigLIP tags use mean = std = 0.5), else open_clip's default.
    """
    if tag_cfg is None:
        tags = [open_clip.get_pretrained_cfg(model_name, tag)
                for tag in open_clip.list_pretrained_tags_by_model(model_name)]
        shared = {(tuple(t.get("mean", ())), tuple(t.get("std", ()))) for t in tags}
        tag_cfg = tags[0] if len(shared) == 1 else {}
    overlay = {key: tag_cfg[key] for key in ("mean", "std") if key in tag_cfg}
    return merge_preprocess_dict(get_model_preprocess_cfg(clip), overlay)


def _hub_host(tag_cfg: dict) -> str:
    if tag_cfg.get("hf_hub"):
        return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    return urlparse(tag_cfg.get("url", "")).hostname or ""


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _download_pretrained(model_name: str, tag: str, tag_cfg: dict, cache_dir: str | None) -> str:
    """Resolve a pretrained tag to a local file, failing in seconds (not minutes) when offline.

    With no route to the weights' host the hub is put in offline mode, so already-cached weights
    still load and missing ones fail at once instead of after the hub client's retries.
    """
    if tag_cfg.get("file"):
        return tag_cfg["file"]  # a tag registered for a local file: nothing to download
    host = _hub_host(tag_cfg)
    offline = not _reachable(host)
    patch = (mock.patch("huggingface_hub.constants.HF_HUB_OFFLINE", True) if offline
             else contextlib.nullcontext())
    try:
        with patch:
            return open_clip.download_pretrained(copy.deepcopy(tag_cfg), cache_dir=cache_dir)
    except Exception as error:  # noqa: BLE001 - any download failure gets the same actionable message
        reason = f"{host} is unreachable (offline)" if offline else f"download failed: {error}"
        quick = "-quickgelu" if tag_cfg.get("quick_gelu") and not model_name.endswith("-quickgelu") else ""
        raise RuntimeError(
            f"cannot get pretrained weights '{tag}' for {model_name}: {reason}. Download the weights "
            f"file on a machine with access (open_clip tag '{tag}') and pass its path: "
            f"denserc.create_model('{model_name}{quick}', pretrained='/path/to/open_clip_model.safetensors')"
        ) from error
