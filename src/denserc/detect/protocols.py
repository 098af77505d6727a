"""Open-vocabulary detection protocols: which categories are base (boxes seen in training) and novel.

A protocol turns the categories of a COCO-style annotation file into a ``Split`` (the vocabulary in
detector order, with a base/novel flag per class) and names the evaluator that scores it:

    ov-coco  the 48 base / 17 novel classes of OVR-CNN (Zareian et al., CVPR 2021), by COCO id;
             the other 15 COCO classes are not part of the protocol and are ignored
    ov-lvis  every LVIS v1 category; novel = the rare ones (``frequency == "r"``)

The class lists are those of CLIPSelf's ``F-ViT/datasets/mscoco_{seen,unseen,65}_classes.json``.
Other protocols (the testbed's, a user's) join with ``register_protocol``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..plugins import load_plugins

# COCO 2017 category ids of the OV-COCO classes, in CLIPSelf's 65-class order (mscoco_65_classes.json).
OV_COCO_IDS = {
    "person": 1, "bicycle": 2, "car": 3, "motorcycle": 4, "airplane": 5, "bus": 6, "train": 7, "truck": 8,
    "boat": 9, "bench": 15, "bird": 16, "cat": 17, "dog": 18, "horse": 19, "sheep": 20, "cow": 21,
    "elephant": 22, "bear": 23, "zebra": 24, "giraffe": 25, "backpack": 27, "umbrella": 28, "handbag": 31,
    "tie": 32, "suitcase": 33, "frisbee": 34, "skis": 35, "snowboard": 36, "kite": 38, "skateboard": 41,
    "surfboard": 42, "bottle": 44, "cup": 47, "fork": 48, "knife": 49, "spoon": 50, "bowl": 51, "banana": 52,
    "apple": 53, "sandwich": 54, "orange": 55, "broccoli": 56, "carrot": 57, "pizza": 59, "donut": 60,
    "cake": 61, "chair": 62, "couch": 63, "bed": 65, "toilet": 70, "tv": 72, "laptop": 73, "mouse": 74,
    "remote": 75, "keyboard": 76, "microwave": 78, "oven": 79, "toaster": 80, "sink": 81, "refrigerator": 82,
    "book": 84, "clock": 85, "vase": 86, "scissors": 87, "toothbrush": 90,
}
OV_COCO_NOVEL = ("airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard",
                 "skateboard", "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors")
OV_COCO_BASE = tuple(name for name in OV_COCO_IDS if name not in OV_COCO_NOVEL)


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
    ``"coco"`` (AP50 novel/base/all with pycocotools) or ``"lvis"`` (AP, APr/c/f with ``lvis``)."""

    name: str
    evaluator: str
    split: Callable[[Sequence[dict]], Split]


def ov_coco_split(categories: Sequence[dict]) -> Split:
    """The 65 OV-COCO classes; the file must hold them under their COCO ids (names may differ)."""
    present = {c["id"] for c in categories}
    missing = [f"{name} (id {cid})" for name, cid in OV_COCO_IDS.items() if cid not in present]
    if missing:
        raise ValueError(f"the annotation file lacks {len(missing)} OV-COCO categories: {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}; ov-coco expects COCO 2017 category ids")
    names = tuple(OV_COCO_IDS)
    return Split(tuple(OV_COCO_IDS.values()), names, tuple(name in OV_COCO_NOVEL for name in names))


def lvis_class_name(category: dict) -> str:
    """An LVIS category as a prompt noun: ``"bow_(weapon)"`` -> ``"bow weapon"``."""
    return " ".join(category["name"].replace("_", " ").replace("(", " ").replace(")", " ").split())


def ov_lvis_split(categories: Sequence[dict]) -> Split:
    """All LVIS categories in id order; the rare ones (``frequency == "r"``) are novel."""
    without = [c.get("id") for c in categories if c.get("frequency") not in ("r", "c", "f")]
    if without:
        raise ValueError(f"ov-lvis needs LVIS categories with a 'frequency' of r/c/f; "
                         f"{len(without)} lack it (ids {without[:5]})")
    ordered = sorted(categories, key=lambda c: c["id"])
    return Split(tuple(c["id"] for c in ordered), tuple(lvis_class_name(c) for c in ordered),
                 tuple(c["frequency"] == "r" for c in ordered))


PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(protocol: Protocol) -> None:
    """Make ``protocol`` available by name (``--protocol``, ``data.protocol``): the extension point for plug-ins."""
    if protocol.evaluator not in ("coco", "lvis"):
        raise ValueError(f"protocol {protocol.name!r}: evaluator must be 'coco' or 'lvis', got {protocol.evaluator!r}")
    PROTOCOLS[protocol.name] = protocol


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        load_plugins()  # a plug-in's protocol (e.g. the testbed's ov-testbed) registers on first need
    if name not in PROTOCOLS:
        raise ValueError(f"unknown detection protocol {name!r}; expected one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


register_protocol(Protocol("ov-coco", "coco", ov_coco_split))
register_protocol(Protocol("ov-lvis", "lvis", ov_lvis_split))
