"""DenseRC's learning testbed, a plug-in of ``denserc``: procedural scenes, a tiny CLIP pretrained on them,
and a before/after distillation run that checks DenseRC's claim on a CPU (see docs/testbed.md).

The package plugs into the core only through its public extension points (``plugin.register``, found
through the ``denserc.plugins`` entry point): the open_clip config ``ViT-Testbed-P8`` and its pretrained
tag ``testbed``, the timm model ``testbed_appearance`` (the VFM), the training data type ``testbed``,
the segmentation dataset ``testbed`` and the commands ``denserc testbed``, ``pretrain-testbed`` and
``testbed-probe``. ``import denserc`` does not import it; the core loads it the first time it looks up
one of those names.
"""
from .coco import write_split
from .scenes import Scene, SceneConfig, Segment, render_scene, scene_rng
from .tiny_clip import MODEL_NAME, PRETRAINED_TAG, pretrain_record, pretrained_path
from .vocabulary import CATEGORIES, CLASS_NAMES, STUFF_CATEGORIES, TEMPLATES, THING_CATEGORIES

__all__ = ["CATEGORIES", "CLASS_NAMES", "MODEL_NAME", "PRETRAINED_TAG", "STUFF_CATEGORIES", "TEMPLATES",
           "THING_CATEGORIES", "Scene", "SceneConfig", "Segment", "pretrain_record", "pretrained_path",
           "render_scene", "scene_rng", "write_split"]
