"""Training images: where they come from (sources) and how one becomes a training sample.

A *source* knows how many images there are, how to name image ``i`` in messages and how to open
it as a PIL image. ``TrainingImages`` turns any source into samples for the trainer and deals
with unreadable files: by default such a file is logged and its sample is a blank placeholder marked
``valid=False`` and counted as skipped (the losses give it no weight, so no image is seen twice, batches
keep their size and DDP ranks stay in step; docs/training.md); with ``strict=True`` it raises
``UnreadableImageError`` naming the file.

Sources are pluggable: ``register_source("name")`` adds a ``data.type``; a builder receives the
data config (``root``, ``annotations``, ``num_images``, ``image_size``, ``seed``, ``options``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Protocol

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..images import load_image, to_rgb
from ..registry import Registry
from .transforms import SquareResize

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


class UnreadableImageError(RuntimeError):
    """An image file could not be decoded (raised only in strict mode)."""


class ImageSource(Protocol):
    def __len__(self) -> int: ...
    def describe(self, index: int) -> str: ...
    def open(self, index: int) -> Image.Image: ...


SourceBuilder = Callable[[object], ImageSource]
SOURCES: Registry[SourceBuilder] = Registry("data type")


def register_source(name: str) -> Callable[[SourceBuilder], SourceBuilder]:
    """Extension point (decorator): make ``builder(data_config) -> ImageSource`` available as ``data.type: name``."""
    return lambda builder: SOURCES.register(name, builder)


def source_types() -> tuple[str, ...]:
    return tuple(sorted(SOURCES.names()))


def build_source(data_config) -> ImageSource:
    """The image source named by ``data_config.type`` (a type no one registered is looked for in the plug-ins)."""
    try:
        builder = SOURCES.get(data_config.type)
    except ValueError as error:
        raise ValueError(f"data.type: {error}") from error
    return builder(data_config)


class TrainingImages(Dataset):
    """Samples ``{"image": uint8 (3, S, S), "size": (h, w) valid area, "index": i, "valid": bool, "skipped": 0|1}``.

    An unreadable file gives a blank placeholder with ``valid=False`` and ``skipped=1``.

    With ``crops`` (a ``data.regions.SourceCrops``: ``data.teacher_crops: source``) the samples also hold the
    image's regions and the teacher's crops cut from the source image (``boxes``, ``crops``, ``crop_boxes``);
    the regions depend on the epoch, so such a dataset is indexed by ``(epoch, index)`` pairs (the engine's
    sampler deals them when the task sets ``Task.keys_with_epoch``). A placeholder's crops are cut from a
    black image of the input size.
    """

    def __init__(self, source: ImageSource, transform: SquareResize, strict: bool = False, crops=None):
        if len(source) == 0:
            raise ValueError("the dataset has no images")
        self.source = source
        self.transform = transform
        self.strict = strict
        self.crops = crops

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key) -> dict:
        if self.crops is None:
            index, epoch = key, None
        elif isinstance(key, (tuple, list)) and len(key) == 2:
            epoch, index = key
        else:
            raise TypeError(f"training images with teacher crops from the source are indexed by (epoch, index) "
                            f"pairs (ResumableDistributedSampler(..., with_epoch=True)), got {key!r}")
        try:
            with self.source.open(index) as opened:
                image = to_rgb(opened) if self.crops is not None else opened  # a copy: usable once closed
                pixels, size = self.transform(image)
            sample = {"image": pixels, "size": torch.tensor(size), "index": index, "valid": True, "skipped": 0}
        except Exception as error:  # noqa: BLE001 - a broken file can fail in many PIL ways
            where = self.source.describe(index)
            if self.strict:
                raise UnreadableImageError(
                    f"cannot read image {where}: {type(error).__name__}: {error} "
                    "(set data.strict=false to skip unreadable images instead)") from error
            logger.warning("skipping unreadable image %s: %s: %s", where, type(error).__name__, error)
            side = self.transform.size
            image, size = Image.new("RGB", (side, side)), (side, side)
            sample = {"image": torch.zeros(3, side, side, dtype=torch.uint8), "size": torch.tensor(size),
                      "index": index, "valid": False, "skipped": 1}
        if self.crops is not None:
            sample.update(self.crops(image, index, size, epoch))
        return sample


# ------------------------------------------------------------------------------------- sources
class FileListSource:
    """Images from a list of files."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return str(self.files[index])

    def open(self, index: int) -> Image.Image:
        return load_image(self.files[index])


def list_images(root: str | os.PathLike, extensions=IMAGE_EXTENSIONS) -> list[Path]:
    """All image files under ``root`` (recursive, sorted, extension match case-insensitive)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: image folder {root} does not exist")
    files = sorted(path for path in root.rglob("*")
                   if path.suffix.lower() in extensions and path.is_file())
    if not files:
        raise FileNotFoundError(f"data.root: no images under {root} (looked recursively for {list(extensions)})")
    return files


@register_source("folder")
def build_folder_source(data_config) -> FileListSource:
    """Every image under ``data.root``, recursively (labels are never needed)."""
    _require(data_config.root, "data.root", "folder")
    return FileListSource(list_images(data_config.root))


@register_source("coco")
def build_coco_source(data_config) -> FileListSource:
    """COCO images: those listed in ``data.annotations`` (an instances_*.json) or all under ``data.root``."""
    _require(data_config.root, "data.root", "coco")
    root = Path(data_config.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: COCO image folder {root} does not exist")
    if not data_config.annotations:
        return FileListSource(list_images(root))
    annotations = Path(data_config.annotations)
    if not annotations.is_file():
        raise FileNotFoundError(f"data.annotations: {annotations} does not exist (expected a COCO "
                                "instances_*.json, or leave data.annotations empty to use every image in data.root)")
    files = [root / name for name in coco_file_names(annotations)]
    present = [path for path in files if path.is_file()]
    missing = len(files) - len(present)
    if not present:
        raise FileNotFoundError(f"none of the {len(files)} images listed in {annotations} exist under {root} "
                                "(is data.root the image folder, e.g. coco/train2017?)")
    if missing and data_config.strict:
        first = next(path for path in files if not path.is_file())
        raise FileNotFoundError(f"{missing} images listed in {annotations} are missing under {root}, "
                                f"e.g. {first} (set data.strict=false to train on the {len(present)} present)")
    if missing:
        logger.warning("%d of %d images listed in %s are missing under %s; training on the %d present",
                       missing, len(files), annotations, root, len(present))
    return FileListSource(present)


def coco_file_names(annotations: Path) -> list[str]:
    """File names of the images in a COCO annotation file, in image-id order."""
    from pycocotools.coco import COCO
    try:
        coco = COCO(str(annotations))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"data.annotations: {annotations} is not a COCO annotation file: {error}") from error
    images = coco.loadImgs(sorted(coco.getImgIds()))
    if not images:
        raise ValueError(f"data.annotations: {annotations} lists no images")
    return [image["file_name"] for image in images]


class GeneratedSource:
    """Procedural images made in-process: a colour gradient with random ellipses and rectangles.

    Image ``i`` depends only on (seed, i), so runs are reproducible without any files; the built-in
    default trains on these so that ``denserc train`` works with nothing downloaded.
    """

    def __init__(self, num_images: int, size: int, seed: int = 0, max_shapes: int = 6):
        if num_images < 1:
            raise ValueError(f"data.num_images must be at least 1 for generated images, got {num_images}")
        self.num_images = num_images
        self.size = size
        self.seed = seed
        self.max_shapes = max_shapes

    def __len__(self) -> int:
        return self.num_images

    def describe(self, index: int) -> str:
        return f"generated image {index} (seed {self.seed})"

    def open(self, index: int) -> Image.Image:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        colours = torch.randint(0, 256, (2 + self.max_shapes, 3), generator=generator)
        ramp = torch.linspace(0, 1, self.size)
        blend = (ramp[:, None] + ramp[None, :]) / 2
        background = colours[0, :, None, None] * (1 - blend) + colours[1, :, None, None] * blend
        image = Image.fromarray(background.permute(1, 2, 0).to(torch.uint8).numpy())
        draw = ImageDraw.Draw(image)
        count = int(torch.randint(1, self.max_shapes + 1, (1,), generator=generator))
        for colour in colours[2:2 + count].tolist():
            x1, y1, x2, y2 = (torch.rand(4, generator=generator) * self.size).tolist()
            box = (min(x1, x2), min(y1, y2), max(x1, x2) + 1, max(y1, y2) + 1)
            if torch.rand(1, generator=generator) < 0.5:
                draw.ellipse(box, fill=tuple(colour))
            else:
                draw.rectangle(box, fill=tuple(colour))
        return image


@register_source("generated")
def build_generated_source(data_config) -> GeneratedSource:
    return GeneratedSource(data_config.num_images, data_config.image_size, seed=data_config.seed)


def _require(value, key: str, kind: str) -> None:
    if not value:
        raise ValueError(f"{key} must be set for data.type={kind!r}")


from . import proposals  # noqa: E402,F401  (registers data.type "proposals"; it builds on the classes above)
