"""DenseRC's learning testbed, a plug-in of ``denserc``: procedural scenes, a tiny CLIP pretrained on them,
and a before/after distillation run that checks DenseRC's claim on a CPU (see docs/testbed.md).

The package plugs into the core only through its public extension points (``plugin.register``, found
through the ``denserc.plugins`` entry point): the open_clip config ``ViT-Testbed-P8`` and its pretrained
tag ``testbed``, the timm model ``testbed_appearance`` (the VFM), the training data type ``testbed``,
the segmentation dataset ``testbed`` and the commands ``denserc testbed``, ``pretrain-testbed`` and
``testbed-probe``. ``import denserc`` does not import it; the core loads it the first time it looks up
one of those names.
"""
from denserc.lazy import lazy_exports

# imported on first use: the `denserc` command line imports .plugin and .cli, which must not load torch
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "write_split": ".coco", "Scene": ".scenes", "SceneConfig": ".scenes", "Segment": ".scenes",
    "render_scene": ".scenes", "scene_rng": ".scenes", "MODEL_NAME": ".tiny_clip", "PRETRAINED_TAG": ".tiny_clip",
    "pretrain_record": ".tiny_clip", "pretrained_path": ".tiny_clip", "CATEGORIES": ".vocabulary",
    "CLASS_NAMES": ".vocabulary", "STUFF_CATEGORIES": ".vocabulary", "TEMPLATES": ".vocabulary",
    "THING_CATEGORIES": ".vocabulary"})
