"""Plug-ins: installed packages that add models, VFMs, training data types, evaluation datasets and commands.

A plug-in declares a Python entry point in the group ``denserc.plugins`` naming a function that takes
no arguments, e.g. in its ``pyproject.toml``::

    [project.entry-points."denserc.plugins"]
    my_plugin = "my_plugin.plugin:register"

``register()`` makes its additions through the public extension points (docs/architecture.md):
``denserc.models.register_pretrained``, timm's ``register_model``, ``denserc.data.register_source`` and
``denserc.eval.register_segmentation_dataset``. The module of the entry point may also define
``add_commands(subparsers)``: the ``denserc`` command line imports the module and calls it, without calling
``register()``, to add the plug-in's subcommands; that module must therefore import no heavy package
(torch, open_clip, timm) at its top, so that ``denserc --help`` stays instant.

Plug-ins are loaded lazily: ``import denserc`` loads none. The core calls ``load_plugins()`` only when
a name it looks up is unknown (an open_clip model or pretrained tag, a VFM, a data type, an evaluation
dataset); each plug-in is registered once per process.
"""
from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points
from typing import Callable

ENTRY_POINT_GROUP = "denserc.plugins"
COMMANDS_FUNCTION = "add_commands"  # optional, in the entry point's module: adds the plug-in's subcommands

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


def plugin_commands() -> list[Callable]:
    """Each installed plug-in's ``add_commands(subparsers)`` (from its entry point's module; no registration)."""
    adders = []
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            module = import_module(entry_point.module)
        except Exception as error:
            raise RuntimeError(f"denserc plug-in '{entry_point.name}' ({entry_point.value}, entry point group "
                               f"'{ENTRY_POINT_GROUP}') cannot be imported: {type(error).__name__}: {error}"
                               ) from error
        if hasattr(module, COMMANDS_FUNCTION):
            adders.append(getattr(module, COMMANDS_FUNCTION))
    return adders
