"""Building, saving, loading and running an F-ViT detector (the Python API of ``denserc.detect``).

    detector = denserc.detect.load("runs/fvit_testbed/final")           # an exported detector folder
    result = detector.predict("street.jpg", ["bicycle", "tram", "kite"])   # any class names
    result["boxes"], result["labels"], result["scores"]                     # original-image pixels

An export folder holds the frozen tower (``tower/``, a ``DenseRCModel.save`` folder), the trained heads
(``heads.safetensors``) and ``detector.json`` (the config and the training split). At inference a
class is treated as base (ensemble weight ``alpha``) if its name was a base class in training, else as
novel (``beta``).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from safetensors.torch import load_file

from ..io import FORMAT_KEY, read_exported_folder, save_json, save_tensors
from ..models import PEER_PATHS, load_state_dict_checked
from ..models.factory import from_spec, get_tokenizer, load as load_tower
from ..images import load_image
from .config import DetectConfig
from .data import Batch, letterbox, normalisation, pil_sample
from .model import INFERENCE_SETTINGS, FViT, FViTHeads, paste_masks
from .protocols import Split

HEADS_FILE = "heads.safetensors"
META_FILE = "detector.json"
TOWER_DIR = "tower"
EXPORT_FORMAT = 1


def build_tower(config: DetectConfig):
    """The frozen tower: a DenseRC folder as trained, a plain CLIP as CLIPSelf's F-ViT runs it (``PEER_PATHS``)."""
    settings = {"construction": config.backbone.construction, "gating": config.backbone.gating,
                "num_layers": config.backbone.num_layers}
    return from_spec(config.backbone.model, plain_path=PEER_PATHS["F-ViT"], **settings)


def class_embeddings(tower, names: Sequence[str], templates) -> torch.Tensor:
    """(C, E) normalised prompt-ensemble text embeddings of the class names, from the text-embedding cache
    that ``denserc eval`` uses (``$DENSERC_CACHE/text``) or embedded there once, with a progress bar (65
    classes x 63 templates take minutes on a CPU)."""
    from ..eval.defaults import default_cache_dir
    from ..eval.text import build_text_classifier, load_templates
    templates = list(templates) if isinstance(templates, (list, tuple)) else load_templates(templates)
    classifier = build_text_classifier(tower, get_tokenizer(tower.model_name), [[name] for name in names], templates,
                                       cache_dir=default_cache_dir(), progress=True)
    return classifier.embeddings


def build_heads(config: DetectConfig, tower, split: Split) -> FViTHeads:
    """Fresh heads over the split's vocabulary and the fixed text embedding of "background"."""
    embeddings = class_embeddings(tower, split.names, config.text.templates)
    background = class_embeddings(tower, ["background"], config.text.templates)[0]
    return FViTHeads(config.detector, tower.width, tower.patch_size, embeddings.cpu(), background.cpu(),
                     torch.tensor(split.novel))


def save_detector(folder: str | os.PathLike, tower, heads: FViTHeads, config: DetectConfig, split: Split) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tower.save(folder / TOWER_DIR)
    save_tensors({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, folder / HEADS_FILE)
    save_json({FORMAT_KEY: EXPORT_FORMAT, "config": config.to_dict(), "split": split.to_dict()}, folder / META_FILE)
    return folder


class Detector:
    """A loaded detector: ``predict`` on images with class names chosen at call time."""

    def __init__(self, model: FViT, config: DetectConfig, split: Split):
        self.model = model.eval()
        self.config = config
        self.split = split
        self._vocabulary: tuple[str, ...] = split.names

    @property
    def device(self) -> torch.device:
        return next(self.model.heads.parameters()).device

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._vocabulary

    def set_classes(self, names: Sequence[str], novel: Sequence[bool] | None = None) -> None:
        """Detect these classes from now on. ``novel`` flags (ensemble weight beta) default to: every
        name that was not a base class in training."""
        names = tuple(names)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"class names must be a non-empty list of distinct names, got {list(names)}")
        if novel is None:
            base = {name for name, is_novel in zip(self.split.names, self.split.novel) if not is_novel}
            novel = [name not in base for name in names]
        classifier = self.model.heads.classifier
        if names != self._vocabulary:
            classifier.set_vocabulary(class_embeddings(self.model.tower, names, self.config.text.templates),
                                      torch.tensor(list(novel)))
            self._vocabulary = names
        else:
            classifier.set_vocabulary(classifier.class_embeddings, torch.tensor(list(novel)))

    @contextlib.contextmanager
    def settings(self, **values):
        """Run with these inference settings of ``DetectorConfig`` (``INFERENCE_SETTINGS``: the ensemble, the
        temperatures, post-processing), restored afterwards: a transfer protocol's, or overrides."""
        unknown = sorted(set(values) - set(INFERENCE_SETTINGS))
        if unknown:
            raise ValueError(f"{', '.join('detector.' + key for key in unknown)}: not an inference setting; "
                             f"expected detector.KEY=VALUE with KEY one of {', '.join(INFERENCE_SETTINGS)}")
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException
        config = self.model.heads.config
        try:
            checked = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(config), values))
        except OmegaConfBaseException as error:
            raise ValueError(f"inference settings {values}: {error.msg}") from error
        before = {key: getattr(config, key) for key in values}
        try:
            for key in values:
                setattr(config, key, getattr(checked, key))
            yield self
        finally:
            for key, value in before.items():
                setattr(config, key, value)

    @torch.no_grad()
    def detect(self, batch: Batch, with_masks: bool = True) -> list[dict]:
        """Detections of a letterboxed batch, mapped back to original-image pixels (masks pasted, unless
        ``with_masks`` is false: box-only scoring)."""
        outputs = self.model(batch.images.to(self.device), batch.image_sizes)
        results = []
        for output, scale, size in zip(outputs, batch.scales, batch.original_sizes):
            boxes = output["boxes"] / scale
            result = {"boxes": boxes, "scores": output["scores"], "labels": output["labels"]}
            if with_masks and "mask_probs" in output:
                result["masks"] = paste_masks(output["mask_probs"], boxes, size)
            results.append(result)
        return results

    def predict(self, image: str | os.PathLike | Image.Image, class_names: Sequence[str] | None = None) -> dict:
        """``boxes`` (D, 4) x1y1x2y2 in the image's pixels, ``scores``, ``labels`` (indices into
        ``class_names``), ``class_names``; ``masks`` (D, H, W) bool with a mask head."""
        if class_names is not None:
            self.set_classes(class_names)
        picture = image if isinstance(image, Image.Image) else load_image(image)
        mean, std = normalisation(self.config.data, self.model.tower)
        batch = letterbox([pil_sample(picture)], self.config.data.image_size, mean, std, self.device)
        result = self.detect(batch)[0]
        return {**result, "class_names": list(self._vocabulary)}


def _upgrade(meta: dict) -> dict:
    """A detector.json written by an earlier version, in today's keys (the weights never changed)."""
    if "format" in meta:  # written before the key was the library's one FORMAT_KEY
        meta[FORMAT_KEY] = meta.pop("format")
    config = meta["config"]
    if "model" in config and "detector" not in config:  # the heads' section was called ``model``
        config["detector"] = config.pop("model")
    data = config.setdefault("data", {})
    if "mean" not in data:  # exported before data.mean/std existed: trained on the tower's own normalisation
        data.update(mean=None, std=None)
    return meta


def load(folder: str | os.PathLike, device: str | torch.device = "cpu") -> Detector:
    """A detector exported by ``denserc detect train`` (its ``final`` folder or a copy)."""
    folder = Path(folder)
    meta = read_exported_folder(folder, META_FILE, (HEADS_FILE, TOWER_DIR), kind="detector",
                                written_by="`denserc detect train`", format_version=EXPORT_FORMAT, upgrade=_upgrade)
    from omegaconf import OmegaConf
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DetectConfig), meta["config"]))
    split = Split.from_dict(meta["split"])
    tower = load_tower(folder / TOWER_DIR)
    state = load_file(str(folder / HEADS_FILE))
    heads = FViTHeads(config.detector, tower.width, tower.patch_size, state["roi_heads.box_predictor.class_embeddings"],
                      state["roi_heads.box_predictor.background"], state["roi_heads.box_predictor.novel"])
    load_state_dict_checked(heads, state, folder / HEADS_FILE)
    return Detector(FViT(tower, heads).to(device), config, split)


def to_coco_results(detections: list[dict], image_ids: list[int], category_ids: Sequence[int]) -> list[dict]:
    """Detections (labels = indices into ``category_ids``) as COCO results ([x, y, w, h]; RLE masks)."""
    from pycocotools import mask as mask_utils
    import numpy as np
    results = []
    for detection, image_id in zip(detections, image_ids):
        boxes = detection["boxes"].float().cpu()
        masks = detection.get("masks")
        for k, (box, score, label) in enumerate(zip(boxes.tolist(), detection["scores"].tolist(),
                                                    detection["labels"].tolist())):
            x1, y1, x2, y2 = box
            entry = {"image_id": int(image_id), "category_id": int(category_ids[label]),
                     "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                     "score": round(float(score), 5)}
            if masks is not None:
                rle = mask_utils.encode(np.asfortranarray(masks[k].cpu().numpy().astype(np.uint8)))
                entry["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            results.append(entry)
    return results
