"""The training engine: everything about *how* to train, for any task that says *what* to train.

The engine owns the run: processes and device (``denserc/distributed.py``), the resumable sampler,
gradient accumulation up to ``train.global_batch_size``, autocast (fp32 / bf16 / fp16 with a
GradScaler), DistributedDataParallel, AdamW with warm-up + cosine, optional gradient clipping,
checkpoints (atomic, keep-last-k, exact resume: weights, optimizer, scheduler, scaler, step, epoch,
position in the epoch, RNG), metrics (``metrics.jsonl``, TensorBoard), a tqdm bar on rank 0 and the
atomic export of the result. Self-distillation (``train/trainer.py``) is one task on it; a detector or
a segmenter is another.

How a task plugs in
-------------------
Subclass ``Task``; set ``module`` and ``dataset`` in ``__init__``, override what differs::

    class RegressionTask(Task):
        def __init__(self, config, env):
            torch.manual_seed(config.train.seed)          # the task makes the initial weights: seed first
            self.module = Regressor().to(env.device)     # forward(**inputs) -> {"loss": ..., other terms}
            self.dataset = PointDataset(...)             # map-style; the engine's sampler picks indices
            self.device = env.device

        def prepare(self, batch, epoch):                 # runs under no_grad + autocast, outside DDP
            return {"x": batch["x"].to(self.device), "targets": [t.to(self.device) for t in batch["targets"]]}

        def export(self, folder):                        # the deliverable, written into an empty folder
            save_tensors(self.module.state_dict(), folder / "regressor.safetensors")

    engine = Engine(RegressionTask(config, env), config, env, output_dir)
    final = engine.fit(resume_checkpoint(output_dir, resume, env))   # resume: None, "auto" or a folder

``config`` is any dataclass with a ``train`` section (``TrainConfig``) and an ``optim`` section
(``OptimConfig``); the engine reads only those two, writes the whole config to ``config.yaml`` and,
on resume, warns about every key that differs from the checkpoint's.

What the task supplies (attributes and methods of ``Task``):

- ``module``: the ``nn.Module`` that trains. Its forward takes the keyword arguments ``prepare``
  returns and returns a dict of scalar tensors: ``"loss"`` is minimised, every entry is logged
  (averaged over the logging window and over processes). Losses are computed inside this forward so
  that DDP, which wraps it, all-reduces their gradients. Its parameters with ``requires_grad`` are the
  ones that train: freeze everything else before handing the task over; DDP runs with
  ``find_unused_parameters=False``, so every trainable parameter must receive a gradient each step.
- ``dataset`` and ``collate(samples)``: samples of one process's micro-batch and how they are joined
  (default ``default_collate``). A batch may hold anything, e.g. per-image lists of boxes and labels of
  different lengths; only the task looks inside it. A dataset whose samples depend on the epoch (random
  draws made in the loader) sets the task's ``keys_with_epoch``: the sampler then deals ``(epoch, index)``
  pairs, which reach every loader worker with the index (``engine/sampler.py``).
- ``prepare(batch, epoch)``: the batch on the device as the module's keyword arguments. It runs
  under ``torch.no_grad()`` and autocast, outside DDP: the place for frozen models whose outputs are
  targets or inputs (a teacher, a frozen backbone). Randomness should come from generators seeded by
  (seed, epoch, sample index), so that it does not depend on the number of processes.
- ``parameter_groups(weight_decay)``: AdamW groups (default: no decay on biases, norms, 1-D tensors).
- ``weights()`` / ``load_weights(weights, source)``: what a checkpoint stores (default: the module's
  state dict), saved as ``weights_file`` in the checkpoint folder.
- ``export(folder)``: writes the result into ``folder``; rank 0 calls it with an empty temporary
  folder that the engine renames to ``output_dir/final`` once complete.
- ``count(batch)``: integer counters of one micro-batch (e.g. unreadable images skipped), summed over
  processes and the whole run, logged and checkpointed; always the same names.
- ``num_workers``, ``progress_fields`` (tqdm postfix: short label -> logged name), ``describe()``.

Per optimizer step the engine takes ``accumulation`` micro-batches of ``train.batch_size`` samples
on every process (``global_batch_size = batch_size x processes x accumulation``), runs ``prepare``
and the module on each, scales each loss by ``1 / accumulation`` and synchronises gradients only on
the last micro-batch, then clips (if ``optim.clip_grad_norm``), steps AdamW and the schedule. Metrics
are averaged over the steps since the last record, except ``grad_norm``: the norm at the logged step.

Before the update every term the module returned is checked over all processes (one small all-reduce
per step): if one is NaN or infinite on any process, ``train.on_nonfinite: stop`` (the default) raises
``NonFiniteLossError`` naming the step and the terms, before the optimizer or a checkpoint sees that
step; ``skip`` drops the step's gradients instead and puts the module's buffers (BatchNorm statistics)
back as they were before it (no update; the schedule and the data move on, as with a GradScaler's
skipped steps), leaves its losses out of the metrics and counts it as ``nonfinite_skipped``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from ..io import save_tensors
from ..models import load_state_dict_checked, precision_dtype
from .checkpoint import (WEIGHTS, load_checkpoint, remove_stale_staging, rng_state, save_checkpoint,
                         set_rng_state, space_shortage, tensor_bytes)
from .config import ConfigError, accumulation_steps, changed_keys, check_training, dump_config
from ..distributed import DistributedEnv, all_reduce, barrier, gather_objects
from .metrics import MetricsLogger, MetricsWindow
from .optim import parameter_groups, warmup_cosine
from .sampler import ResumableDistributedSampler

logger = logging.getLogger(__name__)

NONFINITE_COUNT = "nonfinite_skipped"  # the metric counting steps skipped under train.on_nonfinite=skip


class NonFiniteLossError(RuntimeError):
    """A loss term went NaN or infinite under ``train.on_nonfinite: stop``; nothing was updated from that step."""


def restarts_share_the_rendezvous_store() -> bool:
    """Whether torchrun may restart this group (``--max-restarts`` > 0) and its workers use the agent's store.

    That store outlives a failed group, and the restarted one reads the old group's addresses from it.
    """
    return (os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0"
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


class Task:
    """What to train; see the module docstring. Subclasses set ``module`` and ``dataset``."""

    module: nn.Module
    dataset: Dataset
    num_workers: int = 0  # loader processes per training process
    keys_with_epoch: bool = False  # the dataset is indexed by (epoch, index) pairs instead of indices
    weights_file: str = WEIGHTS  # name of the weights inside a checkpoint folder
    progress_fields: dict[str, str] = {"loss": "loss"}  # tqdm postfix label -> logged metric

    def collate(self, samples: list):
        return default_collate(samples)

    def prepare(self, batch, epoch: int) -> dict:
        """The module's keyword arguments for one micro-batch (under no_grad and autocast)."""
        return batch

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        return parameter_groups(self.module.named_parameters(), weight_decay)

    def weights(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_weights(self, weights: dict[str, torch.Tensor], source) -> None:
        load_state_dict_checked(self.module, weights, source)

    def count(self, batch) -> dict[str, int]:
        return {}

    def export(self, folder: Path) -> None:
        save_tensors(self.weights(), folder / self.weights_file)

    def describe(self) -> str:
        """What is trained, for the start-up log line."""
        return type(self).__name__


class Engine:
    """Trains ``task`` with the ``train`` and ``optim`` sections of ``config``; ``fit`` runs, checkpoints, exports."""

    def __init__(self, task: Task, config, env: DistributedEnv, output_dir: str | os.PathLike):
        self.task = task
        self.config = config
        self.env = env
        self.output_dir = Path(output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        train, optim = config.train, config.optim
        check_training(config)  # the loaders check it too; a config built by hand meets the same rules here
        if env.is_main and restarts_share_the_rendezvous_store():
            logger.warning("torchrun --max-restarts with its shared rendezvous store: a restarted group can meet the "
                           "failed group's keys there and hang or fail to connect (pytorch/pytorch#135712); launch "
                           "with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/training.md, Faults)")
        self.accumulation = accumulation_steps(train, env.world_size, env.device.type)
        if env.device.type == "cpu" and train.cpu_threads is not None:
            torch.set_num_threads(train.cpu_threads)  # for this whole process

        dataset_size = len(task.dataset)
        self.steps_per_epoch = dataset_size // train.global_batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the dataset has {dataset_size} images, fewer than one global batch "
                              f"(train.global_batch_size={train.global_batch_size})")
        self.total_steps = self.steps_per_epoch * train.epochs  # the schedule's length
        # where this run stops: the schedule's end, or ``train.max_steps`` (a quick check keeps the schedule)
        self.last_step = self.total_steps if train.max_steps is None else min(train.max_steps, self.total_steps)
        self.sampler = ResumableDistributedSampler(
            dataset_size, self.steps_per_epoch * train.global_batch_size,
            world_size=env.world_size, rank=env.rank, seed=train.seed, with_epoch=task.keys_with_epoch)

        self.trainable = [p for p in task.module.parameters() if p.requires_grad]
        module = task.module
        if env.distributed:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            module = DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False,
                                             find_unused_parameters=False)
        self.module = module
        # fused: one kernel over all tensors instead of the default loop over them, on the CPU too
        # (the optimizer phase of benchmarks/vs_clipself, RESULTS.md section 6); on CUDA the usual choice
        self.optimizer = torch.optim.AdamW(task.parameter_groups(optim.weight_decay), lr=optim.lr,
                                           betas=tuple(optim.betas), eps=optim.eps,
                                           fused=env.device.type in ("cpu", "cuda"))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, optim.warmup_steps, optim.min_lr / optim.lr))
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=train.precision == "fp16")

        self.step = 0
        self.epoch = 0
        self.samples_done = 0  # global position inside the current epoch
        self.counts: dict[str, int] = {}  # task counters, all processes, whole run
        self.counts_local: dict[str, int] = {}  # ... on this process since the last log
        self.nonfinite_skipped = 0  # steps skipped for a non-finite loss (train.on_nonfinite=skip), whole run

    # ------------------------------------------------------------------------------- training
    def autocast(self):
        precision = self.config.train.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=precision_dtype(precision))

    def loader(self) -> DataLoader:
        """Micro-batches of this process for the sampler's current epoch and start position.

        The loader draws its worker seed from its own generator (seeded by run seed and epoch), not
        from the global one, so a run resumed mid-epoch continues the global random stream exactly.
        """
        generator = torch.Generator().manual_seed(self.config.train.seed * 1_000_003 + self.sampler.epoch)
        return DataLoader(self.task.dataset, batch_size=self.config.train.batch_size, sampler=self.sampler,
                          collate_fn=self.task.collate, num_workers=self.task.num_workers,
                          pin_memory=self.env.device.type == "cuda", drop_last=True, generator=generator)

    def train_step(self, micro_batches: list, epoch: int, measure_grad_norm: bool = False) -> dict[str, torch.Tensor]:
        """Forward/backward over the micro-batches (gradients synchronised on the last) and one update.

        Returns the module's outputs averaged over the micro-batches and the ``lr`` this step used, plus
        ``grad_norm`` (before clipping) if ``measure_grad_norm``. The norm is a pass over every gradient
        (40 ms of a ViT-B CPU step), so ``fit`` asks for it on logging steps only; clipping computes it
        anyway. The update is the same either way. A non-finite output stops the run or, under
        ``train.on_nonfinite: skip``, skips the update and returns the ``lr`` alone.
        """
        self.module.train()
        skip_nonfinite = self.config.train.on_nonfinite == "skip"
        # a skipped step must not leave its mark on buffers either (BatchNorm statistics are updated in the forward)
        buffers = [buffer.detach().clone() for buffer in self.task.module.buffers()] if skip_nonfinite else []
        totals: dict[str, torch.Tensor] = {}
        for index, batch in enumerate(micro_batches):
            with torch.no_grad(), self.autocast():
                inputs = self.task.prepare(batch, epoch)
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not self.env.distributed else self.module.no_sync()
            with sync:
                with self.autocast():
                    losses = self.module(**inputs)
                self.scaler.scale(losses["loss"] / len(micro_batches)).backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0) + value.detach() / len(micro_batches)
            for name, count in self.task.count(batch).items():
                self.counts_local[name] = self.counts_local.get(name, 0) + count
        lr = torch.tensor(self.scheduler.get_last_lr()[0], device=self.env.device)
        nonfinite = self._nonfinite_terms(totals)
        if nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            if not skip_nonfinite:
                raise NonFiniteLossError(
                    f"step {self.step + 1} (epoch {epoch}): the loss went non-finite ({nonfinite}, averaged over "
                    f"processes); nothing was updated or checkpointed from this step; continue from the last "
                    f"checkpoint with --resume auto, after lowering optim.lr or with train.on_nonfinite=skip")
            with torch.no_grad():
                for buffer, saved in zip(self.task.module.buffers(), buffers):
                    buffer.copy_(saved)
            self.nonfinite_skipped += 1
            self.scheduler.step()
            return {"lr": lr}
        self.scaler.unscale_(self.optimizer)
        if self.config.optim.clip_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.config.optim.clip_grad_norm)
        elif measure_grad_norm:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None])
        if measure_grad_norm:
            totals["grad_norm"] = grad_norm.detach()
        totals["lr"] = lr
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return totals

    def _nonfinite_terms(self, totals: dict[str, torch.Tensor]) -> str:
        """'name=value, ...' of the step's terms that are NaN or infinite on any process ('' if none).

        A collective: the terms are averaged over processes (NaN and inf survive the average), so every
        process takes the same decision."""
        names = sorted(totals)
        means = all_reduce(torch.stack([totals[name].float() for name in names]), op="mean").tolist()
        return ", ".join(f"{name}={mean}" for name, mean in zip(names, means) if not math.isfinite(mean))

    def fit(self, resume_from: str | os.PathLike | None = None) -> Path:
        """Train to the end of the schedule (from a checkpoint if given) and export; returns the export folder."""
        if resume_from is not None:
            self.load(resume_from)
        train = self.config.train
        if self.env.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(dump_config(self.config), encoding="utf-8")
            remove_stale_staging(self.checkpoint_dir)
            self._describe()
        metrics = MetricsLogger(self.output_dir, start_step=self.step) if self.env.is_main else None
        progress = tqdm(total=self.last_step, initial=self.step, desc="denserc train", unit="step",
                        disable=not self.env.is_main, dynamic_ncols=True)
        window = MetricsWindow()
        try:
            for epoch in range(self.epoch, train.epochs):
                if self.step >= self.last_step:
                    break
                self.sampler.set_epoch(epoch, self.samples_done)
                micro_batches = []
                for batch in self.loader():
                    micro_batches.append(batch)
                    if len(micro_batches) < self.accumulation:
                        continue
                    logging_step = (self.step + 1) % train.log_every == 0 or self.step + 1 == self.last_step
                    window.add(self.train_step(micro_batches, epoch, measure_grad_norm=logging_step))
                    micro_batches = []
                    self.step += 1
                    self.samples_done += train.global_batch_size
                    progress.update(1)
                    if logging_step:
                        self._log(window, metrics, progress, epoch)
                    stopping = self.step == self.last_step < self.total_steps  # train.max_steps reached
                    if self.step % train.checkpoint_every == 0 or stopping:
                        self.save()
                    if stopping:
                        break  # the checkpoint above resumes mid-epoch
                else:
                    self.epoch, self.samples_done = epoch + 1, 0
                    self.save()
        finally:
            progress.close()
            if metrics is not None:
                metrics.close()
        return self.export()

    def _log(self, window: MetricsWindow, metrics: MetricsLogger | None, progress: tqdm, epoch: int) -> None:
        """Reduce the window and the counters over processes (a collective); rank 0 writes the record."""
        names = sorted(self.counts_local)
        if names:
            local = torch.tensor([float(self.counts_local[n]) for n in names], device=self.env.device)
            for name, total in zip(names, all_reduce(local, op="sum").tolist()):
                self.counts[name] = self.counts.get(name, 0) + int(total)
        self.counts_local = {}
        values = window.reduce(self.config.train.global_batch_size)
        values.update(epoch=epoch, **self.counts)
        if self.config.train.on_nonfinite == "skip":
            values[NONFINITE_COUNT] = self.nonfinite_skipped
        if metrics is not None:
            metrics.log(self.step, values)  # a window whose steps were all skipped has no loss terms
            progress.set_postfix({label: f"{values[name]:.4f}" for label, name in self.task.progress_fields.items()
                                  if name in values})

    def _describe(self) -> None:
        train = self.config.train
        logger.info("training %s on %d process(es) x %s: %d images, %d steps/epoch x %d epochs, "
                    "global batch %d = %d x %d processes x %d accumulation", self.task.describe(),
                    self.env.world_size, self.env.device.type, len(self.task.dataset), self.steps_per_epoch,
                    train.epochs, train.global_batch_size, train.batch_size, self.env.world_size,
                    self.accumulation)

    # ---------------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        """Everything but the weights that exact resumption needs (a collective: RNG of every process)."""
        return {"step": self.step, "epoch": self.epoch, "samples_done": self.samples_done,
                "global_batch_size": self.config.train.global_batch_size, "counts": dict(self.counts),
                NONFINITE_COUNT: self.nonfinite_skipped,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": gather_objects(rng_state()),
                "config": dataclasses.asdict(self.config)}

    def save(self) -> None:
        """Checkpoint the current step (main process writes; all processes take part in gathering RNG)."""
        state = self.state()
        if self.env.is_main:
            save_checkpoint(self.checkpoint_dir, self.step, self.task.weights(), state,
                            {"epoch": self.epoch, "samples_done": self.samples_done},
                            keep_last=self.config.train.keep_last, weights_file=self.task.weights_file)
        barrier()

    def load(self, path: str | os.PathLike) -> None:
        """Restore weights, optimizer, scheduler, scaler, position in the run and RNG from a checkpoint."""
        weights, state = load_checkpoint(path)
        if state["global_batch_size"] != self.config.train.global_batch_size:
            raise ConfigError(f"{path} was trained with train.global_batch_size={state['global_batch_size']}; "
                              f"resume with the same value (got {self.config.train.global_batch_size})")
        self.task.load_weights(weights, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.samples_done = state["step"], state["epoch"], state["samples_done"]
        self.counts = dict(state["counts"])
        self.nonfinite_skipped = state.get(NONFINITE_COUNT, 0)  # absent from checkpoints of older versions
        changed = changed_keys(state["config"], self.config)
        if changed and self.env.is_main:
            logger.warning("resuming with settings that differ from the checkpoint's: %s", ", ".join(changed))
        if len(state["rng"]) == self.env.world_size:
            set_rng_state(state["rng"][self.env.rank])
        else:
            logger.warning("%s was written by %d processes, this run has %d: random generators are not "
                           "restored (data order does not depend on them; random ops in the task do)", path,
                           len(state["rng"]), self.env.world_size)
        if self.env.is_main:
            logger.info("resumed from %s at step %d (epoch %d, %d samples into it)", path, self.step,
                        self.epoch, self.samples_done)

    # --------------------------------------------------------------------------------- export
    def export(self) -> Path:
        """Rank 0 has the task write its result into a temporary folder, renamed to ``output_dir/final``."""
        final = self.output_dir / "final"
        if self.env.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".final.", dir=self.output_dir))
            try:
                self.task.export(staging)
            except BaseException as error:
                shutil.rmtree(staging, ignore_errors=True)
                shortage = space_shortage(error, self.output_dir, tensor_bytes(self.task.weights()))
                if shortage:
                    raise OSError(f"no space left for the export in {self.output_dir} (the checkpoints are intact): "
                                  f"{shortage}; free some space and run again with --resume auto, which exports "
                                  "the last checkpoint") from error
                raise
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            logger.info("exported %s to %s", self.task.describe(), final)
        barrier()
        return final
