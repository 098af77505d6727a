"""COCO-format detection data: reading (any worker), and augmentation + batching on the device.

The dataset reads one image and its annotations of the split's classes: in training only the base
classes' boxes (novel boxes are never seen) and no crowd regions. Augmentation runs in the training
task's ``prepare`` on the device, with a generator seeded by (seed, epoch, image index), so it is the
same whatever the number of processes and workers, and exact on resume. It is CLIPSelf's pipeline
(``F-ViT/configs/ov_coco``): large-scale jitter (keep-ratio resize to ``size x U(0.1, 2.0)``), a random
``size x size`` crop, boxes clipped to the crop and dropped below 0.01 px (a crop left without boxes
still trains, as mmdet's ``RandomCrop(allow_negative_crop=True)`` keeps it), horizontal flip with
probability 0.5, normalisation (``normalisation``: the peer's ImageNet mean/std by default), zero
padding to ``size x size`` at the bottom/right. Evaluation resizes the image to fit ``size x size``
(keep ratio) and pads likewise.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from ..data.grid import draw_seed
from ..images import fit_within, load_image
from ..io import read_json
from ..models import normalize_images
from .protocols import Split

MIN_BOX_SIDE = 0.01  # px, after cropping (mmdet's FilterAnnotations in the peer's pipeline)


class DetectionDataset(Dataset):
    """Images of a COCO-style annotation file with their boxes (and masks) of the split's classes.

    A sample: ``index``, ``image_id``, ``image`` (3, H, W) uint8, ``boxes`` (K, 4) x1y1x2y2 in pixels,
    ``labels`` (K,) 0-based indices into ``split``, and ``masks`` (K, H, W) uint8 when ``with_masks``.
    ``base_only`` drops the novel classes' annotations (training); ``image_ids`` keeps those images only (the
    ones a protocol scores); ``ground_truth`` is the file's parsed content when the caller has read it.
    """

    def __init__(self, annotations: str | os.PathLike, images: str | os.PathLike, split: Split, *,
                 base_only: bool, with_masks: bool = False, max_images: int | None = None,
                 image_ids: Collection[int] | None = None, ground_truth: dict | None = None):
        self.annotations = Path(annotations)
        self.images = Path(images)
        if not self.images.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.images}")
        coco = ground_truth if ground_truth is not None else read_json(self.annotations, "annotation")
        self.split = split
        self.with_masks = with_masks
        wanted = split.base_ids if base_only else list(split.category_ids)
        label_of = {c: k for k, c in enumerate(split.category_ids) if c in set(wanted)}
        per_image: dict[int, list] = {image["id"]: [] for image in coco["images"]}
        for ann in coco.get("annotations", []):
            if ann.get("iscrowd", 0) or ann["category_id"] not in label_of:
                continue
            x, y, w, h = ann["bbox"]
            if w < 1 or h < 1 or ann.get("area", w * h) <= 0:
                continue
            per_image[ann["image_id"]].append(ann)
        self.label_of = label_of
        self.records = [(image, per_image[image["id"]]) for image in sorted(coco["images"], key=lambda i: i["id"])]
        if image_ids is not None:
            wanted_images = set(image_ids)
            self.records = [record for record in self.records if record[0]["id"] in wanted_images]
        if base_only:  # as mmdet's filter_empty_gt: images without any base box do not train
            self.records = [record for record in self.records if record[1]]
        if max_images is not None:
            self.records = self.records[:max_images]
        if not self.records:
            raise ValueError(f"{self.annotations}: no images with annotations of the split's classes")
        missing = [image for image, _ in self.records if not (self.images / image_file(image)).is_file()]
        if missing:  # stop now, not when the loader reaches the file hours into training or evaluation
            more = f" and {len(missing) - 1} more of its {len(self.records)} images" if len(missing) > 1 else ""
            verb = "do" if more else "does"
            raise FileNotFoundError(f"{self.annotations} lists {self.images / image_file(missing[0])}{more}, "
                                    f"which {verb} not exist under the image folder {self.images}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        image_info, anns = self.records[index]
        image = load_image(self.images / image_file(image_info))
        width, height = image.size
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        sample = {"index": index, "image_id": image_info["id"], "image": pixels, "boxes": boxes,
                  "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.long)}
        if self.with_masks:
            masks = [decode_segmentation(a["segmentation"], height, width) for a in anns]
            sample["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, height, width,
                                                                                         dtype=torch.uint8)
        return sample


def image_file(image_info: dict) -> str:
    """COCO's ``file_name``; LVIS has none: ``<folder>/<file>`` from its ``coco_url`` (train2017/val2017)."""
    if "file_name" in image_info:
        return image_info["file_name"]
    if "coco_url" in image_info:
        return "/".join(image_info["coco_url"].split("/")[-2:])
    raise ValueError(f"image {image_info.get('id')} has neither 'file_name' nor 'coco_url'")


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """COCO polygons / RLE -> (H, W) uint8 mask."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(np.uint8)


def collate_samples(samples: list[dict]) -> list[dict]:
    """Samples stay a list: images differ in size until ``augment``/``letterbox`` puts them on one canvas."""
    return list(samples)


@dataclass
class Batch:
    """Inputs on one canvas: ``images`` (B, 3, S, S) normalised and padded; per image its valid (h, w),
    the factor from original to input pixels, its id and original (H, W), and (training) ``targets``."""
    images: torch.Tensor
    image_sizes: list[tuple[int, int]]
    scales: list[float]
    image_ids: list[int]
    original_sizes: list[tuple[int, int]]
    targets: list[dict] | None = None


def augment(samples: list[dict], size: int, mean, std, device, *, seed: int, epoch: int,
            scale_range: tuple[float, float] = (0.1, 2.0), flip: float = 0.5) -> Batch:
    """Large-scale jitter + crop + flip of each sample onto a ``size`` canvas (training)."""
    images, sizes, targets = [], [], []
    for sample in samples:
        generator = torch.Generator().manual_seed(draw_seed(seed, epoch, sample["index"]))
        low, high = scale_range
        ratio = low + (high - low) * torch.rand((), generator=generator).item()
        image = sample["image"].to(device)
        height, width = image.shape[-2:]
        scale = size * ratio / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        top = int(torch.randint(0, max(new_h - size, 0) + 1, (), generator=generator))
        left = int(torch.randint(0, max(new_w - size, 0) + 1, (), generator=generator))
        flipped = torch.rand((), generator=generator).item() < flip
        crop_h, crop_w = min(size, new_h), min(size, new_w)
        pixels = _resize(image, new_h, new_w)[:, top:top + crop_h, left:left + crop_w]
        boxes = sample["boxes"].to(device) * torch.tensor([new_w / width, new_h / height] * 2, device=device)
        boxes = boxes - torch.tensor([left, top, left, top], device=device, dtype=boxes.dtype)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, crop_w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, crop_h)
        keep = ((boxes[:, 2] - boxes[:, 0]) > MIN_BOX_SIDE) & ((boxes[:, 3] - boxes[:, 1]) > MIN_BOX_SIDE)
        target = {"boxes": boxes[keep], "labels": sample["labels"].to(device)[keep]}
        if "masks" in sample:
            masks = sample["masks"][keep.cpu()].to(device)
            masks = F.interpolate(masks[None].float(), size=(new_h, new_w), mode="nearest")[0]
            target["masks"] = _pad(masks[:, top:top + crop_h, left:left + crop_w], size).to(torch.uint8)
        if flipped:
            pixels = pixels.flip(-1)
            x1 = crop_w - target["boxes"][:, 2]
            x2 = crop_w - target["boxes"][:, 0]
            target["boxes"] = torch.stack([x1, target["boxes"][:, 1], x2, target["boxes"][:, 3]], dim=1)
            if "masks" in target:
                target["masks"] = _pad(target["masks"][:, :crop_h, :crop_w].flip(-1), size)
        images.append(_pad(_normalise(pixels, mean, std), size))
        sizes.append((crop_h, crop_w))
        targets.append(target)
    return Batch(torch.stack(images), sizes, [1.0] * len(samples), [s["image_id"] for s in samples], sizes, targets)


def letterbox(samples: list[dict], size: int, mean, std, device) -> Batch:
    """Keep-ratio resize to fit ``size x size`` and pad (evaluation); ``scales`` map back to the original."""
    images, sizes, scales = [], [], []
    for sample in samples:
        image = sample["image"].to(device)
        (new_h, new_w), scale = fit_within(image.shape[-2:], (size, size))
        new_h, new_w, scale = int(new_h), int(new_w), float(scale)
        images.append(_pad(_normalise(_resize(image, new_h, new_w), mean, std), size))
        sizes.append((new_h, new_w))
        scales.append(scale)
    originals = [tuple(s["image"].shape[-2:]) for s in samples]
    return Batch(torch.stack(images), sizes, scales, [s["image_id"] for s in samples], originals)


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (3, H, W) -> float (3, h, w) in 0..1, bilinear with antialiasing when shrinking."""
    pixels = image.float()[None] / 255.0
    if (height, width) != tuple(image.shape[-2:]):
        pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False,
                               antialias=height < image.shape[-2])
    return pixels[0].clamp(0, 1)


def normalisation(data, tower) -> tuple[list[float], list[float]]:
    """(mean, std) of the inputs: ``data.mean``/``data.std`` of a detection config, or the tower's own
    (``preprocess_cfg``) where they are null."""
    if data.mean is None:
        return list(tower.preprocess_cfg["mean"]), list(tower.preprocess_cfg["std"])
    return list(data.mean), list(data.std)


def _normalise(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """[0, 1] pixels with the configured mean/std (``normalize_images``, the library's one normalisation)."""
    return normalize_images(pixels, {"mean": mean, "std": std}, white=1.0)


def _pad(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2]))


def pil_sample(image: Image.Image, index: int = 0, image_id: int = 0) -> dict:
    """A PIL image as a dataset sample (no annotations), for ``letterbox``."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return {"index": index, "image_id": image_id, "image": pixels}
