"""Where L_semantics sends its gradient: per patch, for each dense-construction variant (the paper's Fig. 3).

For each image: the training grid (``sample_grid_boxes``, CLIPSelf's rule), the teacher's embeddings of the
letterboxed cells (``denserc.train.teacher.Teacher``), L_semantics of the variant's dense features (``semantics_loss``, the image's
own mean over its cells), and its gradient with respect to the tokens the variant's construction reads: the
inputs of its value blocks, cut from the trunk (``DenseRCModel.dense_from_block_inputs``), so that a token's
gradient measures what the construction alone does with it. A patch's value is the norm of its gradient over
every value block and channel. Spatial aggregation (qk, qq) sends a patch the gradient of every patch that
attends to it; the value-path variants keep each patch's gradient its own.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from ..data import sample_grid_boxes
from ..losses import semantics_loss
from ..models import normalize_images
from ..train.teacher import Teacher
from .stats import concentration
from .variants import GRADIENT_VARIANTS, same_weights


def patch_gradients(model, teacher: Teacher, pixels: torch.Tensor, index: int, *, seed: int = 0,
                    rule: str = "clipself", max_cells: int = 6, max_boxes: int = 20) -> torch.Tensor:
    """(N,) per-patch gradient norms of one image's L_semantics (``pixels``: (3, S, S) in [0, 1])."""
    images = normalize_images(pixels[None], model.preprocess_cfg, white=1.0)
    size = torch.tensor([pixels.shape[-2:]])
    boxes = sample_grid_boxes([index], size, epoch=0, seed=seed, rule=rule, max_cells=max_cells,
                              max_boxes=max_boxes)
    targets = teacher(images, boxes)
    first = model.depth - model.num_layers
    with torch.no_grad():
        states, rope, grid = model.block_inputs(images)
    inputs = [state.detach().requires_grad_(True) for state in states[first:model.depth]]
    loss = semantics_loss(model.dense_from_block_inputs(inputs, grid, rope), boxes, targets, model.patch_size)
    gradients = torch.autograd.grad(loss, inputs)
    prefix = model.tower.num_prefix_tokens
    return torch.stack([g[0, prefix:].square().sum(-1) for g in gradients]).sum(0).sqrt()


def gradient_analysis(model, teacher_model, images: torch.Tensor, variants, *, seed: int = 0, rule: str = "clipself",
                      max_cells: int = 6, max_boxes: int = 20, progress: bool = True) -> dict:
    """Per variant: the per-patch gradient norms (images, N) and their concentration statistics."""
    unknown = [name for name in variants if name not in GRADIENT_VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(GRADIENT_VARIANTS)}")
    teacher = Teacher(teacher_model)
    results = {}
    for name in variants:
        variant = same_weights(model, *GRADIENT_VARIANTS[name])
        variant.requires_grad_(False)
        norms = torch.stack([patch_gradients(variant, teacher, image, index, seed=seed, rule=rule,
                                             max_cells=max_cells, max_boxes=max_boxes)
                             for index, image in enumerate(tqdm(images, desc=f"gradients {name}", disable=not progress))])
        results[name] = {"construction": variant.construction, "gating": variant.gating,
                         "num_layers": variant.num_layers, **concentration(norms), "per_patch": norms}
    return results
