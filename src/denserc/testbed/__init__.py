"""DenseRC's self-contained learning testbed: procedural scenes, a tiny CLIP pretrained on them,
and a before/after distillation run that checks DenseRC's claim on a CPU (see docs/testbed.md).

Importing the package registers its pieces with the libraries that look them up by name: the
open_clip config ``ViT-Testbed-P8`` and its pretrained tag ``testbed``, the timm model
``testbed_appearance`` (the VFM), the training data type ``testbed`` and the segmentation dataset
``testbed``.
"""
from . import appearance_vfm, detection, evaluation, source  # noqa: F401  (registrations)
from .coco import write_split
from .scenes import Scene, SceneConfig, Segment, render_scene, scene_rng
from .tiny_clip import MODEL_NAME, PRETRAINED_TAG, pretrain_record, pretrained_path
from .vocabulary import CATEGORIES, CLASS_NAMES, STUFF_CATEGORIES, TEMPLATES, THING_CATEGORIES

__all__ = ["CATEGORIES", "CLASS_NAMES", "MODEL_NAME", "PRETRAINED_TAG", "STUFF_CATEGORIES", "TEMPLATES",
           "THING_CATEGORIES", "Scene", "SceneConfig", "Segment", "pretrain_record", "pretrained_path",
           "render_scene", "scene_rng", "write_split"]
