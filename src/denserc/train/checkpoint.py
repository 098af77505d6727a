"""Training checkpoints: one folder per optimizer step, published atomically, keep-last-k.

    checkpoints/step_000001000/
        student.safetensors   the student's weights (open_clip model + gate)
        trainer_state.pt      optimizer, scheduler, scaler, step, epoch, position, RNG (tensors and plain data)
        checkpoint.json       step, epoch, written last

A checkpoint is written into a hidden temporary folder and renamed into place once complete, so a
crash at any moment leaves either the previous set of checkpoints or the previous set plus the new
one; older ones are deleted only after that. ``trainer_state.pt`` is read with ``weights_only=True``.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..io import atomic_write, save_json, save_tensors

STUDENT_WEIGHTS = "student.safetensors"
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
                    state: dict, meta: dict, keep_last: int) -> Path:
    """Publish checkpoint ``step`` and delete all but the newest ``keep_last`` complete ones."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:09d}"
    if (final / MARKER).is_file():
        return final
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory))
    try:
        save_tensors(weights, staging / STUDENT_WEIGHTS)
        atomic_write(staging / TRAINER_STATE, lambda tmp: torch.save(state, tmp))
        save_json({"step": step, **meta}, staging / MARKER)
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
    """(student weights, trainer state) of a complete checkpoint folder."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER}; expected a folder "
                                "checkpoints/step_N written by denserc train)")
    weights = load_file(path / STUDENT_WEIGHTS)
    state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    return weights, state
