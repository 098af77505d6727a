"""Plug-ins: installed packages that add models, VFMs, training data types, evaluation datasets and commands.

A plug-in declares a Python entry point in the group ``denserc.plugins`` naming a function that takes
no arguments, e.g. in its ``pyproject.toml``::

    [project.entry-points."denserc.plugins"]
    my_plugin = "my_plugin.plugin:register"

``register()`` makes its additions through the public extension points (docs/architecture.md):
``denserc.models.register_pretrained``, timm's ``register_model``, ``denserc.data.register_source``,
``denserc.eval.register_segmentation_dataset`` and ``denserc.cli.register_commands``.

Plug-ins are loaded lazily: ``import denserc`` loads none. The core calls ``load_plugins()`` only when
a name it looks up is unknown (an open_clip model or pretrained tag, a VFM, a data type, an evaluation
dataset) and when the ``denserc`` command line is built; each plug-in is registered once per process.
"""
from __future__ import annotations

from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "denserc.plugins"

_loaded: dict[str, str] = {}  # entry point name -> its value ("module:function")


def load_plugins() -> dict[str, str]:
    """Register every installed plug-in not registered yet; returns all registered ones (name -> target)."""
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in _loaded:
            continue
        _loaded[entry_point.name] = entry_point.value  # first, so a plug-in's own lookups do not recurse
        try:
            register = entry_point.load()
            register()
        except Exception as error:
            raise RuntimeError(f"denserc plug-in '{entry_point.name}' ({entry_point.value}, entry point group "
                               f"'{ENTRY_POINT_GROUP}') failed to register: {type(error).__name__}: {error}"
                               ) from error
    return dict(_loaded)
