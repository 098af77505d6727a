"""Zero-shot text classifiers: class names x prompt templates -> one normalised embedding per name.

Class-name files (``data/classnames/*.txt``, or any file in that format) hold one class per line;
a line may list synonyms separated by commas ("person, person in shirt, person in jeans"). Every
name is its own *query*; a class scores the maximum over its queries, which is how SCLIP and its
successors use their synonym lists (e.g. VOC-21's background is "sky, wall, tree, ...": the
average of those embeddings would describe nothing, the best-matching one describes the pixel).

A query's embedding is CLIP's prompt ensemble (open_clip's ``build_zero_shot_classifier``): the text
embedding of every template filled with the name, each L2-normalised, averaged, and normalised again. Embeddings are cached on disk (safetensors)
under a key that hashes the text tower's weights, the names and the templates, so a cached file can
only be reused by the same text tower with the same prompts.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..io import save_tensors

DATA_DIR = Path(__file__).parent / "data"
CLASS_NAME_DIR = DATA_DIR / "classnames"
TEMPLATE_DIR = DATA_DIR / "templates"
CACHE_FORMAT = 1

# Template sets by name: open_clip's two ImageNet sets are reused, the others are data files.
#   openai  the 80 OpenAI ImageNet templates (SCLIP, ClearCLIP, NACLIP: training-free OVSS)
#   simple  the short 7-template subset from the CLIP notebook (ClearCLIP's `sub_imagenet_template`)
#   vild    ViLD's 63 hand-crafted templates, as CLIPSelf/DeCLIP embed COCO-panoptic classes
BUILTIN_TEMPLATES = {
    "openai": lambda: [template("{}") for template in OPENAI_IMAGENET_TEMPLATES],
    "simple": lambda: [template("{}") for template in SIMPLE_IMAGENET_TEMPLATES],
}


def builtin_class_names() -> list[str]:
    """Names of the bundled class-name lists (``ade20k``, ``coco_panoptic``, ``voc21``, ...)."""
    return sorted(path.stem for path in CLASS_NAME_DIR.glob("*.txt"))


def builtin_templates() -> list[str]:
    return sorted([*BUILTIN_TEMPLATES, *(path.stem for path in TEMPLATE_DIR.glob("*.txt"))])


def load_class_names(source: str | os.PathLike) -> list[list[str]]:
    """A bundled list by name, or a file: one class per line, synonyms separated by commas."""
    path = _resolve(source, CLASS_NAME_DIR, "class-name list", builtin_class_names())
    classes = []
    for number, line in enumerate(_read_lines(path), start=1):
        names = [name.strip() for name in line.split(",")]
        if not all(names):
            raise ValueError(f"{path}, line {number}: empty class name in {line!r} (expected one class per "
                             "line, synonyms separated by commas, no blank lines)")
        classes.append(names)
    if not classes:
        raise ValueError(f"{path} lists no classes (expected one class per line)")
    return classes


def load_templates(source: str | os.PathLike) -> list[str]:
    """A bundled template set by name (openai, simple, vild) or a file with one template per line.

    A template holds ``{}`` where the class name goes and may hold ``{article}`` ("a"/"an").
    """
    if str(source) in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[str(source)]()
    path = _resolve(source, TEMPLATE_DIR, "template set", builtin_templates())
    templates = _read_lines(path)
    for number, template in enumerate(templates, start=1):
        try:
            filled = render(template, "\0")
        except (IndexError, KeyError, ValueError) as error:
            raise ValueError(f"{path}, line {number}: template {template!r} is not a format string with "
                             f"'{{}}' and optionally '{{article}}' ({error!r})") from error
        if filled.count("\0") != 1:
            raise ValueError(f"{path}, line {number}: template {template!r} must contain '{{}}' exactly once")
    if not templates:
        raise ValueError(f"{path} lists no templates (expected one template per line)")
    return templates


def render(template: str, name: str) -> str:
    """Fill a template with a class name; ``{article}`` becomes "an" before a vowel, else "a" (ViLD's rule)."""
    return template.format(name, article="an" if name[:1].lower() in "aeiou" else "a")


@dataclass
class TextClassifier:
    """Normalised query embeddings (Q, E); ``query_class[q]`` is the class query q names."""

    class_names: list[list[str]]
    embeddings: torch.Tensor
    query_class: torch.Tensor

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_scores(self, query_scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Reduce per-query scores along ``dim`` (size Q) to per-class scores (size C) by the maximum."""
        if len(self.query_class) == self.num_classes:
            return query_scores
        moved = query_scores.movedim(dim, -1)
        index = self.query_class.to(moved.device).expand_as(moved)
        out = moved.new_full((*moved.shape[:-1], self.num_classes), float("-inf"))
        out = out.scatter_reduce(-1, index, moved, reduce="amax", include_self=True)
        return out.movedim(-1, dim)


def text_tower_fingerprint(model) -> str:
    """SHA-256 of the model name (it picks the tokenizer) and every non-image weight of the CLIP."""
    digest = hashlib.sha256(model.model_name.encode())
    for name, tensor in sorted(model.clip.state_dict().items()):
        if name.startswith("visual."):
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


@torch.no_grad()
def build_text_classifier(model, tokenizer, class_names: Sequence[Sequence[str]], templates: Sequence[str], *,
                          cache_dir: str | os.PathLike | None = None, batch_size: int = 256,
                          progress: bool = False) -> TextClassifier:
    """Embed every (class name, template) prompt and ensemble per name; reuse the disk cache if present.

    ``cache_dir=None`` disables the cache. Embeddings come back float32 on the model's device;
    ``batch_size`` bounds the prompts per text-encoder call (whole names at a time). With ``progress``,
    a line on stderr says how many prompts are embedded and where they are cached, then a bar (with its
    time left) runs: thousands of prompts take minutes on a CPU, before the first image.
    """
    class_names = [list(names) for names in class_names]
    templates = list(templates)
    queries = [name for names in class_names for name in names]
    query_class = torch.tensor([c for c, names in enumerate(class_names) for _ in names], dtype=torch.long)
    device = next(model.parameters()).device
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "text_tower": text_tower_fingerprint(model),
                                         "classes": class_names, "templates": templates}).encode()).hexdigest()
        cache_file = Path(cache_dir) / f"{key}.safetensors"
        cached = _read_cache(cache_file, len(queries))
        if cached is not None:
            return TextClassifier(class_names, cached.to(device), query_class.to(device))
    if progress:
        cached = f"cached in {cache_file.parent} for later runs" if cache_file else "not cached (no cache folder)"
        print(f"text classifier: embedding {len(queries) * len(templates):,} prompts ({len(queries)} names x "
              f"{len(templates)} templates) with the text tower, once; {cached}", file=sys.stderr, flush=True)
    fillers = [functools.partial(render, template) for template in templates]
    embeddings = build_zero_shot_classifier(model, tokenizer, queries, fillers, device=device,
                                            num_classes_per_batch=max(1, batch_size // len(templates)),
                                            use_tqdm=progress)
    embeddings = embeddings.T.float().contiguous()
    if cache_file is not None:
        save_tensors({"embeddings": embeddings}, cache_file)
    return TextClassifier(class_names, embeddings, query_class.to(device))


def _read_cache(path: Path, num_queries: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        embeddings = load_file(path)["embeddings"]
    except (SafetensorError, KeyError, OSError) as error:
        raise ValueError(f"text-embedding cache file {path} is unreadable ({error}); delete it to rebuild") from error
    if embeddings.ndim != 2 or embeddings.shape[0] != num_queries:
        raise ValueError(f"text-embedding cache file {path} holds shape {tuple(embeddings.shape)}, expected "
                         f"({num_queries}, E); delete it to rebuild")
    return embeddings


def _resolve(source: str | os.PathLike, folder: Path, kind: str, builtins: list[str]) -> Path:
    if os.sep not in str(source):  # a bundled name; "-" and "_" are one spelling (coco-stuff = coco_stuff)
        for name in (str(source), str(source).replace("-", "_")):
            if (folder / f"{name}.txt").is_file():
                return folder / f"{name}.txt"
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} {str(source)!r} is neither a bundled one ({', '.join(builtins)}) "
                                "nor an existing file")
    return path


def _read_lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]
