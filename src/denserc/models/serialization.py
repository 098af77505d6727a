"""Model folders on disk: their file names, format version, and writing/reading them.

A folder written by ``save_model`` is an open_clip ``local-dir:`` model (``open_clip_config.json`` +
``open_clip_model.safetensors``) plus DenseRC's settings (``denserc_config.json``) and, for gating
``hsg``, the Head Selection Gate (``denserc_gate.safetensors``). This module imports neither the model
class nor the factory: ``DenseRCModel.save`` writes through it and ``denserc.load`` reads through it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..io import read_exported_folder, read_json, save_json, save_tensors

DENSERC_CONFIG = "denserc_config.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's `local-dir:` format
CLIP_WEIGHTS = "open_clip_model.safetensors"
GATE_WEIGHTS = "denserc_gate.safetensors"
FORMAT_VERSION = 1
SETTINGS = ("construction", "gating", "num_layers")


def save_model(model, directory: str | os.PathLike) -> Path:
    """Write a DenseRC model (its ``clip``, ``gate``, ``model_cfg``, ``preprocess_cfg`` and ``config``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(model.clip.state_dict(), directory / CLIP_WEIGHTS)
    save_json({"model_cfg": model.model_cfg, "preprocess_cfg": model.preprocess_cfg},
              directory / OPEN_CLIP_CONFIG)
    if model.gate is not None:
        save_tensors(model.gate.state_dict(), directory / GATE_WEIGHTS)
    save_json({"format_version": FORMAT_VERSION, **model.config}, directory / DENSERC_CONFIG)
    return directory


@dataclass
class ModelFolder:
    """What a checked model folder holds; the weights are read on demand."""

    directory: Path
    config: dict  # denserc_config.json: model_name, construction, gating, num_layers
    open_clip_config: dict  # open_clip_config.json: model_cfg, preprocess_cfg

    @property
    def clip_weights(self) -> Path:
        return self.directory / CLIP_WEIGHTS

    @property
    def gate_weights(self) -> Path | None:
        """The gate file, or None if the folder has none (gating other than hsg)."""
        path = self.directory / GATE_WEIGHTS
        return path if path.is_file() else None


def read_model_folder(directory: str | os.PathLike) -> ModelFolder:
    """Check that ``directory`` is a model folder of a supported format version and read its settings."""
    directory = Path(directory)
    config = read_exported_folder(directory, DENSERC_CONFIG, (OPEN_CLIP_CONFIG, CLIP_WEIGHTS), kind="DenseRC model",
                                  written_by="DenseRCModel.save()", format_version=FORMAT_VERSION)
    return ModelFolder(directory, config, read_json(directory / OPEN_CLIP_CONFIG, "open_clip config"))


def load_weights(module: nn.Module, path: str | os.PathLike) -> None:
    """Load a safetensors file into ``module`` with ``load_state_dict_checked``."""
    load_state_dict_checked(module, load_file(path), path)


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


