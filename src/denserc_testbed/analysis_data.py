"""The testbed's data for ``denserc analyze`` (registered for ``ViT-Testbed-P8``): the held-out scenes, their
object crops with their classes, their segments, and the testbed's evaluation for the L and lambda sweeps."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from denserc.analysis import AnalysisData, Segment
from denserc.models import get_tokenizer

from .crops import ScenePool
from .evaluation import evaluate, prepare_split
from .settings import EVAL_IMAGES, EVAL_SEED, SCHEDULES
from .tiny_clip import MODEL_NAME
from .vocabulary import CATEGORIES, TEMPLATES, THING_CATEGORIES, phrase
from .zero_shot import eval_crops

# what the sweeps report (keys of ``evaluation.evaluate``), as docs/testbed.md's tables name them
SWEEP_METRICS = {"boxes_top1": "boxes", "thing_boxes_top1": "thing boxes", "thing_masks_top1": "thing masks",
                 "stuff_masks_top1": "stuff masks", "mIoU": "mIoU", "crop_things_top1": "global: object crops"}


def build_analysis_data(num_images: int, workdir: Path, progress: bool = True) -> AnalysisData:
    """The first ``num_images`` held-out scenes (seed EVAL_SEED, as ``denserc testbed`` evaluates on), their
    object crops (classes among the 48 thing classes) and segments (classes among all 53)."""
    pool = ScenePool.render(EVAL_SEED, num_images, progress=progress)
    crops, categories = eval_crops(pool, 48)
    thing_ids = [c["id"] for c in THING_CATEGORIES]
    things = torch.isin(categories, torch.tensor(thing_ids))
    labels = torch.tensor([thing_ids.index(int(c)) for c in categories[things]])
    segments = []
    for segment_map, parts in zip(pool.segment_maps, pool.segment_parts):
        segments.append([Segment(torch.from_numpy(segment_map == number), category_id - 1,
                                 bool(CATEGORIES[category_id - 1]["isthing"]))
                         for number, (category_id, _) in enumerate(parts)])
    return AnalysisData(
        f"{num_images} held-out testbed scenes (seed {EVAL_SEED}), {int(things.sum())} object crops",
        pool.images.float() / 255, crops[things].float() / 255, [[phrase(i)] for i in thing_ids], list(TEMPLATES),
        crop_labels=labels, segments=segments, segment_classes=[phrase(c["id"]) for c in CATEGORIES],
        evaluate=functools.partial(_evaluate, Path(workdir) / "data", pool.image_size),
        metrics=tuple(SWEEP_METRICS), metric_labels=SWEEP_METRICS,
        training_config=SCHEDULES["short"])


@functools.lru_cache(maxsize=1)
def _held_out(root: Path) -> tuple[Path, ScenePool]:
    return prepare_split(root, EVAL_IMAGES, EVAL_SEED, progress=False), ScenePool.render(EVAL_SEED, EVAL_IMAGES)


def _evaluate(root: Path, image_size: int, model) -> dict:
    """``denserc testbed``'s evaluation (200 held-out scenes, whatever ``--images`` says)."""
    split, pool = _held_out(root)
    return evaluate(model, get_tokenizer(MODEL_NAME), split, pool, image_size)
