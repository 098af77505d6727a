"""Write generated scenes to disk in the COCO / COCO-panoptic layouts, so any COCO reader loads them.

    ROOT/{split}/000000000001.png                      the images (PNG: lossless, so pixels match masks)
    ROOT/annotations/instances_{split}.json            things: boxes + RLE masks, plus a crop "caption"
    ROOT/annotations/panoptic_{split}.json             all segments; categories carry "isthing"
    ROOT/annotations/panoptic_{split}/000000000001.png segment id = R + 256 G + 256^2 B, 0 = void
    ROOT/annotations/semantic_{split}/000000000001.png per-pixel label = category_id - 1, 255 = void
    ROOT/annotations/captions_{split}.json             one caption per scene (COCO captions format)
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from denserc.eval.panoptic import panoptic_ids_to_rgb
from denserc.io import atomic_write, save_json

from .scenes import Scene, SceneConfig, render_scene, scene_rng
from .vocabulary import CATEGORIES, TEMPLATES, THING_CATEGORIES, coco_category, phrase


def encode_mask(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a boolean mask, with the counts as a JSON-able string."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def crop_caption(category_id: int) -> str:
    """The caption of a single-object crop: the first prompt template with the class phrase."""
    return TEMPLATES[0].format(phrase(category_id))


def write_split(root: str | os.PathLike, split: str, num_images: int, seed: int,
                config: SceneConfig = SceneConfig(), progress: bool = True) -> dict[str, Path]:
    """Render ``num_images`` scenes (scene i from ``scene_rng(seed, i)``) and write them under ``root``.

    Returns the written paths by kind: images, instances, panoptic, panoptic_masks, semantic, captions.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    root = Path(root)
    paths = {
        "images": root / split,
        "instances": root / "annotations" / f"instances_{split}.json",
        "panoptic": root / "annotations" / f"panoptic_{split}.json",
        "panoptic_masks": root / "annotations" / f"panoptic_{split}",
        "semantic": root / "annotations" / f"semantic_{split}",
        "captions": root / "annotations" / f"captions_{split}.json",
    }
    for folder in ("images", "panoptic_masks", "semantic"):
        paths[folder].mkdir(parents=True, exist_ok=True)
    info = {"description": "DenseRC testbed: procedurally generated scenes (denserc_testbed)",
            "seed": seed, "split": split, "scene_config": asdict(config)}
    images, instances, panoptic, captions = [], [], [], []
    for index in tqdm(range(num_images), desc=f"writing {split}", disable=not progress):
        scene = render_scene(scene_rng(seed, index), config)
        image_id = index + 1
        stem = f"{image_id:012d}"
        _write_png(scene.image, paths["images"] / f"{stem}.png")
        _write_png(panoptic_ids_to_rgb(scene.segment_ids), paths["panoptic_masks"] / f"{stem}.png")
        _write_png(scene.label_map, paths["semantic"] / f"{stem}.png")
        height, width = scene.image.shape[:2]
        images.append({"id": image_id, "file_name": f"{stem}.png", "height": height, "width": width})
        captions.append({"id": image_id, "image_id": image_id, "caption": scene.caption})
        instances.extend(_instance_annotations(scene, image_id, first_id=len(instances) + 1))
        panoptic.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": [
            {"id": s.id, "category_id": s.category_id, "area": s.area, "bbox": s.bbox, "iscrowd": 0}
            for s in scene.segments]})
    save_json({"info": info, "images": images, "annotations": instances,
               "categories": [coco_category(c) for c in THING_CATEGORIES]}, paths["instances"])
    save_json({"info": info, "images": images, "annotations": panoptic,
               "categories": [coco_category(c) for c in CATEGORIES]}, paths["panoptic"])
    save_json({"info": info, "images": images, "annotations": captions}, paths["captions"])
    return paths


def _instance_annotations(scene: Scene, image_id: int, first_id: int) -> list[dict]:
    return [{"id": first_id + k, "image_id": image_id, "category_id": s.category_id, "bbox": s.bbox,
             "area": s.area, "segmentation": encode_mask(s.mask), "iscrowd": 0,
             "caption": crop_caption(s.category_id)}
            for k, s in enumerate(scene.things)]


def _write_png(array: np.ndarray, path: Path) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
