"""Helpers for the evaluation tests: datasets written in their real on-disk formats, and oracle models.

Images encode their ground truth as grey levels (one level per class, 40 apart), so an oracle model
can read each patch's true class back from the pixels it is given, after every resize, pad and
normalisation the evaluation applies. JPEGs are written at quality 100 without chroma subsampling,
so a flat grey patch survives compression to within a level or two.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import denserc
from denserc.eval import build_text_classifier, load_class_names
from denserc.distributed import DistributedEnv

from helpers import TINY

PATCH = 16

# COCO panoptic category ids (80 things with gaps in 1..90, 53 stuff in 92..200), in id order.
THING_IDS = [*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83),
             *range(84, 91)]
STUFF_IDS = [92, 93, 95, 100, 107, 109, 112, 118, 119, 122, 125, 128, 130, 133, 138, 141, 144, 145, 147, 148,
             149, 151, 154, 155, 156, 159, 161, 166, 168, 171, 175, 176, 177, 178, 180, 181, *range(184, 201)]
PANOPTIC_IDS = THING_IDS + STUFF_IDS


def grey_levels(classes) -> dict[int, int]:
    """Class -> grey level, 40 apart from 20 up (at most 6 classes)."""
    classes = list(classes)
    assert len(classes) <= 6
    return {c: 20 + 40 * i for i, c in enumerate(classes)}


def grey_image(label: np.ndarray, levels: dict[int, int], ignore_level: int = 20) -> np.ndarray:
    """(H, W, 3) uint8 image painting each class with its grey level (pixels labelled 255 get ``ignore_level``)."""
    image = np.full(label.shape, ignore_level, dtype=np.uint8)
    for c, level in levels.items():
        image[label == c] = level
    return np.repeat(image[..., None], 3, axis=2)


def stripes(height: int, width: int, classes, rows: int = 48) -> np.ndarray:
    """Horizontal bands ``rows`` pixels high cycling through ``classes`` (255 = ignore allowed)."""
    band = (np.arange(height) // rows) % len(classes)
    return np.asarray(classes, dtype=np.uint8)[band][:, None].repeat(width, axis=1)


def save_jpeg(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=100, subsampling=0)


def save_png(array: np.ndarray, path: Path, palette: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if palette is not None:
        image.putpalette(palette)
    image.save(path)


def voc_palette() -> list[int]:
    """PASCAL VOC's colour map (the palette of SegmentationClass PNGs)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


# Where CAT-Seg's datasets/prepare_*.py write each dataset's labels (train ids as they are, 255 = ignore).
DETECTRON2_LABEL_DIRS = {"ade20k": "annotations_detectron2/validation", "voc20": "annotations_detectron2/val",
                         "voc21": "annotations_detectron2_bg/val", "context59": "annotations_detectron2/pc59_val",
                         "coco-stuff": "annotations_detectron2/val2017"}
DETECTRON2_IMAGE_DIRS = {"ade20k": "images/validation", "voc20": "JPEGImages", "voc21": "JPEGImages",
                         "context59": "JPEGImages", "coco-stuff": "images/val2017"}


def write_segmentation_dataset(name: str, root: Path, labels: list[np.ndarray],
                               images: list[np.ndarray], layout: str = "mmseg") -> Path:
    """Write ``labels`` (class ids 0..C-1, 255 = ignore) and ``images`` in the dataset's real layout: the one
    mmseg reads, or (``layout="detectron2"``) the one CAT-Seg's ``datasets/prepare_*.py`` write."""
    def shifted(label):  # stored 0 = ignore, k + 1 = class k
        return np.where(label == 255, 0, label.astype(np.int64) + 1).astype(np.uint8)

    if layout == "detectron2":
        for index, (label, image) in enumerate(zip(labels, images)):
            stem = f"{index + 1:012d}" if name == "coco-stuff" else f"2008_{index:06d}"
            save_jpeg(image, root / DETECTRON2_IMAGE_DIRS[name] / f"{stem}.jpg")
            if name == "voc21":  # background last: VOC-21 class 0 -> 20, class k -> k - 1
                label = np.where(label == 0, 20, np.where(label == 255, 255, label.astype(np.int64) - 1))
            save_png(label.astype(np.uint8), root / DETECTRON2_LABEL_DIRS[name] / f"{stem}.png")
        return root
    for index, (label, image) in enumerate(zip(labels, images)):
        if name == "ade20k":
            stem = f"ADE_val_{index + 1:08d}"
            save_jpeg(image, root / "images" / "validation" / f"{stem}.jpg")
            save_png(shifted(label), root / "annotations" / "validation" / f"{stem}.png")
        elif name in ("voc20", "voc21", "context59", "context60"):
            stem = f"2008_{index:06d}"
            save_jpeg(image, root / "JPEGImages" / f"{stem}.jpg")
            if name.startswith("voc"):
                stored = shifted(label) if name == "voc20" else label
                save_png(stored, root / "SegmentationClass" / f"{stem}.png", palette=voc_palette())
            else:
                stored = shifted(label) if name == "context59" else label
                save_png(stored, root / "SegmentationClassContext" / f"{stem}.png")
            split = root / "ImageSets" / ("Segmentation" if name.startswith("voc") else "SegmentationContext")
            split.mkdir(parents=True, exist_ok=True)
            with open(split / "val.txt", "a") as f:
                f.write(stem + "\n")
        elif name == "coco-stuff":
            stem = f"{index + 1:012d}"
            save_jpeg(image, root / "images" / "val2017" / f"{stem}.jpg")
            save_png(label, root / "annotations" / "val2017" / f"{stem}_labelTrainIds.png")
        elif name == "cityscapes":
            stem = f"frankfurt_000000_{index:06d}"
            save_png(image, root / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png")
            save_png(label, root / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelTrainIds.png")
        else:
            raise ValueError(name)
    return root


def ids_to_rgb(segment_ids: np.ndarray) -> np.ndarray:
    return np.stack([(segment_ids >> shift) & 255 for shift in (0, 8, 16)], axis=-1).astype(np.uint8)


def write_panoptic(root: Path, scenes: list[tuple[np.ndarray, np.ndarray, dict[int, int]]],
                   split: str = "val2017") -> Path:
    """COCO panoptic: ``scenes`` = (image, segment-id map, {segment id: label index}) per image.

    Categories are COCO's 133 (real ids, isthing), named by the bundled list; label index i is the
    i-th category in id order.
    """
    names = [synonyms[0] for synonyms in load_class_names("coco_panoptic")]
    categories = [{"id": cid, "name": name, "supercategory": "x", "isthing": int(cid in THING_IDS)}
                  for cid, name in zip(PANOPTIC_IDS, names)]
    images, annotations = [], []
    for index, (image, segment_ids, segments) in enumerate(scenes):
        image_id = 139 + index
        stem = f"{image_id:012d}"
        save_jpeg(image, root / split / f"{stem}.jpg")
        save_png(ids_to_rgb(segment_ids), root / "annotations" / f"panoptic_{split}" / f"{stem}.png")
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": image.shape[0],
                       "width": image.shape[1]})
        annotations.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": [
            {"id": sid, "category_id": PANOPTIC_IDS[label], "iscrowd": 0,
             "area": int((segment_ids == sid).sum()), "bbox": [0, 0, 1, 1]} for sid, label in segments.items()]})
    with open(root / "annotations" / f"panoptic_{split}.json", "w") as f:
        json.dump({"info": {}, "licenses": [], "images": images, "annotations": annotations,
                   "categories": categories}, f)
    return root


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return denserc.create_model(TINY).eval()


def write_templates(path: Path, *templates: str) -> Path:
    path.write_text("\n".join(templates) + "\n")
    return path


def shifted(levels: dict[int, int]) -> dict[int, int]:
    """Each class shown -> the next one in ``levels``' order: a derangement (every answer wrong)."""
    shown = list(levels)
    return {c: shown[(i + 1) % len(shown)] for i, c in enumerate(shown)}


def make_oracle(model, tokenizer, class_names, templates, levels: dict[int, int], cache_dir,
                answers: dict[int, int] | None = None):
    """Replace ``model.encode_dense``: each patch's feature is the text embedding of the class its grey
    level encodes, or of ``answers[class]`` where given (a deliberately wrong oracle)."""
    classifier = build_text_classifier(model, tokenizer, class_names, templates, cache_dir=cache_dir)
    first_query = [int(torch.nonzero(classifier.query_class == c)[0]) for c in range(classifier.num_classes)]
    answers = answers or {}
    shown = list(levels)
    grey = torch.tensor([levels[c] for c in shown], dtype=torch.float32)
    features = classifier.embeddings[[first_query[answers.get(c, c)] for c in shown]]
    mean = torch.tensor(model.preprocess_cfg["mean"][0])
    std = torch.tensor(model.preprocess_cfg["std"][0])

    def encode_dense(images: torch.Tensor) -> torch.Tensor:
        pixels = (images[:, 0].float() * std + mean) * 255
        patch_grey = F.avg_pool2d(pixels[:, None], model.patch_size)[:, 0]
        nearest = (patch_grey[..., None] - grey).abs().argmin(dim=-1)
        return features[nearest].permute(0, 3, 1, 2)

    model.encode_dense = encode_dense
    return model


def run_as_two_ranks(monkeypatch, module, evaluate):
    """Run ``evaluate(shard)`` as rank 1 then rank 0 of 2, with ``module.all_reduce`` summing the
    ranks' count tensors in call order (what all_reduce(SUM) does across torchrun processes)."""
    from_rank_1 = []
    monkeypatch.setattr(module, "all_reduce", lambda tensor, op: from_rank_1.append(tensor.clone()) or tensor)
    evaluate(DistributedEnv(1, 2))
    pending = iter(from_rank_1)
    monkeypatch.setattr(module, "all_reduce", lambda tensor, op: tensor.add_(next(pending)))
    result = evaluate(DistributedEnv(0, 2))
    assert next(pending, None) is None, "rank 0 reduced fewer tensors than rank 1"
    return result


def write_coco_stuff(root, count=3, raw_value_in=None):
    """COCO-Stuff fixture of ``count`` 32x48 images with classes 0 and 3; ``raw_value_in``: that image's label
    map also holds 175, a raw COCO-Stuff id (a 'wood' region) that the converted numbering does not have."""
    levels = grey_levels([0, 3])
    labels = [stripes(32, 48, [0, 3], rows=16) for _ in range(count)]
    if raw_value_in is not None:
        labels[raw_value_in][:4] = 175
    return write_segmentation_dataset("coco-stuff", root, labels, [grey_image(label, levels) for label in labels])

