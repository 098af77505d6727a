"""DenseRC's self-contained learning testbed: procedural scenes, a tiny CLIP pretrained on them,
and a before/after distillation run that checks DenseRC's claim on a CPU (see docs/testbed.md)."""
from .coco import write_split
from .scenes import Scene, SceneConfig, Segment, render_scene, scene_rng
from .vocabulary import CATEGORIES, CLASS_NAMES, STUFF_CATEGORIES, TEMPLATES, THING_CATEGORIES

__all__ = ["CATEGORIES", "CLASS_NAMES", "STUFF_CATEGORIES", "TEMPLATES", "THING_CATEGORIES", "Scene",
           "SceneConfig", "Segment", "render_scene", "scene_rng", "write_split"]
