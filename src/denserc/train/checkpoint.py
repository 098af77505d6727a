"""Training checkpoints: one folder per optimizer step, published atomically, keep-last-k; which one to resume.

    checkpoints/step_000001000/
        model.safetensors     the task's weights (the distillation names it student.safetensors)
        trainer_state.pt      optimizer, scheduler, scaler, step, epoch, position, RNG (tensors and plain data)
        checkpoint.json       step, epoch, the weights file's name; written last

A checkpoint is written into a hidden temporary folder and renamed into place once complete, so a
crash at any moment leaves either the previous set of checkpoints or the previous set plus the new
one; older ones are deleted only after that. ``trainer_state.pt`` is read with ``weights_only=True``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..io import atomic_write, save_json, save_tensors
from .config import ConfigError
from .distributed import DistributedEnv, broadcast_object

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.pt"
MARKER = "checkpoint.json"
_NAME = re.compile(r"^step_(\d+)$")


def complete_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(directory)
    return found[-1][1] if found else None


def save_checkpoint(directory: str | os.PathLike, step: int, weights: dict[str, torch.Tensor],
                    state: dict, meta: dict, keep_last: int, weights_file: str = WEIGHTS) -> Path:
    """Publish checkpoint ``step`` and delete all but the newest ``keep_last`` complete ones."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:09d}"
    if (final / MARKER).is_file():
        return final
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory))
    try:
        save_tensors(weights, staging / weights_file)
        atomic_write(staging / TRAINER_STATE, lambda tmp: torch.save(state, tmp))
        save_json({"step": step, "weights_file": weights_file, **meta}, staging / MARKER)
        if final.exists():  # an incomplete folder of the same step from a crashed run
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for _, old in complete_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_staging(directory: str | os.PathLike) -> None:
    """Delete temporary folders left by a run killed while writing a checkpoint."""
    directory = Path(directory)
    if directory.is_dir():
        for path in directory.glob(".step_*.tmp"):
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, trainer state) of a complete checkpoint folder."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER}; expected a folder "
                                "checkpoints/step_N written by denserc train)")
    marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    weights = load_file(path / marker["weights_file"])
    state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    return weights, state


def rng_state() -> dict:
    """This process's global random generators (torch CPU, Python, every CUDA device)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def _catching(function):
    """``function()``, or the exception it raised (so rank 0 can hand its error to every process)."""
    try:
        return function()
    except Exception as error:  # noqa: BLE001 - re-raised on every process by the caller
        return error
