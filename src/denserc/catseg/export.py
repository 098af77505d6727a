"""A trained CAT-Seg on disk: the fine-tuned CLIP as a DenseRC folder plus the head and its settings.

    FOLDER/clip/                     DenseRCModel.save() of the fine-tuned CLIP (loads with denserc.load)
    FOLDER/catseg_head.safetensors   every weight of the segmenter outside the CLIP
    FOLDER/catseg_config.json        head sizes, prompt templates, CLIP input size, training vocabulary
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file

from ..io import read_exported_folder, save_json, save_tensors
from ..models import get_tokenizer, load, load_state_dict_checked, precision_dtype
from .model import CATSeg, HeadConfig

CLIP_DIR = "clip"
HEAD_WEIGHTS = "catseg_head.safetensors"
CONFIG_FILE = "catseg_config.json"
FORMAT_VERSION = 1


def _outside_clip(name: str) -> bool:
    return not name.startswith("clip.")


def head_state(segmenter: CATSeg) -> dict:
    """The segmenter's weights outside the CLIP."""
    return StateSubset(segmenter, _outside_clip).state_dict()


def save_catseg(segmenter: CATSeg, templates: list[str], folder: str | os.PathLike, **record) -> Path:
    """Write ``segmenter`` (and ``record``: e.g. the training vocabulary and source CLIP) into ``folder``."""
    folder = Path(folder)
    segmenter.clip.save(folder / CLIP_DIR)
    save_tensors(head_state(segmenter), folder / HEAD_WEIGHTS)
    save_json({"format_version": FORMAT_VERSION, "head": asdict(segmenter.head_config), "templates": templates,
               "clip_resolution": segmenter.clip_resolution, **record}, folder / CONFIG_FILE)
    return folder


def load_catseg(folder: str | os.PathLike, device="cpu", precision: str = "fp32"):
    """(segmenter in eval mode, tokenizer, templates) from a folder written by ``save_catseg``."""
    folder = Path(folder)
    config = read_exported_folder(folder, CONFIG_FILE, (HEAD_WEIGHTS, CLIP_DIR), kind="CAT-Seg",
                                  written_by="`denserc catseg train`", format_version=FORMAT_VERSION)
    clip = load(folder / CLIP_DIR)
    segmenter = CATSeg(clip, HeadConfig(**config["head"]), prompts=len(config["templates"]),
                       clip_resolution=config["clip_resolution"])
    load_state_dict_checked(StateSubset(segmenter, _outside_clip), load_file(folder / HEAD_WEIGHTS),
                            folder / HEAD_WEIGHTS)
    segmenter = segmenter.to(device=device, dtype=precision_dtype(precision)).eval()
    return segmenter, get_tokenizer(folder / CLIP_DIR), config["templates"]


class StateSubset:
    """A module's state restricted to the names ``keep`` accepts, for ``load_state_dict_checked``."""

    def __init__(self, module, keep):
        self.module = module
        self.keep = keep

    def state_dict(self) -> dict:
        return {name: tensor for name, tensor in self.module.state_dict().items() if self.keep(name)}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        self.module.load_state_dict(state, strict=False)  # the keys were checked against state_dict()
