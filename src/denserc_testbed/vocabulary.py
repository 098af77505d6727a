"""The testbed's class vocabulary: colour x surface-pattern "thing" classes and textured "stuff" backgrounds.

A thing's class is its colour and its surface pattern, both visible in every part of it (as a real
object's class shows in its parts: fur, wheels, leaves); its outline shape is drawn at random from
``SHAPES`` and is not part of its class.

Category ids are contiguous from 1 (things first, then stuff), as listed in ``CATEGORIES``; the
per-pixel label maps use the 0-based position in that list (``label = category_id - 1``) and 255
for void, like COCO-Stuff's label PNGs.
"""
from __future__ import annotations

# Surface patterns of the thing classes (docs/testbed.md draws them): dark marks on the object's colour.
PATTERNS = ("solid", "striped", "dotted", "checkered", "zigzag", "hatched")

# Base colours (RGB) of the thing classes; each object jitters hue, saturation and brightness.
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 185, 70),
    "cyan": (30, 200, 200),
    "blue": (40, 80, 225),
    "purple": (150, 55, 205),
    "pink": (240, 90, 180),
}

# Outline shapes: an attribute of every object, drawn at random, not part of its class.
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "ring", "crescent")

STUFF = ("grass", "water", "sand", "bricks", "gravel")

# Prompt templates, filled with a class phrase ("a red striped object", "grass"): used to
# caption crops during pretraining and averaged into the zero-shot classifiers.
TEMPLATES = (
    "a photo of {}.",
    "a picture of {}.",
    "a rendering of {}.",
    "{}.",
)

VOID_LABEL = 255


def _build_categories() -> list[dict]:
    categories = []
    for pattern in PATTERNS:
        for colour, rgb in COLOURS.items():
            categories.append({"id": len(categories) + 1, "name": f"{colour} {pattern}", "supercategory": pattern,
                               "isthing": 1, "color": list(rgb), "pattern": pattern, "colour": colour})
    stuff_colours = {"grass": (70, 140, 50), "water": (40, 100, 180), "sand": (215, 190, 140),
                     "bricks": (165, 70, 50), "gravel": (130, 130, 125)}
    for name in STUFF:
        categories.append({"id": len(categories) + 1, "name": name, "supercategory": "background",
                           "isthing": 0, "color": list(stuff_colours[name])})
    return categories


CATEGORIES = _build_categories()
THING_CATEGORIES = [c for c in CATEGORIES if c["isthing"]]
STUFF_CATEGORIES = [c for c in CATEGORIES if not c["isthing"]]
CATEGORY_BY_ID = {c["id"]: c for c in CATEGORIES}
THING_ID = {(c["pattern"], c["colour"]): c["id"] for c in THING_CATEGORIES}
STUFF_ID = {c["name"]: c["id"] for c in STUFF_CATEGORIES}
CLASS_NAMES = [c["name"] for c in CATEGORIES]


def coco_category(category: dict) -> dict:
    """The category as COCO-panoptic writes it (id, name, supercategory, isthing, color)."""
    return {k: category[k] for k in ("id", "name", "supercategory", "isthing", "color")}


def phrase(category_id: int) -> str:
    """The class as a caption phrase: "a red striped object", "an orange dotted object", or a stuff name."""
    category = CATEGORY_BY_ID[category_id]
    if not category["isthing"]:
        return category["name"]
    article = "an" if category["name"][0] in "aeiou" else "a"
    return f"{article} {category['name']} object"


def label_of(category_id: int) -> int:
    """Per-pixel label (0-based position in ``CATEGORIES``) of a category id."""
    if category_id not in CATEGORY_BY_ID:
        raise KeyError(f"unknown testbed category id {category_id} (expected 1..{len(CATEGORIES)})")
    return category_id - 1
