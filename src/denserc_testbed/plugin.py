"""The testbed as a ``denserc`` plug-in: everything it adds to the core, through the core's public extension
points (the same a user's own plug-in would use; docs/architecture.md).

``register`` is the ``denserc.plugins`` entry point (pyproject.toml); the core calls it once, the first
time it looks up a name it does not know. ``add_commands`` is what the ``denserc`` command line takes from
this module to build its parser; like the module's own imports, it loads no torch (`denserc --help`
answers at once), so the heavy imports sit inside the functions.
"""
from __future__ import annotations

from .tiny_clip import MODEL_NAME, PRETRAINED_TAG

# `denserc segment` / `heatmap` without --model: the shipped tiny CLIP, un-distilled.
DEFAULT_MODEL = f"{MODEL_NAME}:{PRETRAINED_TAG}"
# `denserc train` without a CONFIG runs the testbed's before/after run; its training config (what
# --print-config and --resume read then) is the core's shipped config `testbed`.
DEFAULT_CONFIG = "testbed"


def register() -> None:
    """Add the tiny CLIP and its tag, the appearance VFM, the data type, the dataset, the detection split and the
    analysis data."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from timm.models import register_model

    from denserc.analysis import register_analysis_data
    from denserc.data import register_source
    from denserc.detect.protocols import register_protocol
    from denserc.eval import register_segmentation_dataset
    from denserc.models import register_pretrained

    from .analysis_data import build_analysis_data
    from .appearance_vfm import testbed_appearance
    from .detection import OV_TESTBED
    from .evaluation import LAYOUT, protocol
    from .scenes import SceneConfig
    from .source import build_testbed_source
    from .tiny_clip import CONFIG_FILE, WEIGHTS_DIR, WEIGHTS_FILE

    register_pretrained(MODEL_NAME, PRETRAINED_TAG, WEIGHTS_DIR / WEIGHTS_FILE, config=CONFIG_FILE,
                        mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    register_model(testbed_appearance)
    register_source("testbed")(build_testbed_source)
    register_segmentation_dataset(LAYOUT, protocol(SceneConfig().image_size))
    register_protocol(OV_TESTBED)
    register_analysis_data(MODEL_NAME, build_analysis_data)


def add_commands(subparsers) -> None:
    """The testbed's commands (`denserc testbed`, `pretrain-testbed`, ...) and its defaults of core commands."""
    from . import cli
    cli.register(subparsers)
    subparsers.choices["train"].set_defaults(default_run=default_train_run, default_config=DEFAULT_CONFIG)
    for command in ("segment", "heatmap"):
        subparsers.choices[command].set_defaults(model=DEFAULT_MODEL)


def default_train_run(overrides: list[str]) -> int:
    """`denserc train [KEY=VALUE ...]` with no CONFIG: the testbed's before/after run with those overrides."""
    from . import run
    return run.run_and_print(overrides=overrides)
