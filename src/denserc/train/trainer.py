"""Self-distillation of a CLIP ViT into DenseRC (DESIGN 1.4-1.5), from one CPU to many GPU nodes.

Per optimizer step, on every process:
    images (uint8, loader) -> device, scaled to [0, 1] and normalised with CLIP's mean/std
    grids: one random m x n grid per image, boxes in input pixels (seeded by epoch and image index)
    frozen teacher: embeddings of every grid cell, cropped from the batch tensor with roi_align
    frozen VFM: patch features on the student's patch grid
    DDP(DistillationModule): student dense features -> L_semantics + lambda * L_coherence
Teacher and VFM run under no_grad outside DDP; only the student's image tower and gate train.

Parameter tensors that cannot receive a gradient through ``encode_dense`` (e.g. the last block's
MLP and ln_2 for constructions ``multi-v`` and ``v``) are found with one probe backward pass at
start-up and frozen, so DDP runs with ``find_unused_parameters=False`` (no per-step graph search)
and AdamW's weight decay does not shrink tensors that no loss touches.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import SquareResize, TrainingImages, build_source, sample_grid_boxes
from ..losses import distillation_loss
from ..models import DenseRCModel, create_model, load_state_dict_checked
from ..models.teacher import Teacher
from ..models.vfm import VFM
from .checkpoint import (MARKER, complete_checkpoints, latest_checkpoint, load_checkpoint, remove_stale_staging,
                         save_checkpoint)
from .config import Config, ConfigError, dump_config
from .distributed import DistributedEnv, all_reduce, barrier, broadcast_object, gather_objects
from .metrics import MetricsLogger
from .optim import build_optimizer, warmup_cosine
from .sampler import ResumableDistributedSampler

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LOSS_NAMES = ("loss", "loss_semantics", "loss_coherence")


class DistillationModule(nn.Module):
    """What DDP wraps: the student alone; its forward returns the losses so DDP all-reduces their gradients."""

    def __init__(self, student: DenseRCModel, coherence_weight: float, compile_model: bool = False):
        super().__init__()
        self.student = student
        self.coherence_weight = coherence_weight
        self.encode_dense = torch.compile(student.encode_dense) if compile_model else student.encode_dense

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor], teacher_embeddings: torch.Tensor,
                vfm_patches: torch.Tensor) -> dict[str, torch.Tensor]:
        dense = self.encode_dense(images)
        return distillation_loss(dense, boxes, teacher_embeddings, vfm_patches, self.student.patch_size,
                                 self.coherence_weight)


def freeze_off_path_parameters(model: DenseRCModel) -> list[str]:
    """Freeze trainable parameters that ``encode_dense`` never uses; returns their names."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    side = 2 * model.patch_size
    probe = torch.randn(1, 3, side, side, device=trainable[0][1].device, dtype=trainable[0][1].dtype)
    gradients = torch.autograd.grad(model.encode_dense(probe).sum(), [p for _, p in trainable], allow_unused=True)
    frozen = [name for (name, p), gradient in zip(trainable, gradients) if gradient is None]
    for name, p in trainable:
        if name in frozen:
            p.requires_grad_(False)
    return frozen


class Trainer:
    """Builds data, models, optimizer and schedule from a ``Config``; ``fit`` trains, checkpoints, exports."""

    def __init__(self, config: Config, env: DistributedEnv, output_dir: str | os.PathLike):
        self.config = config
        self.env = env
        self.output_dir = Path(output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        train = config.train
        if train.precision == "fp16" and env.device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA device; use fp32 or bf16 on CPU")
        per_step = train.batch_size * env.world_size
        if train.global_batch_size % per_step:
            raise ConfigError(f"train.global_batch_size={train.global_batch_size} is not a multiple of "
                              f"train.batch_size={train.batch_size} x {env.world_size} processes = {per_step}")
        self.accumulation = train.global_batch_size // per_step
        if env.device.type == "cpu" and train.cpu_threads is not None:
            torch.set_num_threads(train.cpu_threads)  # for this whole process

        source = build_source(config.data)  # first, so a wrong data path fails before any model loads
        self.steps_per_epoch = len(source) // train.global_batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the dataset has {len(source)} images, fewer than one global batch "
                              f"(train.global_batch_size={train.global_batch_size})")
        self.total_steps = self.steps_per_epoch * train.epochs
        self.sampler = ResumableDistributedSampler(
            len(source), self.steps_per_epoch * train.global_batch_size,
            world_size=env.world_size, rank=env.rank, seed=train.seed)

        torch.manual_seed(train.seed)  # identical initial weights on every process
        self.student, self.teacher, self.vfm = self._build_models()
        # padding (aspect "pad") uses the normalisation mean: a zero input after normalisation
        self.dataset = TrainingImages(source, SquareResize(config.data.image_size, config.data.aspect,
                                                           fill=self.student.preprocess_cfg["mean"]),
                                      strict=config.data.strict)
        self.frozen_off_path = freeze_off_path_parameters(self.student)
        self.student.set_grad_checkpointing(config.model.grad_checkpointing)
        self.trainable = [p for p in self.student.parameters() if p.requires_grad]

        module = DistillationModule(self.student, config.loss.coherence_weight, config.model.compile)
        if env.distributed:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            module = DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False,
                                             find_unused_parameters=False)
        self.module = module
        self.embed_crops = torch.compile(self.teacher) if config.model.compile else self.teacher
        self.embed_patches = torch.compile(self.vfm) if config.model.compile else self.vfm

        optim = config.optim
        self.optimizer = build_optimizer(self.student, optim.lr, optim.weight_decay, optim.betas, optim.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, optim.warmup_steps, optim.min_lr / optim.lr))
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=train.precision == "fp16")
        mean = torch.tensor(self.student.preprocess_cfg["mean"], device=env.device).view(1, 3, 1, 1)
        std = torch.tensor(self.student.preprocess_cfg["std"], device=env.device).view(1, 3, 1, 1)
        self.mean, self.std = mean, std

        self.step = 0
        self.epoch = 0
        self.samples_done = 0  # global position inside the current epoch
        self.skipped_images = 0  # unreadable files passed over, all processes, whole run
        self.skipped_local = 0  # ... on this process since the last log

    # --------------------------------------------------------------------------------- set-up
    def _build_models(self) -> tuple[DenseRCModel, Teacher, VFM]:
        model, device = self.config.model, self.env.device
        student = create_model(model.name, model.pretrained, construction=model.construction,
                               gating=model.gating, num_layers=model.num_layers)
        patch = student.patch_size
        if self.config.data.image_size % patch:
            raise ConfigError(f"data.image_size={self.config.data.image_size} is not a multiple of the "
                              f"patch size {patch} of {model.name}")
        teacher = Teacher(student)
        vfm_config = self.config.vfm
        vfm = VFM(vfm_config.name, pretrained=vfm_config.pretrained, weights=vfm_config.weights,
                  model_kwargs=vfm_config.model_kwargs)
        student.requires_grad_(False)
        try:
            for parameter in student.image_tower_parameters(model.unlocked_blocks):
                parameter.requires_grad_(True)
        except ValueError as error:
            raise ConfigError(f"model.unlocked_blocks: {error}") from error
        return student.to(device), teacher.to(device), vfm.to(device)

    # ------------------------------------------------------------------------------- training
    def autocast(self):
        precision = self.config.train.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=AUTOCAST_DTYPES[precision])

    def prepare(self, batch: dict, epoch: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(pixels in [0, 1], normalised images, per-image grid boxes) on the device."""
        data = self.config.data
        pixels = batch["image"].to(self.env.device, non_blocking=True).float().div_(255)
        images = (pixels - self.mean) / self.std
        boxes = sample_grid_boxes(batch["index"], batch["size"], epoch=epoch, seed=self.config.train.seed,
                                  rule=data.grid_rule, max_cells=data.grid_max_cells)
        return pixels, images, [b.to(self.env.device) for b in boxes]

    def train_step(self, micro_batches: list[dict], epoch: int) -> dict[str, torch.Tensor]:
        """Forward/backward over the micro-batches (gradients synchronised on the last) and one update."""
        self.module.train()
        grid = (self.config.data.image_size // self.student.patch_size,) * 2
        totals = {name: torch.zeros((), device=self.env.device) for name in LOSS_NAMES}
        for index, batch in enumerate(micro_batches):
            pixels, images, boxes = self.prepare(batch, epoch)
            with torch.no_grad(), self.autocast():
                targets = self.embed_crops(images, boxes)
                patches = self.embed_patches(pixels, grid)
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not self.env.distributed else self.module.no_sync()
            with sync:
                with self.autocast():
                    losses = self.module(images, boxes, targets, patches)
                self.scaler.scale(losses["loss"] / len(micro_batches)).backward()
            for name in LOSS_NAMES:
                totals[name] += losses[name].detach() / len(micro_batches)
            self.skipped_local += int(batch["skipped"].sum())
        self.scaler.unscale_(self.optimizer)
        if self.config.optim.clip_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.config.optim.clip_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None])
        totals["grad_norm"] = grad_norm.detach()
        totals["lr"] = torch.tensor(self.scheduler.get_last_lr()[0], device=self.env.device)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return totals

    def fit(self, resume_from: str | os.PathLike | None = None) -> Path:
        """Train to the end of the schedule (from a checkpoint if given) and export the student."""
        if resume_from is not None:
            self.load(resume_from)
        train = self.config.train
        if self.env.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(dump_config(self.config), encoding="utf-8")
            remove_stale_staging(self.checkpoint_dir)
            self._describe()
        metrics = MetricsLogger(self.output_dir, start_step=self.step) if self.env.is_main else None
        progress = tqdm(total=self.total_steps, initial=self.step, desc="denserc train", unit="step",
                        disable=not self.env.is_main, dynamic_ncols=True)
        window = _Window(self.env.device)
        try:
            for epoch in range(self.epoch, train.epochs):
                self.sampler.set_epoch(epoch, self.samples_done)
                micro_batches = []
                for batch in self.loader():
                    micro_batches.append(batch)
                    if len(micro_batches) < self.accumulation:
                        continue
                    window.add(self.train_step(micro_batches, epoch))
                    micro_batches = []
                    self.step += 1
                    self.samples_done += train.global_batch_size
                    progress.update(1)
                    if self.step % train.log_every == 0 or self.step == self.total_steps:
                        self._log(window, metrics, progress, epoch)
                    if self.step % train.checkpoint_every == 0:
                        self.save()
                self.epoch, self.samples_done = epoch + 1, 0
                self.save()
        finally:
            progress.close()
            if metrics is not None:
                metrics.close()
        return self.export()

    def loader(self) -> DataLoader:
        """Batches of this process for the sampler's current epoch and start position."""
        data = self.config.data
        return DataLoader(self.dataset, batch_size=self.config.train.batch_size, sampler=self.sampler,
                          num_workers=data.num_workers, pin_memory=self.env.device.type == "cuda",
                          drop_last=True)

    def _log(self, window: "_Window", metrics: MetricsLogger | None, progress: tqdm, epoch: int) -> None:
        skipped = torch.tensor(float(self.skipped_local), device=self.env.device)
        self.skipped_local = 0
        self.skipped_images += int(all_reduce(skipped, op="sum").item())
        values = window.reduce(self.config.train.global_batch_size)
        values.update(epoch=epoch, skipped_images=self.skipped_images)
        if metrics is not None:
            metrics.log(self.step, values)
            progress.set_postfix(sem=f"{values['loss_semantics']:.4f}", coh=f"{values['loss_coherence']:.4f}")

    def _describe(self) -> None:
        train = self.config.train
        logger.info("training %s (%s, %s) on %d process(es) x %s: %d images, %d steps/epoch x %d epochs, "
                    "global batch %d = %d x %d processes x %d accumulation", self.config.model.name,
                    self.config.model.construction, self.config.model.gating, self.env.world_size,
                    self.env.device.type, len(self.dataset), self.steps_per_epoch, train.epochs,
                    train.global_batch_size, train.batch_size, self.env.world_size, self.accumulation)
        if self.frozen_off_path:
            logger.info("froze %d parameter tensor(s) that encode_dense never uses: %s",
                        len(self.frozen_off_path), ", ".join(self.frozen_off_path))

    # ---------------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "samples_done": self.samples_done,
                "global_batch_size": self.config.train.global_batch_size, "skipped_images": self.skipped_images,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": gather_objects(_rng_state()),
                "config": self.config.to_dict()}

    def save(self) -> None:
        """Checkpoint the current step (main process writes; all processes take part in gathering RNG)."""
        state = self.state()
        if self.env.is_main:
            save_checkpoint(self.checkpoint_dir, self.step, self.student.state_dict(), state,
                            {"epoch": self.epoch, "samples_done": self.samples_done},
                            keep_last=self.config.train.keep_last)
        barrier()

    def load(self, path: str | os.PathLike) -> None:
        """Restore student, optimizer, scheduler, scaler, position in the run and RNG from a checkpoint."""
        weights, state = load_checkpoint(path)
        if state["global_batch_size"] != self.config.train.global_batch_size:
            raise ConfigError(f"{path} was trained with train.global_batch_size={state['global_batch_size']}; "
                              f"resume with the same value (got {self.config.train.global_batch_size})")
        load_state_dict_checked(self.student, weights, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.samples_done = state["step"], state["epoch"], state["samples_done"]
        self.skipped_images = state["skipped_images"]
        changed = _changed_keys(state["config"], self.config.to_dict())
        if changed and self.env.is_main:
            logger.warning("resuming with settings that differ from the checkpoint's: %s", ", ".join(changed))
        if len(state["rng"]) == self.env.world_size:
            _set_rng_state(state["rng"][self.env.rank])
        else:
            logger.warning("%s was written by %d processes, this run has %d: random generators are not "
                           "restored (training randomness does not depend on them)", path, len(state["rng"]),
                           self.env.world_size)
        if self.env.is_main:
            logger.info("resumed from %s at step %d (epoch %d, %d samples into it)", path, self.step,
                        self.epoch, self.samples_done)

    # --------------------------------------------------------------------------------- export
    def export(self) -> Path:
        """Write the student as ``model.save()`` output (an open_clip ``local-dir:`` folder) to output/final.

        With ``export.alpha < 1`` the image tower is ``alpha * student + (1 - alpha) * teacher``.
        ``final/open_clip_model.safetensors`` loads with ``open_clip.create_model(name, pretrained=path)``;
        its text tower is the teacher's, which training never changes.
        """
        final = self.output_dir / "final"
        if self.env.is_main:
            model = self.student
            alpha = self.config.export.alpha
            if alpha < 1.0:
                model = copy.deepcopy(self.student)
                teacher = dict(self.teacher.visual.named_parameters())
                with torch.no_grad():
                    for name, parameter in model.visual.named_parameters():
                        parameter.lerp_(teacher[name].to(parameter.dtype), 1.0 - alpha)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".final.", dir=self.output_dir))
            model.save(staging)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            logger.info("exported the student to %s: denserc.load(%r) or open_clip.create_model(%r)",
                        final, str(final), f"local-dir:{final}")
        barrier()
        return final


class _Window:
    """Sums of step metrics since the last log, reduced over processes when logged."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0) + value.float()
        self.steps += 1

    def reduce(self, global_batch_size: int) -> dict[str, float]:
        names = sorted(self.sums)
        means = all_reduce(torch.stack([self.sums[n] for n in names]) / self.steps, op="mean").tolist()
        elapsed = time.perf_counter() - self.started
        values = dict(zip(names, means))
        values["images_per_second"] = self.steps * global_batch_size / elapsed
        self.sums, self.steps, self.started = {}, 0, time.perf_counter()
        return values


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts, as 'key: old -> new'."""
    changed = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            changed += _changed_keys(before, after, f"{prefix}{key}.")
        elif before != after:
            changed.append(f"{prefix}{key}: {before!r} -> {after!r}")
    return changed


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _catching(function):
    """``function()``, or the exception it raised (so rank 0 can hand its error to every process)."""
    try:
        return function()
    except Exception as error:  # noqa: BLE001 - re-raised on every process by the caller
        return error


def resume_checkpoint(output_dir: str | os.PathLike, resume: str | None, env: DistributedEnv) -> Path | None:
    """The checkpoint to start from: ``auto`` (the newest, if any), a folder, or None (a fresh run).

    Rank 0 decides and tells the others; a fresh run refuses a folder that already has checkpoints.
    """
    checkpoint_dir = Path(output_dir) / "checkpoints"

    def choose() -> str | None:
        if resume is None:
            existing = complete_checkpoints(checkpoint_dir)
            if existing:
                raise ConfigError(f"{output_dir} already has checkpoints (newest: step {existing[-1][0]}); "
                                  "continue that run with --resume auto, or start another one with "
                                  f"train.output_dir=NEW_DIR (or delete {output_dir})")
            return None
        if resume == "auto":
            found = latest_checkpoint(checkpoint_dir)
            if found is None:
                logger.info("--resume auto: no checkpoint in %s, starting from scratch", checkpoint_dir)
            return None if found is None else str(found)
        if not (Path(resume) / MARKER).is_file():
            raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (expected "
                                    f"{checkpoint_dir}/step_N or --resume auto)")
        return resume

    chosen = broadcast_object(_catching(choose) if env.is_main else None)
    if isinstance(chosen, BaseException):
        raise chosen
    if chosen is not None and not Path(chosen).is_dir():
        raise FileNotFoundError(f"checkpoint {chosen} is not visible on process {env.rank}: "
                                "train.output_dir must be on a filesystem shared by all nodes")
    return None if chosen is None else Path(chosen)


def train(config: Config, env: DistributedEnv, output_dir: str | os.PathLike, resume: str | None = None) -> Path:
    """Pick the checkpoint to resume from, build a trainer, train and export; returns the export folder."""
    checkpoint = resume_checkpoint(output_dir, resume, env)
    return Trainer(config, env, output_dir).fit(checkpoint)
