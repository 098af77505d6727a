"""The testbed's class vocabulary: shape x colour "thing" classes and textured "stuff" backgrounds.

Category ids are contiguous from 1 (things first, then stuff), as listed in ``CATEGORIES``; the
per-pixel label maps use the 0-based position in that list (``label = category_id - 1``) and 255
for void, like COCO-Stuff's label PNGs.
"""
from __future__ import annotations

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "ring", "crescent")

# Base colours (RGB) of the thing classes; each object jitters hue, saturation and brightness.
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 185, 70),
    "blue": (40, 80, 225),
    "purple": (150, 55, 205),
}

STUFF = ("grass", "water", "sand", "bricks", "gravel")

# Prompt templates, filled with a class phrase ("a red star", "an orange ring", "grass"): used to
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
    for shape in SHAPES:
        for colour, rgb in COLOURS.items():
            categories.append({"id": len(categories) + 1, "name": f"{colour} {shape}", "supercategory": shape,
                               "isthing": 1, "color": list(rgb), "shape": shape, "colour": colour})
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
THING_ID = {(c["shape"], c["colour"]): c["id"] for c in THING_CATEGORIES}
STUFF_ID = {c["name"]: c["id"] for c in STUFF_CATEGORIES}
CLASS_NAMES = [c["name"] for c in CATEGORIES]


def coco_category(category: dict) -> dict:
    """The category as COCO-panoptic writes it (id, name, supercategory, isthing, color)."""
    return {k: category[k] for k in ("id", "name", "supercategory", "isthing", "color")}


def phrase(category_id: int) -> str:
    """The class as a caption phrase: "a red star", "an orange ring", or a stuff name ("grass")."""
    category = CATEGORY_BY_ID[category_id]
    if not category["isthing"]:
        return category["name"]
    article = "an" if category["name"][0] in "aeiou" else "a"
    return f"{article} {category['name']}"


def label_of(category_id: int) -> int:
    """Per-pixel label (0-based position in ``CATEGORIES``) of a category id."""
    if category_id not in CATEGORY_BY_ID:
        raise KeyError(f"unknown testbed category id {category_id} (expected 1..{len(CATEGORIES)})")
    return category_id - 1
