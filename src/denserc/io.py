"""Files: atomic writes (a crash mid-write never leaves a truncated file where a good one was), and reading
JSON and the format version of what the library exports, with errors that name the file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import save_file


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (tensors are copied to contiguous CPU memory)."""
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(plain, tmp, metadata=metadata))


def read_json(path: str | os.PathLike, what: str = "JSON"):
    """The parsed content of a JSON file; a missing file or invalid JSON is one error naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} file {path} is not valid JSON: {error}") from error


FORMAT_KEY = "format_version"  # the key every exported folder's JSON records its format under


def check_format_version(content: dict, expected: int, path: str | os.PathLike) -> None:
    """Refuse an exported folder's JSON whose ``format_version`` is not the one this code reads."""
    if content.get(FORMAT_KEY) != expected:
        raise ValueError(f"{path}: {FORMAT_KEY} {content.get(FORMAT_KEY)!r} is not supported (expected {expected})")


def read_exported_folder(folder: str | os.PathLike, config_file: str, required: Sequence[str], *, kind: str,
                         written_by: str, format_version: int, upgrade=None) -> dict:
    """The config JSON of an exported folder (a model, a detector, a CAT-Seg segmenter), after checking that
    ``config_file`` and every ``required`` file or folder is there; ``upgrade`` renames an earlier version's
    keys before the format version is checked."""
    folder = Path(folder)
    for name in (config_file, *required):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder} is not a {kind} folder: missing {name} (expected "
                                    f"{', '.join((config_file, *required))} written by {written_by})")
    config = read_json(folder / config_file, f"{kind} config")
    if upgrade is not None:
        config = upgrade(config)
    check_format_version(config, format_version, folder / config_file)
    return config


def save_json(obj, path: str | os.PathLike) -> None:
    """Write JSON atomically, indented for humans."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    atomic_write(path, write)
