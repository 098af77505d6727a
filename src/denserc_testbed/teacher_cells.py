"""``denserc testbed-teacher``: what the distillation teacher names on the cells it is asked about.

L_semantics pulls the student's features pooled over each grid cell toward the teacher's embedding
of that cell's crop. If the teacher names the stuff around an object on cells that hold the object,
the student learns to let the stuff win inside the object's box, which is what thing boxes show
after distillation on the testbed (docs/testbed.md). This measures the teacher directly:

1. **training cells**: the grid cells the short schedule distils in its first epoch (the same
   scenes, ``RegionDraw`` draws and letterboxed crops as ``denserc train``'s ``testbed`` config), each classified
   zero-shot among the 53 classes with the evaluation's class queries; per bin of the largest
   object's share of the cell, the share of cells named as a stuff class, as that object, or as
   another thing, beside what the pretraining caption of the same box names (``ScenePool.region_caption``);
2. **held-out thing boxes**: the teacher's embedding of each object's own box (the evaluation's
   thing boxes), classified the same way, beside the student's dense answer on them
   (``denserc testbed-probe``).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from denserc.data import RegionDraw
from denserc.models import get_tokenizer, normalize_images
from denserc.train import load_config
from denserc.train.teacher import Teacher

from .crops import REGION_SHARE, REGION_THING_INSIDE, ScenePool
from .probe import load_testbed_model
from .settings import EVAL_IMAGES, EVAL_SEED
from .tiny_clip import MODEL_NAME
from .vocabulary import CATEGORIES
from .zero_shot import class_embeddings

SHARE_BINS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)  # the largest object's share of a cell's pixels
TRAINING_SCENES = 512  # the first scenes of the default run
COSINE = "student-teacher cosine"
IS_THING = np.array([bool(c["isthing"]) for c in CATEGORIES])


class RegionEmbedder:
    """L2-normalised embeddings of regions, as the teacher or a student sees them.

    The teacher embeds each box's letterboxed crop (what L_semantics distils toward); a student pools
    its dense features over the box (``encode_regions``, what L_semantics trains and the thing-box
    evaluation scores).
    """

    def __init__(self, model, teacher: bool):
        self.model = model.eval()
        self.embed = Teacher(model) if teacher else model.encode_regions

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        pixels = normalize_images(images.float() / 255, self.model.preprocess_cfg, white=1.0)
        return self.embed(pixels, boxes).float()


def cell_contents(pool: ScenePool, scene: int, box) -> tuple[int, float, float]:
    """(category id of the object with most pixels in the cell or 0, its share of the cell, its share
    of its own pixels inside) for an integer box."""
    x1, y1, x2, y2 = box
    parts = pool.segment_parts[scene]
    inside = np.bincount(pool.segment_maps[scene, y1:y2, x1:x2].ravel(), minlength=len(parts))
    best, best_count, best_area = 0, 0, 1
    for (category_id, area), count in zip(parts, inside):
        if IS_THING[category_id - 1] and count > best_count:
            best, best_count, best_area = category_id, int(count), area
    return best, best_count / max(int(inside.sum()), 1), best_count / best_area


def caption_names_object(share: float, inside: float) -> bool:
    """Whether the pretraining caption of the box names the object (``ScenePool.region_caption``'s rule)."""
    return share >= REGION_SHARE or inside >= REGION_THING_INSIDE


def training_cells(embedders: dict[str, RegionEmbedder], classes: torch.Tensor, scenes: int, batch: int = 32
                   ) -> dict:
    """Per share bin: cells, % whose caption names the object, per embedder % named stuff / the object,
    and (with a student) the mean cosine between the student's and the teacher's embeddings."""
    config = load_config("testbed")  # the default run's scenes and grid draws
    data = config.data
    draw = RegionDraw(config.train.seed, data.grid_rule, data.grid_max_cells, data.grid_max_boxes)
    pool = ScenePool.render(data.seed, scenes)
    size = pool.image_size
    rows = []  # (share, inside, object id, {embedder: named id}, student-teacher cosine or None)
    for start in range(0, scenes, batch):
        indices = list(range(start, min(start + batch, scenes)))
        boxes, _ = draw(indices, [(size, size)] * len(indices), epoch=0)
        embedded = {name: embed(pool.images[indices], boxes) for name, embed in embedders.items()}
        named = {name: (vectors @ classes.T).argmax(1).add(1).tolist() for name, vectors in embedded.items()}
        cosines = ((embedded["student"] * embedded["teacher"]).sum(1).tolist() if "student" in embedded
                   else [None] * len(named["teacher"]))
        cells = [(scene, cell) for scene, cells in zip(indices, boxes) for cell in cells.round().long().tolist()]
        for number, (scene, cell) in enumerate(cells):
            thing, share, inside = cell_contents(pool, scene, cell)
            if thing:
                rows.append((share, inside, thing, {name: ids[number] for name, ids in named.items()},
                             cosines[number]))
    table = []
    for low, high in zip(SHARE_BINS[:-1], SHARE_BINS[1:]):
        group = [r for r in rows if low < r[0] <= high]
        if group:
            row = {"share": f"{100 * low:.0f}-{100 * high:.0f} %", "cells": len(group),
                   "caption names the object": _percent(caption_names_object(s, i) for s, i, *_ in group)}
            for name in embedders:
                row[f"{name}: stuff"] = _percent(not IS_THING[n[name] - 1] for _, _, _, n, _ in group)
                row[f"{name}: the object"] = _percent(n[name] == thing for _, _, thing, n, _ in group)
            if "student" in embedders:
                row[COSINE] = sum(r[4] for r in group) / len(group)
            table.append(row)
    return {"scenes": scenes, "seed": data.seed, "cells_with_an_object": len(rows), "bins": table}


def held_out_thing_boxes(embedders: dict[str, RegionEmbedder], classes: torch.Tensor, scenes: int) -> dict:
    """Per embedder, % of the held-out objects' own boxes (the evaluation's thing boxes) named stuff / the object."""
    pool = ScenePool.render(EVAL_SEED, scenes)
    things = pool.regions[IS_THING[pool.regions[:, 1].long().numpy() - 1]]
    labels = things[:, 1].long()
    result = {"boxes": len(labels)}
    for name, embed in embedders.items():
        named = torch.cat([(embed(pool.images[chunk[:, 0].long()], list(chunk[:, None, 2:])) @ classes.T).argmax(1) + 1
                           for chunk in things.split(256)])
        result[f"{name}: stuff"] = _percent(~torch.from_numpy(IS_THING)[named - 1])
        result[f"{name}: the object"] = _percent(named == labels)
    return result


def _percent(flags) -> float:
    flags = [bool(flag) for flag in flags]
    return 100 * sum(flags) / len(flags)


def measure(teacher: str = "testbed", student: str | None = None, scenes: int = TRAINING_SCENES,
            eval_images: int = EVAL_IMAGES) -> dict:
    """The teacher's (and, given a distilled folder, the student's) answers on training cells and thing boxes."""
    teacher_model = load_testbed_model(teacher)
    classes = class_embeddings(teacher_model, get_tokenizer(MODEL_NAME), [c["id"] for c in CATEGORIES])
    embedders = {"teacher": RegionEmbedder(teacher_model, teacher=True)}
    if student is not None:
        embedders["student"] = RegionEmbedder(load_testbed_model(student), teacher=False)
    return {"teacher": teacher, "student": student, "training_cells": training_cells(embedders, classes, scenes),
            "held_out_thing_boxes": held_out_thing_boxes(embedders, classes, eval_images)}


def format_report(result: dict) -> str:
    cells, boxes = result["training_cells"], result["held_out_thing_boxes"]
    embedders = ["teacher"] + (["student"] if result["student"] else [])
    columns = ["caption names the object"] + [f"{n}: {what}" for n in embedders for what in ("stuff", "the object")]
    columns += [COSINE] if result["student"] else []
    title = f"teacher {result['teacher']}" + (f", student {result['student']}" if result["student"] else "")
    lines = [f"### {title}", "", "Percent of cells (of boxes) named as a stuff class or as the object.", "",
             "| object's share of the cell | cells | " + " | ".join(columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    lines += [f"| {r['share']} | {r['cells']} | " + " | ".join(_cell(c, r[c]) for c in columns) + " |"
              for r in cells["bins"]]
    lines.append(f"| held-out thing boxes | {boxes['boxes']} | | "
                 + " | ".join(_cell(c, boxes[c]) if c in boxes else "" for c in columns[1:]) + " |")
    lines += ["", f"{cells['cells_with_an_object']} first-epoch grid cells holding part of an object, "
                  f"{cells['scenes']} training scenes (seed {cells['seed']}).", ""]
    return "\n".join(lines)


def _cell(column: str, value: float) -> str:
    """Percentages with one decimal, the cosine with three."""
    return f"{value:.3f}" if column == COSINE else f"{value:.1f}"


def _main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    print(format_report(measure(args.teacher, args.student, args.scenes)))
    return 0
