"""Package exports imported on first use, so `denserc --help` and argument errors do not load torch.

A package ``__init__`` lists each public name with the submodule that defines it::

    __getattr__, __dir__, __all__ = lazy_exports(__name__, {"create_model": ".factory", ...})

``from denserc.models import create_model`` and ``denserc.models.create_model`` then import
``denserc.models.factory`` at that moment (PEP 562), and ``import denserc.models.variants`` stays light.
"""
from __future__ import annotations

import sys
from importlib import import_module
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]],
                                                                  list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package`` exporting ``name`` from submodule ``exports[name]``."""
    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(exports[name], package), name)
        setattr(sys.modules[package], name, value)  # later look-ups (and monkeypatching) see a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__, sorted(exports)
