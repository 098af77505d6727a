"""Self-distillation of a CLIP ViT into DenseRC (docs/method.md#losses, #recipe) as a task on the engine.

Per micro-batch, on every process (the engine does accumulation, DDP, autocast, the optimizer, checkpoints):
    images (uint8, loader) -> device, scaled to [0, 1] and normalised with CLIP's mean/std
    grids: one random m x n grid per image, boxes in input pixels (seeded by epoch and image index)
    frozen teacher: embeddings of every grid cell, cropped from the batch tensor with roi_align
        (data.teacher_crops: batch) or, as the peers, by the loader from the source image (source)
    frozen VFM: patch features on the student's patch grid (not built, not run when lambda = 0)
    DDP(DistillationModule): student dense features -> L_semantics + lambda * L_coherence
Teacher and VFM run under no_grad outside DDP; only the student's image blocks and gate train (the stem,
``ln_post``, ``proj`` and the text tower stay frozen unless ``model.train_stem_and_head``).

Parameter tensors that cannot receive a gradient through ``encode_dense`` (e.g. the last block's
MLP and ln_2 for constructions ``multi-v`` and ``v``) are found with one probe backward pass at
start-up and frozen, so DDP runs with ``find_unused_parameters=False`` (no per-step graph search)
and AdamW's weight decay does not shrink tensors that no loss touches.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import default_collate

from ..data import (ProposalSource, RegionDraw, SourceCrops, SquareResize, TrainingImages, build_source,
                    collate_regions)
from ..distributed import DistributedEnv
from ..engine.config import ConfigError
from ..engine.loop import Task
from ..engine.optim import parameter_groups
from ..losses import distillation_loss
from ..models import DenseRCModel, create_model, load_state_dict_checked, normalize_images
from .config import Config
from .teacher import Teacher
from .vfm import VFM

logger = logging.getLogger(__name__)


class DistillationModule(nn.Module):
    """What DDP wraps: the student alone; its forward returns the losses so DDP all-reduces their gradients."""

    def __init__(self, student: DenseRCModel, coherence_weight: float, coherence_form: str = "declip",
                 compile_model: bool = False, coherence_features: str = "dense"):
        super().__init__()
        self.student = student
        self.coherence_weight = coherence_weight
        self.coherence_form = coherence_form
        # DeCLIP's two streams need the last block's queries from the same pass; one stream, the dense features
        self.two_streams = coherence_features == "queries" and coherence_weight != 0
        encode = student.encode_dense_with_queries if self.two_streams else student.encode_dense
        self.encode = torch.compile(encode) if compile_model else encode

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor], teacher_embeddings: torch.Tensor,
                vfm_patches: torch.Tensor | None, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        dense, context = self.encode(images) if self.two_streams else (self.encode(images), None)
        return distillation_loss(dense, boxes, teacher_embeddings, vfm_patches, self.student.patch_size,
                                 self.coherence_weight, self.coherence_form, valid, coherence_features=context)


def freeze_off_path_parameters(model: DenseRCModel, with_queries: bool = False) -> list[str]:
    """Freeze trainable parameters that ``encode_dense`` (and, ``with_queries``, the last block's queries of
    DeCLIP's context stream) never uses; returns their names."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    side = 2 * model.patch_size
    probe = torch.randn(1, 3, side, side, device=trainable[0][1].device, dtype=trainable[0][1].dtype)
    outputs = model.encode_dense_with_queries(probe) if with_queries else (model.encode_dense(probe),)
    gradients = torch.autograd.grad(sum(output.sum() for output in outputs), [p for _, p in trainable],
                                    allow_unused=True)
    frozen = [name for (name, p), gradient in zip(trainable, gradients) if gradient is None]
    for name, p in trainable:
        if name in frozen:
            p.requires_grad_(False)
    return frozen


def blend_with_teacher(student: DenseRCModel, teacher: Teacher, alpha: float) -> DenseRCModel:
    """The student with its image tower at ``alpha * student + (1 - alpha) * teacher`` (a copy unless alpha = 1).

    The gate and the text tower stay the student's.
    """
    if alpha == 1.0:
        return student
    model = copy.deepcopy(student)
    teacher_parameters = dict(teacher.visual.named_parameters())
    with torch.no_grad():
        for name, parameter in model.visual.named_parameters():
            parameter.lerp_(teacher_parameters[name].to(parameter.dtype), 1.0 - alpha)
    return model


class DistillationTask(Task):
    """Student, frozen teacher and VFM built from a ``Config``; the engine trains ``DistillationModule``.

    With ``loss.coherence_weight`` 0 the VFM is neither built nor run (``vfm`` is None) and L_coherence is
    not computed (they were +17% of a ViT-B CPU step for nothing; issue 17).

    ``data.teacher_crops: source``: the loader draws each image's regions (``data.regions.RegionDraw``, the
    same draw as ``batch`` mode's, so it is handed ``(epoch, index)`` keys: ``keys_with_epoch``) and cuts the
    teacher's crops from the source image (``SourceCrops``); ``prepare`` normalises them and hands them to
    ``Teacher.embed``.
    """

    weights_file = "student.safetensors"
    progress_fields = {"sem": "loss_semantics", "coh": "loss_coherence"}

    def __init__(self, config: Config, env: DistributedEnv):
        self.config = config
        self.device = env.device
        source = build_source(config.data)  # first, so a wrong data path fails before any model loads
        # a source with region proposals replaces the grids (CLIPSelf's region-proposal recipe)
        self.proposals = source if isinstance(source, ProposalSource) else None
        torch.manual_seed(config.train.seed)  # identical initial weights on every process
        self.student, self.teacher, self.vfm = self._build_models()
        data = config.data
        self.regions = RegionDraw(config.train.seed, data.grid_rule, data.grid_max_cells, data.grid_max_boxes,
                                  self.proposals)
        self.source_crops = data.teacher_crops == "source"
        self.keys_with_epoch = self.source_crops  # the loader draws the regions: it needs the epoch
        crops = SourceCrops(self.regions, self.teacher.native_size) if self.source_crops else None
        self.dataset = TrainingImages(source, SquareResize(data.image_size, data.aspect), strict=data.strict,
                                      crops=crops)
        self.num_workers = config.data.num_workers
        if self.vfm is None:
            self.progress_fields = {"sem": "loss_semantics"}
        self.module = DistillationModule(self.student, config.loss.coherence_weight, config.loss.coherence_form,
                                         config.model.compile, config.loss.coherence_features)
        self.frozen_off_path = freeze_off_path_parameters(self.student, self.module.two_streams)
        if self.frozen_off_path and env.is_main:
            logger.info("froze %d parameter tensor(s) that no loss reaches: %s",
                        len(self.frozen_off_path), ", ".join(self.frozen_off_path))
        self.student.set_grad_checkpointing(config.model.grad_checkpointing)
        if self.source_crops:
            self.embed_ready = torch.compile(self.teacher.embed) if config.model.compile else self.teacher.embed
            self.embed_crops = self._embed_ready_crops
        else:
            self.embed_crops = torch.compile(self.teacher) if config.model.compile else self.teacher
        # a module-level function, not a method: a loader worker started by spawn pickles it, not the task
        self.collate = collate_regions if self.source_crops else default_collate
        self.embed_patches = torch.compile(self.vfm) if config.model.compile and self.vfm else self.vfm

    def _build_models(self) -> tuple[DenseRCModel, Teacher, VFM | None]:
        model, device = self.config.model, self.device
        student = create_model(model.name, model.pretrained, construction=model.construction,
                               gating=model.gating, num_layers=model.num_layers)
        patch = student.patch_size
        if self.config.data.image_size % patch:
            raise ConfigError(f"data.image_size={self.config.data.image_size} is not a multiple of the "
                              f"patch size {patch} of {model.name}")
        teacher = Teacher(student)
        vfm = None
        if self.config.loss.coherence_weight != 0:
            vfm_config = self.config.vfm
            vfm = VFM(vfm_config.name, pretrained=vfm_config.pretrained, weights=vfm_config.weights,
                      model_kwargs=vfm_config.model_kwargs).to(device)
        student.requires_grad_(False)
        try:
            for parameter in student.image_tower_parameters(model.unlocked_blocks,
                                                             whole_tower=model.train_stem_and_head):
                parameter.requires_grad_(True)
        except ValueError as error:
            raise ConfigError(f"model.unlocked_blocks: {error}") from error
        return student.to(device), teacher.to(device), vfm

    def images_and_grids(self, batch: dict, epoch: int
                         ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor] | torch.Tensor]:
        """(pixels in [0, 1], normalised images, per-image student boxes, the teacher's crops) on the device.

        The teacher's crops: with ``data.teacher_crops: batch`` per-image boxes to cut from ``images`` (grid
        cells are both; a proposal's teacher crop is the proposal enlarged 1.5x, ``data/proposals.py``); with
        ``source`` the loader's crops of every region of every image, (sum K, 3, *native size), normalised
        as the peers' ToTensor + Normalize do.
        """
        pixels = batch["image"].to(self.device, non_blocking=True).float().div_(255)
        images = normalize_images(pixels, self.student.preprocess_cfg, white=1.0)
        if self.source_crops:
            boxes = batch["boxes"]
            crops = normalize_images(torch.cat(batch["crops"]).to(self.device, non_blocking=True),
                                     self.student.preprocess_cfg)
        else:
            boxes, crops = self.regions(batch["index"], batch["size"], epoch)
            crops = [c.to(self.device) for c in crops]
        return pixels, images, [b.to(self.device) for b in boxes], crops

    def _embed_ready_crops(self, images: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
        """``embed_crops`` of ``data.teacher_crops: source``: the crops are ready, the batch is not needed."""
        return self.embed_ready(crops)

    def prepare(self, batch: dict, epoch: int) -> dict:
        """Images, regions and the frozen targets: teacher embeddings of every region, VFM patch features (or None)."""
        pixels, images, boxes, crops = self.images_and_grids(batch, epoch)
        grid = (self.config.data.image_size // self.student.patch_size,) * 2
        teacher_embeddings = self.embed_crops(images, crops)
        vfm_patches = self.embed_patches(pixels, grid) if self.vfm is not None else None
        return {"images": images, "boxes": boxes, "teacher_embeddings": teacher_embeddings,
                "vfm_patches": vfm_patches, "valid": batch["valid"].to(self.device, non_blocking=True)}

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """The student's trainable tensors; ``gate.*`` joins the no-decay group."""
        return parameter_groups(self.student.named_parameters(), weight_decay, no_decay_prefixes=("gate.",))

    def weights(self) -> dict[str, torch.Tensor]:
        return self.student.state_dict()

    def load_weights(self, weights: dict[str, torch.Tensor], source) -> None:
        load_state_dict_checked(self.student, weights, source)

    def count(self, batch: dict) -> dict[str, int]:
        return {"skipped_images": int(batch["skipped"].sum())}

    def export(self, folder: Path) -> None:
        """``model.save()`` output (an open_clip ``local-dir:`` folder), image tower averaged per ``export.alpha``.

        ``open_clip_model.safetensors`` loads with ``open_clip.create_model(name, pretrained=path)``;
        its text tower is the teacher's, which training never changes.
        """
        blend_with_teacher(self.student, self.teacher, self.config.export.alpha).save(folder)

    def describe(self) -> str:
        model = self.config.model
        return f"{model.name} ({model.construction}, {model.gating})"
