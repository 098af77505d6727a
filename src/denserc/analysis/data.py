"""What the analyses run on: images, and where a plug-in provides them, labelled crops, segments and an
evaluation (``register_analysis_data``); otherwise an image folder (``--data``)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..data.transforms import SquareResize
from ..images import load_image
from ..registry import Registry

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class Segment:
    mask: torch.Tensor  # (S, S) bool, at the images' resolution
    label: int  # index into AnalysisData.segment_classes
    isthing: bool


@dataclass
class AnalysisData:
    """Pixels in [0, 1]. ``crops`` are the inputs of the class-token analyses (the tower's native size) and
    ``crop_labels`` their classes among ``class_names`` (None: no labels, agreement with the intact model is
    measured instead of accuracy). ``segments`` (per image) feed the feature-consistency report;
    ``evaluate(model) -> {metric: value}`` the layer and lambda sweeps; ``training_config`` is the config the
    trained sweeps distil with."""

    description: str
    images: torch.Tensor  # (N, 3, S, S)
    crops: torch.Tensor  # (K, 3, s, s) at the native size
    class_names: list[list[str]]
    templates: list[str]
    crop_labels: torch.Tensor | None = None
    segments: list[list[Segment]] | None = None
    segment_classes: list[str] = field(default_factory=list)
    evaluate: Callable | None = None
    metrics: tuple[str, ...] = ()
    metric_labels: dict[str, str] = field(default_factory=dict)  # column titles of the sweep tables
    training_config: str | None = None


# model name -> builder(num_images, workdir, progress) -> AnalysisData
ANALYSIS_DATA: Registry[Callable] = Registry("analysis data")


def register_analysis_data(model_name: str, builder: Callable) -> None:
    """Make ``builder(num_images, workdir, progress) -> AnalysisData`` what ``denserc analyze`` runs on for
    models named ``model_name`` when no ``--data`` is given (the testbed registers its held-out scenes)."""
    ANALYSIS_DATA.register(model_name, builder)


def analysis_data(model, data: str | os.PathLike | None, num_images: int, *, image_size: int | None = None,
                  class_names: str = "coco_panoptic", templates: str = "simple", workdir: Path = Path("runs/analysis"),
                  progress: bool = True) -> AnalysisData:
    """The plug-in's data for ``model`` (no ``data``), or the first ``num_images`` images of the folder ``data``."""
    if num_images < 1:
        raise ValueError(f"--images must be at least 1, got {num_images}")
    if data is None:
        if ANALYSIS_DATA.find(model.model_name) is None:  # the plug-ins are asked first
            raise ValueError(f"no --data given and no plug-in provides analysis images for {model.model_name}; "
                             "pass --data IMAGE_FOLDER (e.g. COCO val2017)")
        return ANALYSIS_DATA.get(model.model_name)(num_images, Path(workdir), progress)
    return image_folder_data(model, Path(data), num_images, image_size or 448, class_names, templates)


def image_folder_data(model, folder: Path, num_images: int, image_size: int, class_names: str,
                      templates: str) -> AnalysisData:
    """Images resized (longer side) and padded to ``image_size``; the same at the native size as crops; no
    labels, segments or evaluation."""
    from ..eval.text import load_class_names, load_templates

    if not folder.is_dir():
        raise ValueError(f"--data {folder}: not a folder (expected an image folder such as COCO val2017)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:num_images]
    if not files:
        raise ValueError(f"--data {folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    if image_size % model.patch_size:
        raise ValueError(f"--image-size {image_size} is not a multiple of the patch size {model.patch_size}")
    resize, native = SquareResize(image_size), SquareResize(model.native_size[0])
    opened = [load_image(path) for path in files]
    images = torch.stack([resize(image)[0] for image in opened]).float() / 255
    crops = torch.stack([native(image)[0] for image in opened]).float() / 255
    return AnalysisData(f"{len(files)} images of {folder}", images, crops, load_class_names(class_names),
                        load_templates(templates))
