"""Readers for the evaluation datasets in their standard on-disk layouts.

Semantic segmentation: ADE20K-150, PASCAL VOC 20/21, PASCAL Context 59/60, COCO-Stuff-164k, Cityscapes,
ADE20K-847 and PASCAL Context-459, each yielding an image resized the mmseg way (``Resize(scale=(2048,
short_side), keep_ratio=True)``, bilinear) and its label map at full resolution with classes 0..C-1 and
255 (16-bit sets: 65535) = ignore.

A dataset can be on disk in more than one layout, each a ``SegmentationLayout`` with its own label
encoding (``convention``): the one mmseg reads (raw ADE-150 / VOC annotations, mmseg's converters for
Context and COCO-Stuff) and the one CAT-Seg's ``datasets/prepare_*.py`` scripts write for detectron2
(``annotations_detectron2``: train ids, 255 = ignore; ``cvlab-kaist/CAT-Seg``
``cat_seg/data/datasets/register_*.py``). A reader takes the first complete layout under the folder, in
the caller's order of preference (``denserc eval seg``: mmseg first, ``denserc catseg``: detectron2
first); if none is complete, one line per layout names what is missing.

Region classification: COCO panoptic (``panoptic_{split}.json`` + PNG folder, segment id =
R + 256 G + 256^2 B), yielding the image resized and padded the CLIPSelf way plus, per segment,
its box and its mask coverage of every patch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..images import ImageReadError, load_image, short_side_size
from ..plugins import load_plugins
from ..registry import Registry
from .metrics import IGNORE_INDEX

Pairs = list[tuple[Path, Path]]
LAYOUT_CONVENTIONS = ("mmseg", "detectron2")


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder does not have the expected layout; ``problem`` is what is missing, in one line."""

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = problem or message


@dataclass(frozen=True)
class SegmentationLayout:
    """Where a segmentation dataset keeps its images and labels, and how labels are encoded."""

    name: str
    title: str
    class_names: str  # bundled class-name list
    num_classes: int
    has_background: bool  # class 0 is "background" (VOC-21, Context-60)
    reduce_zero_label: bool  # stored 0 = ignore, stored k = class k - 1
    layout: str
    markers: tuple[str, ...]  # paths whose presence identifies the layout
    list_pairs: Callable[["SegmentationLayout", Path], Pairs]
    ignore_index: int = IGNORE_INDEX  # decoded label of unlabelled pixels; 65535 for 16-bit TIFF labels
    ignored_values: tuple[int, ...] = ()  # stored values that also mean "unlabelled"
    list_train_pairs: Callable[["SegmentationLayout", Path], Pairs] | None = None  # training split, if any
    stray_label_hint: str = ""  # what label values beyond the classes usually mean, and the fix
    convention: str = "mmseg"  # whose layout this is (LAYOUT_CONVENTIONS): the reader callers may prefer
    prepared_by: str = ""  # what writes this layout (named when it is incomplete)
    decode: Callable[[np.ndarray], np.ndarray] | None = None  # stored values -> class ids, beyond the above
    alternatives: tuple["SegmentationLayout", ...] = ()  # the same dataset in other layouts

    @property
    def variants(self) -> tuple["SegmentationLayout", ...]:
        """This layout and its alternatives."""
        return (self, *self.alternatives)

    def matches(self, root: Path) -> bool:
        """Whether ``root`` has the markers of any of the dataset's layouts."""
        return any(all((root / marker).exists() for marker in variant.markers) for variant in self.variants)


def _sorted_images(layout: SegmentationLayout, root: Path, image_dir: str, pattern: str,
                   label_of: Callable[[Path], Path], what: str = "images") -> Pairs:
    images = sorted(_require_dir(layout, root, image_dir).glob(pattern))
    if not images:
        raise _layout_error(layout, root, f"no {what} matching {pattern} in {root / image_dir}")
    return [(image, _require_file(layout, root, label_of(image))) for image in images]


def _sorted_labels(layout: SegmentationLayout, root: Path, label_dir: str, label_ext: str, image_dir: str) -> Pairs:
    """detectron2's ``load_sem_seg``: every label file of ``label_dir`` with the same-named JPEG of ``image_dir``."""
    pairs = _sorted_images(layout, root, label_dir, f"*.{label_ext}",
                           lambda label: root / image_dir / f"{label.stem}.jpg", what="label maps")
    return [(image, label) for label, image in pairs]


def _listed_images(layout: SegmentationLayout, root: Path, split_file: str, image_dir: str,
                   label_dir: str) -> Pairs:
    split = _require_file(layout, root, root / split_file)
    ids = [line.strip() for line in split.read_text().splitlines() if line.strip()]
    if not ids:
        raise _layout_error(layout, root, f"{split} lists no image ids")
    _require_dir(layout, root, image_dir)
    _require_dir(layout, root, label_dir)
    return [(_require_file(layout, root, root / image_dir / f"{i}.jpg"),
             _require_file(layout, root, root / label_dir / f"{i}.png")) for i in ids]


def _ade20k(layout, root):
    return _sorted_images(layout, root, "images/validation", "*.jpg",
                          lambda image: root / "annotations" / "validation" / f"{image.stem}.png")


def _ade20k_detectron2(layout, root):
    return _sorted_labels(layout, root, "annotations_detectron2/validation", "png", "images/validation")


def _voc(layout, root):
    return _listed_images(layout, root, "ImageSets/Segmentation/val.txt", "JPEGImages", "SegmentationClass")


def _voc_detectron2(layout, root):
    return _sorted_labels(layout, root, "annotations_detectron2/val", "png", "JPEGImages")


def _voc_background_detectron2(layout, root):
    return _sorted_labels(layout, root, "annotations_detectron2_bg/val", "png", "JPEGImages")


def _voc_background_last(label: np.ndarray) -> np.ndarray:
    """CAT-Seg's ``annotations_detectron2_bg`` (classes 0..19, background 20) -> VOC-21 (background 0, classes
    1..20); every other value (255, or a stray one the reader then reports) is kept."""
    decoded = label.copy()
    decoded[label < 20] += 1
    decoded[label == 20] = 0
    return decoded


def _context(layout, root):
    return _listed_images(layout, root, "ImageSets/SegmentationContext/val.txt", "JPEGImages",
                          "SegmentationClassContext")


def _context59_detectron2(layout, root):
    return _sorted_labels(layout, root, "annotations_detectron2/pc59_val", "png", "JPEGImages")


def _coco_stuff(layout, root):
    return _sorted_images(layout, root, "images/val2017", "*.jpg",
                          lambda image: root / "annotations" / "val2017" / f"{image.stem}_labelTrainIds.png")


def _coco_stuff_train(layout, root):
    return _sorted_images(layout, root, "images/train2017", "*.jpg",
                          lambda image: root / "annotations" / "train2017" / f"{image.stem}_labelTrainIds.png")


def _coco_stuff_detectron2(layout, root):
    return _sorted_labels(layout, root, "annotations_detectron2/val2017", "png", "images/val2017")


def _coco_stuff_train_detectron2(layout, root):
    return _sorted_labels(layout, root, "annotations_detectron2/train2017", "png", "images/train2017")


def _ade847(layout, root):
    return _sorted_images(layout, root, "images_detectron2/validation", "*.jpg",
                          lambda image: root / "annotations_detectron2" / "validation" / f"{image.stem}.tif")


def _context459(layout, root):
    return _sorted_labels(layout, root, "annotations_detectron2/pc459_val", "tif", "JPEGImages")


def _cityscapes(layout, root):
    suffix = "_leftImg8bit"

    def label_of(image: Path) -> Path:
        name = image.stem.removesuffix(suffix)
        return root / "gtFine" / "val" / image.parent.name / f"{name}_gtFine_labelTrainIds.png"
    return _sorted_images(layout, root, "leftImg8bit/val", f"*/*{suffix}.png", label_of)


_VOC_LAYOUT = """VOC2012/                                  (VOCdevkit/VOC2012)
  JPEGImages/<id>.jpg
  SegmentationClass/<id>.png              palette PNG: 0 = background, 1..20 = classes, 255 = boundary
  ImageSets/Segmentation/val.txt          one image id per line"""
_CONTEXT_LAYOUT = """VOC2010/                                  (after mmseg's tools/dataset_converters/pascal_context.py)
  JPEGImages/<id>.jpg
  SegmentationClassContext/<id>.png       0 = background, 1..59 = classes
  ImageSets/SegmentationContext/val.txt   one image id per line"""


def _detectron2(**changes) -> Callable[[SegmentationLayout], SegmentationLayout]:
    """A CAT-Seg (detectron2) layout of a dataset: train ids stored as they are, 255 = ignore."""
    def build(base: SegmentationLayout) -> SegmentationLayout:
        return replace(base, **{"convention": "detectron2", "reduce_zero_label": False, "list_train_pairs": None,
                                "stray_label_hint": "", **changes})
    return build


def _with_alternatives(base: SegmentationLayout, *builders) -> SegmentationLayout:
    return replace(base, alternatives=tuple(build(base) for build in builders))


_CATSEG_COCO_STUFF_HINT = ("values above 170 mean the maps are not CAT-Seg's train ids: write "
                           "annotations_detectron2/ from COCO-Stuff's stuffthingmaps with CAT-Seg's "
                           "datasets/prepare_coco_stuff.py")

# Other names of registered datasets: CAT-Seg's benchmark names (``denserc catseg eval --dataset``).
DATASET_ALIASES = {"ade150": "ade20k"}


def _dataset_spellings(name: str) -> set[str]:
    """The names a lookup of ``name`` accepts: dashes and underscores are one spelling (coco-stuff = coco_stuff,
    as the dataset and its class-name list are named), and an alias is its dataset's name."""
    name = DATASET_ALIASES.get(name, name)
    return {name, name.replace("_", "-"), name.replace("-", "_")}


SEGMENTATION_DATASETS: Registry[SegmentationLayout] = Registry("segmentation dataset", _dataset_spellings)
for _layout in (
    _with_alternatives(SegmentationLayout(
        "ade20k", "ADE20K-150", "ade20k", 150, False, True,
        """ADEChallengeData2016/
  images/validation/<name>.jpg
  annotations/validation/<name>.png       0 = unlabelled, 1..150 = classes""",
        ("images/validation", "annotations/validation"), _ade20k, prepared_by="ADEChallengeData2016.zip as released"),
        _detectron2(layout="""ADEChallengeData2016/                     (after CAT-Seg's datasets/prepare_ade20k_150.py)
  images/validation/<name>.jpg
  annotations_detectron2/validation/<name>.png   0..149 = classes, 255 = unlabelled""",
                    markers=("images/validation", "annotations_detectron2/validation"), list_pairs=_ade20k_detectron2,
                    prepared_by="CAT-Seg's datasets/prepare_ade20k_150.py")),
    _with_alternatives(SegmentationLayout(
        "voc20", "PASCAL VOC-20", "voc20", 20, False, True, _VOC_LAYOUT,
        ("ImageSets/Segmentation/val.txt", "SegmentationClass"), _voc, prepared_by="VOCtrainval_11-May-2012.tar as released"),
        _detectron2(layout="""VOC2012/                                  (after CAT-Seg's datasets/prepare_voc.py)
  JPEGImages/<id>.jpg
  annotations_detectron2/val/<id>.png     0..19 = classes, 255 = background and boundary""",
                    markers=("JPEGImages", "annotations_detectron2/val"), list_pairs=_voc_detectron2,
                    prepared_by="CAT-Seg's datasets/prepare_voc.py")),
    _with_alternatives(SegmentationLayout(
        "voc21", "PASCAL VOC-21", "voc21", 21, True, False, _VOC_LAYOUT,
        ("ImageSets/Segmentation/val.txt", "SegmentationClass"), _voc, prepared_by="VOCtrainval_11-May-2012.tar as released"),
        _detectron2(layout="""VOC2012/                                  (after CAT-Seg's datasets/prepare_voc.py)
  JPEGImages/<id>.jpg
  annotations_detectron2_bg/val/<id>.png  0..19 = classes, 20 = background, 255 = boundary""",
                    markers=("JPEGImages", "annotations_detectron2_bg/val"), list_pairs=_voc_background_detectron2,
                    decode=_voc_background_last, prepared_by="CAT-Seg's datasets/prepare_voc.py")),
    _with_alternatives(SegmentationLayout(
        "context59", "PASCAL Context-59", "context59", 59, False, True, _CONTEXT_LAYOUT,
        ("ImageSets/SegmentationContext/val.txt", "SegmentationClassContext"), _context,
        prepared_by="mmseg's tools/dataset_converters/pascal_context.py"),
        _detectron2(layout="""VOC2010/                                  (after CAT-Seg's datasets/prepare_pascal_context_59.py)
  JPEGImages/<id>.jpg
  annotations_detectron2/pc59_val/<id>.png   0..58 = classes, 255 = unlabelled""",
                    markers=("JPEGImages", "annotations_detectron2/pc59_val"), list_pairs=_context59_detectron2,
                    prepared_by="CAT-Seg's datasets/prepare_pascal_context_59.py")),
    SegmentationLayout("context60", "PASCAL Context-60", "context60", 60, True, False, _CONTEXT_LAYOUT,
                       ("ImageSets/SegmentationContext/val.txt", "SegmentationClassContext"), _context,
                       prepared_by="mmseg's tools/dataset_converters/pascal_context.py"),
    _with_alternatives(SegmentationLayout(
        "coco-stuff", "COCO-Stuff-171", "coco_stuff", 171, False, False,
        """coco_stuff164k/                           (after mmseg's tools/dataset_converters/coco_stuff164k.py)
  images/{train,val}2017/<id>.jpg
  annotations/{train,val}2017/<id>_labelTrainIds.png   0..170 = classes, 255 = unlabelled""",
        ("images/val2017", "annotations/val2017"), _coco_stuff, list_train_pairs=_coco_stuff_train,
        stray_label_hint="values above 170 mean the maps are still in COCO-Stuff's raw 0..181 numbering (182 ids, "
        "11 unused): convert them to the 171 train ids with mmseg's tools/dataset_converters/coco_stuff164k.py, "
        "which writes the *_labelTrainIds.png files",
        prepared_by="mmseg's tools/dataset_converters/coco_stuff164k.py"),
        _detectron2(layout="""coco-stuff/                               (after CAT-Seg's datasets/prepare_coco_stuff.py)
  images/{train,val}2017/<id>.jpg
  annotations_detectron2/{train,val}2017/<id>.png   0..170 = classes, 255 = unlabelled""",
                    markers=("images/val2017", "annotations_detectron2/val2017"), list_pairs=_coco_stuff_detectron2,
                    list_train_pairs=_coco_stuff_train_detectron2, stray_label_hint=_CATSEG_COCO_STUFF_HINT,
                    prepared_by="CAT-Seg's datasets/prepare_coco_stuff.py")),
    SegmentationLayout(
        "cityscapes", "Cityscapes-19", "cityscapes", 19, False, False,
        """cityscapes/
  leftImg8bit/val/<city>/<name>_leftImg8bit.png
  gtFine/val/<city>/<name>_gtFine_labelTrainIds.png   0..18 = train ids, 255 = ignore
                                                      (cityscapesscripts' createTrainIdLabelImgs)""",
        ("leftImg8bit/val", "gtFine/val"), _cityscapes, prepared_by="cityscapesscripts' createTrainIdLabelImgs"),
    # The two large-vocabulary sets exist only in the layout CAT-Seg's converters write (datasets/
    # prepare_ade20k_full.py, prepare_pascal_context_459.py of cvlab-kaist/CAT-Seg): 16-bit TIFF labels.
    SegmentationLayout(
        "ade847", "ADE20K-847", "ade847", 847, False, False,
        """ADE20K_2021_17_01/                        (after CAT-Seg's datasets/prepare_ade20k_full.py)
  images_detectron2/validation/<name>.jpg
  annotations_detectron2/validation/<name>.tif   16-bit: 0..846 = classes, 65535 = unlabelled""",
        ("images_detectron2/validation", "annotations_detectron2/validation"), _ade847, ignore_index=65535,
        convention="detectron2", prepared_by="CAT-Seg's datasets/prepare_ade20k_full.py"),
    SegmentationLayout(
        "context459", "PASCAL Context-459", "context459", 459, False, False,
        """VOC2010/                                  (after CAT-Seg's datasets/prepare_pascal_context_459.py)
  JPEGImages/<id>.jpg
  annotations_detectron2/pc459_val/<id>.tif   16-bit: 0..458 = classes, 459 and 65535 = unlabelled""",
        ("JPEGImages", "annotations_detectron2/pc459_val"), _context459, ignore_index=65535,
        ignored_values=(459,), convention="detectron2", prepared_by="CAT-Seg's datasets/prepare_pascal_context_459.py"),
):
    SEGMENTATION_DATASETS.register(_layout.name, _layout)
del _layout


def segmentation_layout(name: str) -> SegmentationLayout:
    """The registered segmentation dataset ``name`` (a name no one registered is looked for in the plug-ins);
    ``-`` and ``_`` are interchangeable in the name, and ``DATASET_ALIASES`` are accepted."""
    return SEGMENTATION_DATASETS.get(name)


def detect_segmentation_dataset(root: str | os.PathLike) -> str:
    """The dataset whose layout (any of its layouts) ``root`` has; an error if none or several (VOC-20/21,
    Context-59/60/459) fit.

    The plug-ins' datasets are looked at too if no registered layout fits.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset folder {root} does not exist")

    def matching() -> list[str]:
        return [name for name, layout in SEGMENTATION_DATASETS.items() if layout.matches(root)]
    matches = matching()
    if not matches:
        load_plugins()
        matches = matching()
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"{root} has the layout of {' and '.join(matches)}: choose one with --dataset")
    expected = "\n\n".join(f"{layout.title} (--dataset {name}):\n" + "\n".join(v.layout for v in layout.variants)
                           for name, layout in SEGMENTATION_DATASETS.items())
    raise DatasetLayoutError(f"{root} has none of the known segmentation layouts:\n\n{expected}")


def read_layout(layout: SegmentationLayout, root: Path, train: bool = False,
                prefer: str = "mmseg") -> tuple[SegmentationLayout, Pairs]:
    """The first of the dataset's layouts that is complete under ``root`` (those of convention ``prefer``
    first) and its (image, label) pairs.

    A dataset with one layout raises its own error; with several, an error has one line per layout naming
    what is missing there.
    """
    if prefer not in LAYOUT_CONVENTIONS:
        raise ValueError(f"unknown layout convention {prefer!r}; known: {', '.join(LAYOUT_CONVENTIONS)}")
    variants = [variant for variant in layout.variants if not train or variant.list_train_pairs is not None]
    variants.sort(key=lambda variant: variant.convention != prefer)
    if len(variants) == 1:
        return variants[0], _list(variants[0], root, train)
    problems = []
    for variant in variants:
        try:
            return variant, _list(variant, root, train)
        except DatasetLayoutError as error:
            problems.append(f"  {variant.convention} layout ({variant.prepared_by}): {error.problem}")
    raise DatasetLayoutError(f"{layout.title}: no complete layout under {root} (docs/evaluation.md):\n"
                             + "\n".join(problems))


def _list(layout: SegmentationLayout, root: Path, train: bool) -> Pairs:
    return (layout.list_train_pairs if train else layout.list_pairs)(layout, root)


class SegmentationDataset(Dataset):
    """(image, label) pairs of one segmentation dataset; images optionally resized the mmseg way.

    ``layout`` is the layout read (``read_layout``: ``prefer`` names the convention tried first).
    """

    def __init__(self, name: str, root: str | os.PathLike, short_side: int | None = None,
                 max_long_side: int = 2048, train: bool = False, prefer: str = "mmseg"):
        dataset = segmentation_layout(name)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetLayoutError(f"{dataset.title}: {self.root} does not exist. Expected layout under "
                                     f"{self.root}:\n" + "\n".join(variant.layout for variant in dataset.variants))
        if train and not any(variant.list_train_pairs for variant in dataset.variants):
            trainable = [n for n, layout in SEGMENTATION_DATASETS.items()
                         if any(variant.list_train_pairs for variant in layout.variants)]
            raise ValueError(f"{dataset.title} has no training split here; datasets with one: {trainable}")
        self.layout, self.samples = read_layout(dataset, self.root, train, prefer)
        self.short_side = short_side
        self.max_long_side = max_long_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        """The sample, or ``{"unreadable": message, "name": ...}`` for an image file that cannot be decoded
        (the evaluation decides, in the main process, whether to stop or skip and count it)."""
        image_path, label_path = self.samples[index]
        try:
            image = read_image(image_path)
        except ImageReadError as error:
            return {"unreadable": str(error), "name": image_path.stem}
        label = self.read_label(label_path)
        if image.shape[1:] != label.shape:
            raise ValueError(f"{label_path}: label size {tuple(label.shape)} differs from image {image_path} "
                             f"size {tuple(image.shape[1:])}")
        if self.short_side is not None:
            image = resize_short_side(image, self.short_side, self.max_long_side)
        return {"image": image, "label": label, "name": image_path.stem}

    def read_label(self, path: Path) -> torch.Tensor:
        """(H, W) labels: 0..C-1 classes, layout.ignore_index ignore (stored 0 -> ignore and k -> k-1 where
        reduced). uint8 for 8-bit label PNGs, int32 for 16-bit label TIFFs."""
        ignore = self.layout.ignore_index
        wide = ignore > 255
        modes, kind = ((("I;16", "I;16B", "I"), "image has mode {}, expected a 16-bit (I;16) TIFF") if wide
                       else (("L", "P"), "PNG has mode {}, expected a single-channel (L) or palette (P) PNG"))
        with Image.open(path) as png:
            if png.mode not in modes:
                raise ValueError(_layout_message(self.layout, self.root, f"{path}: label {kind.format(png.mode)} "
                                                 "of class ids"))
            label = np.array(png).astype(np.int32 if wide else np.uint8)
        if self.layout.reduce_zero_label:
            label = np.where(label == 0, IGNORE_INDEX, label - 1).astype(np.uint8)
            label[label == IGNORE_INDEX - 1] = IGNORE_INDEX
        if self.layout.decode is not None:
            label = self.layout.decode(label)
        for value in self.layout.ignored_values:
            label[label == value] = ignore
        stray = np.unique(label[(label != ignore) & (label >= self.layout.num_classes)])
        if stray.size:
            hint = f"; {self.layout.stray_label_hint}" if self.layout.stray_label_hint else ""
            raise ValueError(_layout_message(
                self.layout, self.root, f"{path}: label value(s) {stray.tolist()} are not class ids 0.."
                f"{self.layout.num_classes - 1} or {ignore} (ignore) after decoding{hint}"))
        return torch.from_numpy(label)

    def check_labels(self, indices: Sequence[int], workers: int = 0, progress: bool = False) -> None:
        """Read the label maps of ``indices`` (and compare their size with the image's header) before any
        image is evaluated, so a bad label stops the run at once rather than hours in.

        A few label maps spread over the whole dataset are read too: a wrong numbering (e.g. raw COCO-Stuff
        ids) then shows even when the evaluated images happen to hold no out-of-range value.
        """
        spread = np.linspace(0, len(self) - 1, num=min(len(self), LABEL_SPREAD_SAMPLE)).round().astype(int)
        chosen = sorted(set(int(i) for i in indices) | set(spread.tolist()))
        loader = DataLoader(_LabelCheck(self), sampler=chosen, batch_size=None, num_workers=workers)
        for problem in tqdm(loader, desc="checking label maps", total=len(chosen), disable=not progress,
                            leave=False):
            if problem:
                raise ValueError(problem)


def drop_unreadable(samples: list[dict], skip: bool) -> tuple[list[dict], int]:
    """The readable samples and how many were not; an unreadable one is an error naming it unless ``skip``."""
    unreadable = [sample["unreadable"] for sample in samples if "unreadable" in sample]
    if unreadable and not skip:
        raise ImageReadError(f"{unreadable[0]} (pass --skip-unreadable, or skip_unreadable=True, to evaluate "
                             "the other images and count this one as skipped)")
    return [sample for sample in samples if "unreadable" not in sample], len(unreadable)


# Label maps read from across the dataset (besides the evaluated ones) by ``check_labels``.
LABEL_SPREAD_SAMPLE = 32


class _LabelCheck(Dataset):
    """Problem message (or "") of sample i's label map, found in a worker and raised in the main process."""

    def __init__(self, data: SegmentationDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> str:
        image_path, label_path = self.data.samples[index]
        try:
            label = self.data.read_label(label_path)
        except ValueError as error:  # read_label's messages name the file
            return str(error)
        except OSError as error:  # an undecodable label file
            return f"cannot read label map {label_path}: {error}"
        try:
            with Image.open(image_path) as image:
                size = image.size[::-1]
        except OSError:  # an undecodable image is the evaluation's to report or skip (skip_unreadable)
            return ""
        if tuple(label.shape) != size:
            return (f"{label_path}: label size {tuple(label.shape)} differs from image {image_path} "
                    f"size {size}")
        return ""


def read_image(path: Path) -> torch.Tensor:
    """(3, H, W) uint8 RGB, in the file's stored pixel grid (the label maps are drawn on it)."""
    array = np.array(load_image(path, upright=False))
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def resize_short_side(image: torch.Tensor, short_side: int, max_long_side: int) -> torch.Tensor:
    """mmseg's ``Resize(scale=(max_long_side, short_side), keep_ratio=True)``: bilinear, no antialiasing."""
    height, width = image.shape[1:]
    size = short_side_size(height, width, short_side, max_long_side)
    if size == (height, width):
        return image
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)
    return resized[0].round().clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------- helpers
def _layout_message(layout: SegmentationLayout, root: Path, problem: str) -> str:
    return f"{layout.title}: {problem}. Expected layout under {root}:\n{layout.layout}"


def _layout_error(layout: SegmentationLayout, root: Path, problem: str) -> DatasetLayoutError:
    return DatasetLayoutError(_layout_message(layout, root, problem), problem)


def _require_dir(layout: SegmentationLayout, root: Path, relative: str) -> Path:
    path = root / relative
    if not path.is_dir():
        raise _layout_error(layout, root, f"folder {path} does not exist")
    return path


def _require_file(layout: SegmentationLayout, root: Path, path: Path) -> Path:
    if not path.is_file():
        raise _layout_error(layout, root, f"file {path} does not exist")
    return path
