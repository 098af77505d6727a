"""Creating and loading DenseRC models on top of open_clip, and registering local pretrained weights."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
from open_clip.model import get_model_preprocess_cfg, set_model_preprocess_cfg
from open_clip.transform import merge_preprocess_dict
from torch import nn

from ..plugins import load_plugins
from . import hub, tiny_towers  # noqa: F401  (tiny_towers registers the timm trunks of the bundled configs)
from .dense import DenseRCModel
from .variants import PRECISIONS
from .serialization import GATE_WEIGHTS, SETTINGS, load_state_dict_checked, load_weights, read_model_folder

BUNDLED_CONFIGS = Path(__file__).parent / "model_configs"
open_clip.add_model_config(BUNDLED_CONFIGS)


def create_model(model_name: str, pretrained: str | os.PathLike | None = None, *,
                 construction: str = "multi-v", gating: str = "hsg", num_layers: int | None = None,
                 device: str | torch.device = "cpu", precision: str = "fp32",
                 cache_dir: str | None = None) -> DenseRCModel:
    """Build a DenseRC model from an open_clip CLIP of a supported family (docs/models.md).

    ``pretrained`` is None (random weights), an open_clip pretrained tag (e.g. "openai", or a tag added
    with ``register_pretrained``) or the path of an open_clip checkpoint file
    (.bin/.pt/.pth/.safetensors). ``num_layers`` defaults to 3 for ``multi-v`` and must be 1 for
    ``v``/``x+v``. A saved DenseRC folder loads with ``denserc.load``.
    """
    model_cfg = model_config(model_name)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model '{model_name}'; known ViTs include "
                         f"{[m for m in open_clip.list_models() if m.startswith('ViT-')][:12]} "
                         "(see open_clip.list_models()); register a custom config with "
                         "open_clip.add_model_config(path) or denserc.models.register_pretrained")
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
            _refuse_quick_gelu_release_without_quick_gelu(model_name, model_cfg, weights_file)
        else:
            tag_cfg = _pretrained_tag(model_name, pretrained)
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


def from_spec(spec: str | os.PathLike, seed: int = 0, *, plain_path: dict | None = None,
              **settings) -> DenseRCModel:
    """Build a model from a command-line spec: a saved DenseRC folder, ``NAME``, ``NAME:TAG`` or ``NAME:FILE``.

    ``settings`` (construction, gating, num_layers, device, precision) apply to both kinds; for a
    saved folder, construction settings rebuild its weights under another variant. ``plain_path`` (a
    ``PEER_PATHS`` entry) is what a plain CLIP runs when ``settings`` name no construction: a downstream
    task's own computation; a folder always runs as saved. A bare ``NAME`` has random weights, drawn after
    ``torch.manual_seed(seed)``: the same model (and text cache) in every run.
    """
    spec = str(spec)
    if Path(spec).is_dir():
        return load(spec, **{k: v for k, v in settings.items() if v is not None})
    name, _, pretrained = spec.partition(":")
    if model_config(name) is None:
        raise ValueError(f"model spec {spec!r} is neither a folder written by DenseRCModel.save() nor "
                         "NAME[:TAG|:FILE] with an open_clip model NAME (e.g. ViT-B-16:openai)")
    construction = {k: v for k, v in settings.items() if v is not None}
    if plain_path and "construction" not in construction:
        construction = {**plain_path, **construction}
    if random_weights(spec):
        torch.manual_seed(seed)
    return create_model(name, pretrained or None, **construction)


def random_weights(spec: str | os.PathLike) -> bool:
    """Whether ``from_spec(spec)`` builds a model with random weights (a bare open_clip NAME)."""
    return not Path(spec).is_dir() and ":" not in str(spec)


def get_tokenizer(spec: str | os.PathLike):
    """open_clip's tokenizer for any model spec ``from_spec`` takes: a folder written by ``DenseRCModel.save``
    (its own open_clip config), ``NAME``, ``NAME:TAG`` or ``NAME:FILE``."""
    if Path(spec).is_dir():
        return open_clip.get_tokenizer(f"local-dir:{spec}")
    model_name = str(spec).partition(":")[0]
    model_config(model_name)  # a plug-in's model: its config picks the tokenizer's context length
    return open_clip.get_tokenizer(model_name)


def model_config(model_name: str) -> dict | None:
    """open_clip's config of ``model_name`` (a copy), looking in the plug-ins if open_clip does not know it."""
    config = open_clip.get_model_config(model_name)
    if config is None:
        load_plugins()
        config = open_clip.get_model_config(model_name)
    return config


def register_pretrained(model_name: str, tag: str, weights: str | os.PathLike, *,
                        config: str | os.PathLike | None = None, **tag_settings) -> None:
    """Extension point: make ``pretrained=tag`` of ``model_name`` load a local weights file.

    ``config`` is an open_clip model config JSON (``embed_dim``, ``vision_cfg``, ``text_cfg``) to
    register under ``model_name`` (its file name without ``.json``) first, for a model open_clip does
    not ship. ``tag_settings`` go into the tag's entry as open_clip's own tags have them (e.g.
    ``quick_gelu=True``, ``mean``/``std``). Afterwards ``denserc.create_model(model_name, tag)``,
    ``model.pretrained: TAG`` in a training config, ``NAME:TAG`` on the command line and open_clip's own
    ``create_model(model_name, pretrained=tag)`` load the file; nothing is downloaded.
    """
    if config is not None:
        config = Path(config)
        if not config.is_file() or config.stem != model_name:
            raise ValueError(f"register_pretrained: config {config} must be an existing open_clip model config "
                             f"file named {model_name}.json")
        open_clip.add_model_config(config)
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"register_pretrained: unknown open_clip model '{model_name}'; pass its config file "
                         "with config=PATH")
    if open_clip.get_pretrained_cfg(model_name, tag):
        raise ValueError(f"register_pretrained: {model_name} already has a pretrained tag '{tag}'")
    # open_clip has no public call that adds a pretrained tag: this is the one place that writes its table,
    # under the key its lookups use (lower case, '-' as '_').
    table = open_clip.pretrained._PRETRAINED.setdefault(model_name, {})
    table[open_clip.pretrained._clean_tag(tag)] = {"file": str(weights), **tag_settings}


def load(directory: str | os.PathLike, *, device: str | torch.device = "cpu",
         precision: str = "fp32", **overrides) -> DenseRCModel:
    """Load a folder written by ``DenseRCModel.save``.

    ``overrides`` (construction, gating, num_layers) rebuild the saved weights under another
    construction; a gate that the new gating does not use is dropped, a missing one starts at init.
    """
    folder = read_model_folder(directory)
    unknown = set(overrides) - set(SETTINGS)
    if unknown:
        raise TypeError(f"load() got unknown overrides {sorted(unknown)}")
    settings = {k: folder.config[k] for k in SETTINGS}
    settings.update(overrides)
    if "construction" in overrides and "num_layers" not in overrides:
        settings["num_layers"] = None
    with _quiet_random_init():
        clip = open_clip.create_model(f"local-dir:{folder.directory}", load_weights=False, pretrained_text=False)
    load_weights(clip, folder.clip_weights)
    model = DenseRCModel(clip, model_name=folder.config["model_name"],
                         model_cfg=folder.open_clip_config["model_cfg"],
                         preprocess_cfg=folder.open_clip_config.get("preprocess_cfg",
                                                                    get_model_preprocess_cfg(clip)),
                         **settings)
    if model.gate is not None and folder.gate_weights is not None:
        load_weights(model.gate, folder.gate_weights)
    elif model.gate is not None and folder.config["gating"] == "hsg":
        raise FileNotFoundError(f"{folder.directory} was saved with gating='hsg' but {GATE_WEIGHTS} is missing")
    return _to(model, device, precision)


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


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision name (``PRECISIONS``); a clear error for any other name."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _to(model: DenseRCModel, device, precision: str) -> DenseRCModel:
    return model.to(device=device, dtype=precision_dtype(precision))


def _pretrained_tag(model_name: str, tag: str) -> dict:
    """open_clip's entry for the tag, looking in the plug-ins if open_clip does not know it."""
    if not open_clip.get_pretrained_cfg(model_name, tag):
        load_plugins()
    return open_clip.get_pretrained_cfg(model_name, tag)


def _load_open_clip_checkpoint(clip: nn.Module, path: str, model_name: str) -> None:
    """open_clip's loader (format conversions, pos-embed resize) with a named-key error on mismatch."""
    try:
        open_clip.load_checkpoint(clip, path, strict=True, weights_only=True)
    except RuntimeError as error:
        from open_clip.factory import load_state_dict
        state = load_state_dict(path, weights_only=True)
        load_state_dict_checked(clip, state, f"{path} (for {model_name})")
        raise error


def _refuse_quick_gelu_release_without_quick_gelu(model_name: str, model_cfg: dict, path: str) -> None:
    """Refuse a local file of a QuickGELU release (e.g. OpenAI's) loaded under a GELU architecture name.

    open_clip's ``openai`` tag sets ``quick_gelu``; a file path does not, and ``ViT-B-16`` builds GELU,
    which loads OpenAI's weights without error into a different network. A file is recognised as the
    release of a ``quick_gelu`` tag of ``model_name`` when its SHA-256 is the one in the tag's URL (OpenAI's
    download URLs carry it) or when its path names the tag's Hugging Face repository (the hub cache's
    ``models--timm--vit_base_patch16_clip_224.openai`` folder, or a folder named after the repository).
    """
    if model_cfg.get("quick_gelu"):
        return
    releases = {}
    for tag in open_clip.list_pretrained_tags_by_model(model_name):
        tag_cfg = open_clip.get_pretrained_cfg(model_name, tag)
        if tag_cfg.get("quick_gelu"):
            releases[tag] = tag_cfg
    if not releases:
        return
    resolved = Path(path).resolve()
    folders = {part.lower() for part in resolved.parts[:-1]}
    digest = None
    for tag, tag_cfg in releases.items():
        repo = tag_cfg.get("hf_hub", "").strip("/")
        repo_names = {repo.rpartition("/")[2].lower(), "models--" + repo.replace("/", "--").lower()} if repo else set()
        url_hashes = {part for part in urlparse(tag_cfg.get("url", "")).path.split("/")
                      if len(part) == 64 and all(c in "0123456789abcdef" for c in part)}
        if url_hashes and digest is None:
            with open(resolved, "rb") as file:
                digest = hashlib.file_digest(file, "sha256").hexdigest()
        if folders & repo_names or digest in url_hashes:
            quick = f"{model_name}-quickgelu"
            remedy = (f"load it as '{quick}'" if open_clip.get_model_config(quick) is not None else
                      "register a model config with \"quick_gelu\": true for it")
            raise ValueError(f"{path} is the '{tag}' release of {model_name}, trained with QuickGELU, but "
                             f"'{model_name}' builds GELU (open_clip sets QuickGELU only for the tag); {remedy}, "
                             f"or use pretrained='{tag}'")


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



def _download_pretrained(model_name: str, tag: str, tag_cfg: dict, cache_dir: str | None) -> str:
    """Resolve a pretrained tag to a local file; offline, fail in seconds with a way out (``hub.download``)."""
    if tag_cfg.get("file"):
        return tag_cfg["file"]  # a tag registered for a local file: nothing to download
    host = hub.hub_host() if tag_cfg.get("hf_hub") else urlparse(tag_cfg.get("url", "")).hostname or ""
    quick = "-quickgelu" if tag_cfg.get("quick_gelu") and not model_name.endswith("-quickgelu") else ""
    return hub.download(
        lambda: open_clip.download_pretrained(copy.deepcopy(tag_cfg), cache_dir=cache_dir), host=host,
        what=f"'{tag}' for {model_name}",
        remedy=_local_weights_hint(f"{model_name}{quick}", tag))


def _local_weights_hint(model_name: str, tag: str) -> str:
    """How to pass a downloaded weights file instead of a tag, in the words of each command that takes a model."""
    spec, path = f"{model_name}:/path/to/open_clip_model.safetensors", "/path/to/open_clip_model.safetensors"
    return (f"Download the weights file on a machine with access (open_clip tag '{tag}') and pass its path: "
            f"`denserc train ... model.name={model_name} model.pretrained={path}`, "
            f"`denserc detect train ... backbone.model={spec}`, `denserc catseg train ... clip.model={spec}`, "
            f"`--model {spec}` for eval, segment and heatmap, or "
            f"denserc.create_model('{model_name}', pretrained='{path}') in Python")
