"""The testbed's held-out split on disk and its evaluation through the ordinary evaluation suite.

The split is written in the COCO-panoptic layout that ``denserc.eval`` reads for region
classification, and the plug-in registers ``LAYOUT`` as the segmentation dataset ``testbed`` (labels
from ``annotations/semantic_{split}``), so both protocols run unchanged on generated scenes. Class
queries are the phrases the tiny CLIP was pretrained with ("a red striped object", "an orange dotted object",
"grass") and the prompt templates are the pretraining templates; both are written beside the split.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from denserc.eval.datasets import SegmentationLayout
from denserc.eval.region import evaluate_regions
from denserc.eval.segmentation import SegmentationProtocol, evaluate_segmentation

from .coco import write_split
from .crops import ScenePool
from .scenes import SceneConfig
from .vocabulary import CATEGORIES, TEMPLATES, phrase
from .zero_shot import crop_accuracy

SPLIT = "val"
TRAIN_SPLIT = "train"  # written only by denserc testbed-catseg (a segmenter trained on the testbed)
DATASET = "testbed"
CLASS_NAMES_FILE = "testbed_class_names.txt"
TEMPLATES_FILE = "testbed_templates.txt"


def _split_pairs(layout: SegmentationLayout, root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label map) pairs of the images the split's JSON lists (stale files are ignored)."""
    panoptic = root / "annotations" / f"panoptic_{split}.json"
    if not panoptic.is_file():
        raise FileNotFoundError(f"{layout.title}: {panoptic} does not exist. Expected layout under {root}:\n"
                                f"{layout.layout}")
    names = [image["file_name"] for image in json.loads(panoptic.read_text(encoding="utf-8"))["images"]]
    return [(root / split / name, root / "annotations" / f"semantic_{split}" / name) for name in names]


def _list_pairs(layout: SegmentationLayout, root: Path) -> list[tuple[Path, Path]]:
    return _split_pairs(layout, root, SPLIT)


def _list_train_pairs(layout: SegmentationLayout, root: Path) -> list[tuple[Path, Path]]:
    """The training split ``denserc testbed-catseg`` writes beside the held-out one."""
    return _split_pairs(layout, root, TRAIN_SPLIT)


LAYOUT = SegmentationLayout(
    DATASET, "DenseRC testbed", DATASET, len(CATEGORIES), False, False,
    f"""testbed/                                   (written by denserc_testbed.write_split)
  {SPLIT}/<id>.png
  annotations/panoptic_{SPLIT}.json
  annotations/semantic_{SPLIT}/<id>.png        0..{len(CATEGORIES) - 1} = classes, 255 = void""",
    (SPLIT, f"annotations/semantic_{SPLIT}"), _list_pairs, list_train_pairs=_list_train_pairs)


def protocol(image_size: int) -> SegmentationProtocol:
    """Scenes resized to ``image_size``, one window covering all of it (the model takes any size)."""
    return SegmentationProtocol(short_side=image_size, window=image_size, stride=image_size // 2)


def prepare_split(root: str | os.PathLike, num_images: int, seed: int, progress: bool = True) -> Path:
    """Write the held-out split under ``root`` unless the same one (seed, size, scene settings) is there."""
    root = Path(root)
    panoptic = root / "annotations" / f"panoptic_{SPLIT}.json"
    wanted = {"seed": seed, "split": SPLIT, "scene_config": asdict(SceneConfig())}
    if panoptic.is_file():
        content = json.loads(panoptic.read_text(encoding="utf-8"))
        info = content.get("info", {})
        if len(content["images"]) == num_images and all(info.get(k) == v for k, v in wanted.items()):
            return root
    write_split(root, SPLIT, num_images, seed, progress=progress)
    (root / CLASS_NAMES_FILE).write_text("\n".join(phrase(c["id"]) for c in CATEGORIES) + "\n", encoding="utf-8")
    (root / TEMPLATES_FILE).write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")
    return root


def evaluate(model, tokenizer, root: str | os.PathLike, crops: ScenePool, image_size: int,
             progress: bool = False) -> dict:
    """Region top-1 (boxes, thing boxes, thing masks, stuff masks), segmentation mIoU and crop zero-shot accuracy.

    Dense features are computed on scenes resized to ``image_size`` (the distillation's input size,
    as CLIPSelf evaluates at its training size). ``crops`` is the held-out split as a ``ScenePool``
    (the same scenes), for the global embedding's zero-shot accuracy on single-class crops.
    """
    root = Path(root)
    queries = {"class_names": str(root / CLASS_NAMES_FILE), "templates": str(root / TEMPLATES_FILE),
               "cache_dir": root / "text_cache", "workers": 0, "progress": progress}
    regions = evaluate_regions(model, tokenizer, root, split=SPLIT, image_size=image_size, batch_size=32, **queries)
    segmentation = evaluate_segmentation(model, tokenizer, root, DATASET, protocol=protocol(image_size),
                                         batch_size=32, **queries)
    zero_shot = crop_accuracy(model, tokenizer, crops)
    return {
        "boxes_top1": regions["boxes"]["top1"],
        "thing_boxes_top1": regions["boxes_thing"]["top1"],
        "thing_masks_top1": regions["masks_thing"]["top1"],
        "stuff_masks_top1": regions["masks_stuff"]["top1"],
        "mIoU": segmentation["mIoU"],
        "crop_things_top1": 100 * zero_shot["things_top1"],
        "crop_stuff_top1": 100 * zero_shot["stuff_top1"],
        "segments": regions["boxes"]["segments"],
    }
