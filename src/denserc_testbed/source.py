"""``data.type: testbed``: training images rendered in-process by the scene generator (no files).

Scene ``i`` is ``render_scene(scene_rng(data.seed, i))``; ``data.options`` holds ``SceneConfig``
fields (e.g. ``{max_objects: 8}``). Labels are never read: DenseRC's distillation is label-free.
"""
from __future__ import annotations

from dataclasses import fields

from PIL import Image

from .scenes import SceneConfig, render_scene, scene_rng


class TestbedScenes:
    """An ``ImageSource`` of generated scenes."""

    def __init__(self, num_images: int, seed: int, config: SceneConfig = SceneConfig()):
        if num_images < 1:
            raise ValueError(f"data.num_images must be at least 1 for data.type=testbed, got {num_images}")
        self.num_images = num_images
        self.seed = seed
        self.config = config

    def __len__(self) -> int:
        return self.num_images

    def describe(self, index: int) -> str:
        return f"testbed scene {index} (seed {self.seed})"

    def open(self, index: int) -> Image.Image:
        return Image.fromarray(render_scene(scene_rng(self.seed, index), self.config).image)


def build_testbed_source(data_config) -> TestbedScenes:
    """The builder the plug-in registers as ``data.type: testbed``."""
    known = {f.name for f in fields(SceneConfig)}
    unknown = sorted(set(data_config.options) - known)
    if unknown:
        raise ValueError(f"data.options: unknown scene setting '{unknown[0]}' for data.type=testbed; "
                         f"valid settings: {sorted(known)}")
    return TestbedScenes(data_config.num_images, data_config.seed, SceneConfig(**data_config.options))
