"""Zero-shot region classification on COCO panoptic (the CLIPSelf protocol).

Every panoptic segment is classified twice from one dense forward pass of its image:
- box pooling: RoIAlign 1x1 (aligned) of the L2-normalised dense features over the segment's box;
- mask pooling: the L2-normalised dense features averaged over the segment's mask at feature
  resolution (each patch weighted by the fraction of its pixels inside the mask);
against the class text embeddings (ViLD's hand-crafted templates by default, as CLIPSelf). Reported:
top-1/top-5 accuracy over boxes and masks, for all, thing and stuff segments, both over segments
and as the mean of per-class accuracies (CLIPSelf's mAcc).

Input: the image's longer side resized to ``image_size`` (bicubic) and padded with black to a
square; ``image_size`` defaults to 64 patches (1024 for /16 models, 896 for /14), CLIPSelf's
``--det-image-size`` for ViT-B/16 and ViT-L/14.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..distributed import DistributedEnv, all_reduce
from ..models import normalize_images, pool_boxes, pool_masks
from .datasets import drop_unreadable
from .panoptic import PanopticRegions
from .defaults import REGION_TEMPLATES
from .metrics import add_region_predictions, region_counts, region_metrics
from .text import build_text_classifier, load_class_names, load_templates

DEFAULT_CLASS_NAMES = "coco_panoptic"
DEFAULT_TEMPLATES = REGION_TEMPLATES
DATASET_CLASS_NAMES = "dataset"  # use the category names stored in the panoptic JSON
GRID_PATCHES = 64


def default_image_size(model) -> int:
    """64 patches per side: 1024 px for a /16 model, 896 px for a /14 model (CLIPSelf's settings)."""
    return GRID_PATCHES * model.patch_size


@torch.no_grad()
def evaluate_regions(model, tokenizer, root: str | os.PathLike, *, split: str = "val2017",
                     class_names: str = DEFAULT_CLASS_NAMES, templates: str = DEFAULT_TEMPLATES,
                     image_size: int | None = None, batch_size: int = 4, workers: int = 4, limit: int | None = None,
                     shard: DistributedEnv = DistributedEnv(), cache_dir: str | os.PathLike | None = None,
                     progress: bool = True, description: str | None = None,
                     skip_unreadable: bool = False) -> dict:
    """Box/mask classification accuracies of ``model`` on a COCO-panoptic split (this rank's shard, summed).

    ``class_names``: a bundled list or file in the categories' id order, or "dataset" for the names
    in the panoptic JSON. ``batch_size`` is images per forward pass. An image file that cannot be decoded
    stops the evaluation with its name, or with ``skip_unreadable`` is left out and counted.
    """
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    image_size = image_size or default_image_size(model)
    data = PanopticRegions(root, split, image_size=image_size, patch_size=model.patch_size)
    indices = shard.indices(len(data) if limit is None else min(limit, len(data)))
    data.check_files(indices)
    names = ([[name] for name in data.category_names] if class_names == DATASET_CLASS_NAMES
             else load_class_names(class_names))
    if len(names) != len(data.category_names):
        raise ValueError(f"{data.json_path} has {len(data.category_names)} categories but the class-name list "
                         f"{class_names!r} has {len(names)}; pass a list in category-id order or "
                         f"--class-names {DATASET_CLASS_NAMES} to use the JSON's names")
    classifier = build_text_classifier(model, tokenizer, names, load_templates(templates), cache_dir=cache_dir,
                                       progress=progress and shard.is_main)
    loader = DataLoader(Subset(data, indices), batch_size=batch_size, num_workers=workers,
                        collate_fn=list)
    counts = region_counts(classifier.num_classes, device)
    totals = torch.zeros(3, dtype=torch.long, device=device)  # images, skipped segments, unreadable images
    for batch in tqdm(loader, desc=description or "COCO panoptic regions", disable=not (progress and shard.is_main)):
        batch, unreadable = drop_unreadable(batch, skip_unreadable)
        totals[2] += unreadable
        if not batch:
            continue
        images = normalize_images(torch.stack([sample["image"] for sample in batch]).to(device), model.preprocess_cfg)
        dense = F.normalize(model.encode_dense(images.to(dtype)).float(), dim=1)
        labels = torch.cat([sample["labels"] for sample in batch]).to(device)
        features = {"boxes": pool_boxes(dense, [sample["boxes"] for sample in batch], model.patch_size),
                    "masks": pool_masks(dense, [sample["coverage"].to(device) for sample in batch])}
        for pooling, pooled in features.items():
            scores = classifier.class_scores(pooled @ classifier.embeddings.T)
            add_region_predictions(counts, pooling, scores, labels)
        totals[:2] += torch.tensor([len(batch), sum(sample["skipped"] for sample in batch)], device=device)
    all_reduce(counts, op="sum")
    all_reduce(totals, op="sum")
    return {"dataset": "coco-panoptic", "split": split, "num_images": int(totals[0]),
            "segments_skipped": int(totals[1]), "unreadable_images": int(totals[2]), "image_size": image_size,
            "templates": templates, "class_names": class_names,
            **region_metrics(counts, data.is_thing, [", ".join(synonyms) for synonyms in names])}
