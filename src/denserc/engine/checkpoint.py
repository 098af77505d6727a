"""Training checkpoints: one folder per optimizer step, published atomically, keep-last-k; which one to resume.

    checkpoints/step_000001000/
        model.safetensors     the task's weights (the distillation names it student.safetensors)
        trainer_state.pt      optimizer, scheduler, scaler, step, epoch, position, RNG (tensors and plain data)
        checkpoint.json       step, epoch, the weights file's name, size and SHA-256 of both files; written last

A checkpoint is written into a hidden temporary folder and renamed into place once complete, so a
crash at any moment leaves either the previous set of checkpoints or the previous set plus the new
one; older ones are deleted only after that. A write that fails (a full disk included) removes the
temporary folder and leaves the previous checkpoints as they were. Loading checks every file against
the marker's size and SHA-256 first, so a checkpoint damaged afterwards (a truncated copy, a flipped
byte) is refused by name instead of failing inside a deserialiser; ``--resume auto`` then falls back to
the newest intact one. ``trainer_state.pt`` is read with ``weights_only=True``.
"""
from __future__ import annotations

import errno
import hashlib
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
from ..distributed import DistributedEnv, broadcast_object

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.pt"
MARKER = "checkpoint.json"
_NAME = re.compile(r"^step_(\d+)$")
DAMAGED_SUFFIX = ".damaged"  # a damaged checkpoint that --resume auto skipped is renamed step_N.damaged


class DamagedCheckpointError(ValueError):
    """A checkpoint's files differ from what its marker recorded when it was written."""


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
    """Publish checkpoint ``step`` and delete all but the newest ``keep_last`` complete ones.

    A full disk or quota is re-raised as one ``OSError`` line saying how much space the checkpoint needs.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:09d}"
    if (final / MARKER).is_file():
        return final
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory))
    try:
        save_tensors(weights, staging / weights_file)
        atomic_write(staging / TRAINER_STATE, lambda tmp: torch.save(state, tmp))
        files = {name: file_record(staging / name) for name in (weights_file, TRAINER_STATE)}
        save_json({"step": step, "weights_file": weights_file, "files": files, **meta}, staging / MARKER)
        if final.exists():  # an incomplete folder of the same step from a crashed run
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        shortage = space_shortage(error, directory, tensor_bytes((weights, state)))
        if shortage:
            raise OSError(f"no space left for checkpoint step {step} in {directory} (nothing was published; the "
                          f"previous checkpoints are intact): {shortage}, and up to train.keep_last + 1 = "
                          f"{keep_last + 1} checkpoints coexist while one is written; free some space (older "
                          "checkpoints are deleted only once a new one is complete) and continue with --resume "
                          "auto") from error
        raise
    for _, old in complete_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def file_record(path: Path) -> dict:
    """What the marker records of a published file: its size and SHA-256 (``sha256sum`` prints the same)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """The marker of checkpoint folder ``path`` once every file it lists matches its recorded size and SHA-256.

    Raises ``DamagedCheckpointError`` naming the first file that does not (missing, truncated, altered), or
    the marker itself if it is unreadable. A marker written before checksums were recorded is accepted with
    a warning.
    """
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedCheckpointError(f"{path / MARKER} is not valid JSON ({error})") from None
    if "files" not in marker:
        logger.warning("%s was written before checkpoints recorded checksums: its files are not verified", path)
        return marker
    for name, expected in marker["files"].items():
        file = path / name
        if not file.is_file():
            raise DamagedCheckpointError(f"{file} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise DamagedCheckpointError(f"{file} has {size} bytes, {MARKER} recorded {expected['bytes']} "
                                         "(truncated or overwritten)")
        if file_record(file)["sha256"] != expected["sha256"]:
            raise DamagedCheckpointError(f"{file} does not match the SHA-256 {MARKER} recorded (its bytes changed)")
    return marker


def remove_stale_staging(directory: str | os.PathLike) -> None:
    """Delete temporary folders left by a run killed while writing a checkpoint."""
    directory = Path(directory)
    if directory.is_dir():
        for path in directory.glob(".step_*.tmp"):
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, trainer state) of a complete checkpoint folder, verified first (``verify_checkpoint``)."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER}; expected a folder "
                                "checkpoints/step_N written by denserc train)")
    marker = verify_checkpoint(path)
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
    """The checkpoint to start from: ``auto`` (the newest intact one, if any), a folder, or None (a fresh run).

    Rank 0 decides and tells the others; a fresh run refuses a folder that already has checkpoints. ``auto``
    renames damaged checkpoints newer than the one it picks to ``step_N.damaged`` (so the resumed run writes
    those steps anew and keep-last counts only intact ones), with one warning line each; if every
    checkpoint is damaged it stops instead. A damaged folder given by path is an error.
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
            found = newest_intact_checkpoint(checkpoint_dir)
            if found is None:
                logger.info("--resume auto: no checkpoint in %s, starting from scratch", checkpoint_dir)
            return None if found is None else str(found)
        if not (Path(resume) / MARKER).is_file():
            raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (expected "
                                    f"{checkpoint_dir}/step_N or --resume auto)")
        try:
            verify_checkpoint(resume)
        except DamagedCheckpointError as error:
            raise DamagedCheckpointError(f"--resume {resume}: damaged checkpoint: {error}; resume from an older "
                                         f"one in {Path(resume).parent} or with --resume auto") from None
        return resume

    chosen = broadcast_object(_catching(choose) if env.is_main else None)
    if isinstance(chosen, BaseException):
        raise chosen
    if chosen is not None and not Path(chosen).is_dir():
        raise FileNotFoundError(f"checkpoint {chosen} is not visible on process {env.rank}: "
                                "train.output_dir must be on a filesystem shared by all nodes")
    return None if chosen is None else Path(chosen)


def newest_intact_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint that verifies; the damaged ones newer than it are set aside.

    None if there is no checkpoint; ``DamagedCheckpointError`` if there are some and every one is damaged.
    """
    found = complete_checkpoints(directory)
    damaged = []
    for _, folder in reversed(found):
        try:
            verify_checkpoint(folder)
        except DamagedCheckpointError as error:
            damaged.append((folder, error))
            continue
        for bad, error in damaged:
            aside = bad.with_name(bad.name + DAMAGED_SUFFIX)
            shutil.rmtree(aside, ignore_errors=True)  # set aside by an earlier resume of the same step
            os.replace(bad, aside)
            logger.warning("--resume auto: skipping damaged checkpoint %s (%s); renamed it %s, resuming from %s",
                           bad.name, error, aside.name, folder.name)
        return folder
    if damaged:
        raise DamagedCheckpointError(f"--resume auto: all {len(damaged)} checkpoint(s) in {directory} are damaged "
                                     f"(newest: {damaged[0][1]}); nothing intact to resume from: move the folder "
                                     "away to start afresh")
    return None


def tensor_bytes(obj) -> int:
    """Bytes of every tensor inside nested dicts, lists and tuples: about what ``torch.save`` writes of them."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def space_shortage(error: BaseException, directory: Path, needed: int) -> str:
    """'it needs about X, Y are free' if ``error``, raised while writing ``needed`` bytes into ``directory``, came
    from a full disk or quota, else ''. ENOSPC and EDQUOT say so; on a full disk ``torch.save`` raises a
    RuntimeError and safetensors its own error, neither with an errno, so any failure counts while less space
    than ``needed`` is free."""
    free = shutil.disk_usage(directory).free
    by_errno = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    if by_errno or (isinstance(error, Exception) and free < needed):
        return f"it needs about {_size(needed)}, {_size(free)} are free"
    return ""


def _size(count: int) -> str:
    """Bytes in MB, or GB from 10 GB on."""
    return f"{count / 1e9:.1f} GB" if count >= 10e9 else f"{count / 1e6:.1f} MB"


def _catching(function):
    """``function()``, or the exception it raised (so rank 0 can hand its error to every process)."""
    try:
        return function()
    except Exception as error:  # noqa: BLE001 - re-raised on every process by the caller
        return error
