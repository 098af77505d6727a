"""Open-vocabulary detection protocols: which categories are base (boxes seen in training) and novel.

A protocol turns the categories of a COCO-style annotation file into a ``Split`` (the vocabulary in
detector order, with a base/novel flag per class) and names the evaluator that scores it:

    ov-coco     the 48 base / 17 novel classes of OVR-CNN (Zareian et al., CVPR 2021); the other 15
                COCO classes are not part of the protocol and are ignored; scored on the images that
                hold at least one of the 65 classes (OVR-CNN's ``instances_val2017_all_2.json``)
    ov-lvis     every LVIS v1 category; novel = the rare ones (``frequency == "r"``)
    coco        cross-dataset transfer: the 80 COCO classes, all scored alike (AP, AP50, AP75)
    objects365  cross-dataset transfer: the 365 Objects365 v1 classes (AP, AP50, AP75)

Classes are found in a file by name, as the peer's mmdet datasets find them
(``CocoDataset.get_cat_ids(cat_names=CLASSES)``), so any file with COCO's names works whatever its ids
(``instances_val2017.json``, OVR-CNN's and CLIPSelf's split files); a file of another data set is refused
naming the classes it lacks. The class lists are CLIPSelf's ``F-ViT/datasets/mscoco_{seen,unseen,65,all}
_classes.json`` and ``objects365v1_fix_classes.json`` (``classes/objects365v1.json`` here); prompts
render names as its ``F-ViT/tools/clip_utils.py`` does (``prompt_name``). The transfer protocols carry
the detector settings of its ``F-ViT/configs/transfer/*.py`` (``inference_settings``), which a
``--detector`` run applies. Other protocols (the testbed's, a user's) join with ``register_protocol``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..registry import Registry

# COCO 2017 category ids of the 80 classes, in CLIPSelf's mscoco_all_classes.json order (= id order).
COCO_IDS = {
    "person": 1, "bicycle": 2, "car": 3, "motorcycle": 4, "airplane": 5, "bus": 6, "train": 7, "truck": 8,
    "boat": 9, "traffic light": 10, "fire hydrant": 11, "stop sign": 13, "parking meter": 14, "bench": 15,
    "bird": 16, "cat": 17, "dog": 18, "horse": 19, "sheep": 20, "cow": 21, "elephant": 22, "bear": 23,
    "zebra": 24, "giraffe": 25, "backpack": 27, "umbrella": 28, "handbag": 31, "tie": 32, "suitcase": 33,
    "frisbee": 34, "skis": 35, "snowboard": 36, "sports ball": 37, "kite": 38, "baseball bat": 39,
    "baseball glove": 40, "skateboard": 41, "surfboard": 42, "tennis racket": 43, "bottle": 44,
    "wine glass": 46, "cup": 47, "fork": 48, "knife": 49, "spoon": 50, "bowl": 51, "banana": 52, "apple": 53,
    "sandwich": 54, "orange": 55, "broccoli": 56, "carrot": 57, "hot dog": 58, "pizza": 59, "donut": 60,
    "cake": 61, "chair": 62, "couch": 63, "potted plant": 64, "bed": 65, "dining table": 67, "toilet": 70,
    "tv": 72, "laptop": 73, "mouse": 74, "remote": 75, "keyboard": 76, "cell phone": 77, "microwave": 78,
    "oven": 79, "toaster": 80, "sink": 81, "refrigerator": 82, "book": 84, "clock": 85, "vase": 86,
    "scissors": 87, "teddy bear": 88, "hair drier": 89, "toothbrush": 90,
}
# The 15 COCO classes outside OVR-CNN's split (mscoco_all_classes.json minus mscoco_65_classes.json).
OUTSIDE_OV_COCO = ("traffic light", "fire hydrant", "stop sign", "parking meter", "sports ball", "baseball bat",
                   "baseball glove", "tennis racket", "wine glass", "hot dog", "potted plant", "dining table",
                   "cell phone", "teddy bear", "hair drier")
OV_COCO_IDS = {name: cid for name, cid in COCO_IDS.items() if name not in OUTSIDE_OV_COCO}  # mscoco_65 order
OV_COCO_NOVEL = ("airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard",
                 "skateboard", "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors")
OV_COCO_BASE = tuple(name for name in OV_COCO_IDS if name not in OV_COCO_NOVEL)
OBJECTS365_FILE = Path(__file__).parent / "classes" / "objects365v1.json"

# CLIPSelf's F-ViT/configs/transfer/fvit_vitl14_upsample_fpn_transfer2{coco,objects365v1}.py: the
# FViTTransferBBoxHead scores every class as seen (alpha), with a fixed detector temperature 50 in place of
# the learned one and a CLIP (VLM) temperature of 120.
TRANSFER_SETTINGS = {"fixed_temperature": 50.0, "clip_temperature": 120.0}


@dataclass(frozen=True)
class Split:
    """The detector's vocabulary: ``category_ids[k]``/``names[k]`` is class k; ``novel[k]`` marks the
    classes whose boxes are never used in training."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]
    novel: tuple[bool, ...]

    def __post_init__(self):
        if not (len(self.category_ids) == len(self.names) == len(self.novel)) or not self.category_ids:
            raise ValueError("a split needs one name and one novel flag per category id, and at least one class")
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError(f"category ids of a split must be distinct, got {list(self.category_ids)}")

    @property
    def base_ids(self) -> list[int]:
        return [c for c, is_novel in zip(self.category_ids, self.novel) if not is_novel]

    @property
    def novel_ids(self) -> list[int]:
        return [c for c, is_novel in zip(self.category_ids, self.novel) if is_novel]

    def to_dict(self) -> dict:
        return {"category_ids": list(self.category_ids), "names": list(self.names), "novel": list(self.novel)}

    @classmethod
    def from_dict(cls, raw: dict) -> "Split":
        return cls(tuple(raw["category_ids"]), tuple(raw["names"]), tuple(bool(n) for n in raw["novel"]))


@dataclass(frozen=True)
class Protocol:
    """``split`` maps the annotation file's ``categories`` list to the split; ``evaluator`` is
    ``"coco"`` (pycocotools: AP50 novel/base/all, or AP/AP50/AP75 when no class is novel) or ``"lvis"``
    (AP, APr/c/f with ``lvis``). ``images_with_split_classes_only``: score only the images holding an
    annotation (crowd included) of a split class. ``inference_settings``: ``DetectorConfig`` values a
    ``--detector`` run of this protocol uses (command-line overrides win)."""

    name: str
    evaluator: str
    split: Callable[[Sequence[dict]], Split]
    images_with_split_classes_only: bool = False
    inference_settings: Mapping[str, Any] = field(default_factory=dict)


def prompt_name(name: str) -> str:
    """A category name as the prompts hold it, CLIPSelf's ``processed_name(name, rm_dot=True)``
    (``F-ViT/tools/clip_utils.py``): ``_`` -> space, ``/`` -> " or ", lower case, no trailing dot, single
    spaces (the tokenizer's own cleaning). ``"bow_(weapon)"`` -> ``"bow (weapon)"``,
    ``"cabinet / shelf"`` -> ``"cabinet or shelf"``."""
    return " ".join(name.replace("_", " ").replace("/", " or ").lower().rstrip(".").split())


def _ids_by_name(categories: Sequence[dict], classes: Sequence[str], protocol: str,
                 key: Callable[[str], str] = lambda name: name) -> dict[str, int]:
    """The file's category id of every class in ``classes`` whose ``key`` matches a category's."""
    ids: dict[str, list[int]] = {}
    for category in categories:
        ids.setdefault(key(str(category.get("name", ""))), []).append(category["id"])
    found = {}
    for name in classes:
        matches = ids.get(key(name), [])
        if len(matches) > 1:
            raise ValueError(f"categories {matches} share the name {name!r}; {protocol} finds its classes by name")
        if matches:
            found[name] = matches[0]
    return found


def _require(found: Mapping[str, int], classes: Sequence[str], what: str, protocol: str,
             categories: Sequence[dict]) -> None:
    missing = [name for name in classes if name not in found]
    if missing:
        shown = ", ".join(repr(name) for name in missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        theirs = ", ".join(repr(c.get("name")) for c in categories[:3]) + (", ..." if len(categories) > 3 else "")
        raise ValueError(f"the categories do not fit {protocol}: {shown}{more} of its {len(classes)} {what} are not "
                         f"among the file's {len(categories)} categories ({theirs})")


def ov_coco_split(categories: Sequence[dict]) -> Split:
    """The 65 OV-COCO classes, found by COCO name. A training file may lack the novel classes (OVR-CNN's
    48-category ``instances_train2017_seen_2.json``): those keep their COCO ids, and scoring refuses such
    a file (``evaluation.read_split``)."""
    found = _ids_by_name(categories, tuple(OV_COCO_IDS), "ov-coco")
    _require(found, OV_COCO_BASE, "base classes", "ov-coco", categories)
    names = tuple(OV_COCO_IDS)
    return Split(tuple(found.get(name, OV_COCO_IDS[name]) for name in names), names,
                 tuple(name in OV_COCO_NOVEL for name in names))


def coco_split(categories: Sequence[dict]) -> Split:
    """The 80 COCO classes, found by name, none novel (transfer: every class is scored as seen)."""
    found = _ids_by_name(categories, tuple(COCO_IDS), "coco")
    _require(found, tuple(COCO_IDS), "classes", "coco", categories)
    return Split(tuple(found[name] for name in COCO_IDS), tuple(COCO_IDS), (False,) * len(COCO_IDS))


def objects365_classes() -> list[str]:
    """CLIPSelf's ``F-ViT/datasets/objects365v1_fix_classes.json``: the v1 names in label order, spelled
    for prompts ("cabinet / shelf", "hami melon" where the annotation file has "cabinet/shelf", "hamimelon")."""
    return json.loads(OBJECTS365_FILE.read_text(encoding="utf-8"))


def _squeezed(name: str) -> str:
    return "".join(name.lower().split())


def objects365_split(categories: Sequence[dict]) -> Split:
    """The 365 Objects365 v1 classes, none novel. Each class is the file's category whose name equals the
    peer's up to case and spaces; its prompt is the peer's spelling (``prompt_name``)."""
    classes = objects365_classes()
    found = _ids_by_name(categories, classes, "objects365", key=_squeezed)
    _require(found, classes, "Objects365 v1 classes", "objects365", categories)
    return Split(tuple(found[name] for name in classes), tuple(prompt_name(name) for name in classes),
                 (False,) * len(classes))


def ov_lvis_split(categories: Sequence[dict]) -> Split:
    """All LVIS categories in id order; the rare ones (``frequency == "r"``) are novel."""
    without = [c.get("id") for c in categories if c.get("frequency") not in ("r", "c", "f")]
    if without:
        raise ValueError(f"ov-lvis needs LVIS categories with a 'frequency' of r/c/f; "
                         f"{len(without)} lack it (ids {without[:5]})")
    ordered = sorted(categories, key=lambda c: c["id"])
    return Split(tuple(c["id"] for c in ordered), tuple(prompt_name(c["name"]) for c in ordered),
                 tuple(c["frequency"] == "r" for c in ordered))


PROTOCOLS: Registry[Protocol] = Registry("detection protocol")


def register_protocol(protocol: Protocol) -> None:
    """Make ``protocol`` available by name (``--protocol``, ``data.protocol``): the extension point for plug-ins."""
    if protocol.evaluator not in ("coco", "lvis"):
        raise ValueError(f"protocol {protocol.name!r}: evaluator must be 'coco' or 'lvis', got {protocol.evaluator!r}")
    PROTOCOLS.register(protocol.name, protocol)


def get_protocol(name: str) -> Protocol:
    """The protocol ``name``; a plug-in's (e.g. the testbed's ov-testbed) registers on first need."""
    return PROTOCOLS.get(name)


register_protocol(Protocol("ov-coco", "coco", ov_coco_split, images_with_split_classes_only=True))
register_protocol(Protocol("ov-lvis", "lvis", ov_lvis_split))
register_protocol(Protocol("coco", "coco", coco_split, inference_settings={**TRANSFER_SETTINGS, "alpha": 0.2}))
register_protocol(Protocol("objects365", "coco", objects365_split,
                           inference_settings={**TRANSFER_SETTINGS, "alpha": 0.3}))
