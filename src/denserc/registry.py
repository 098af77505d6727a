"""One registry type for everything a plug-in can add by name: training data sources, detection protocols,
segmentation datasets, CAT-Seg benchmarks (docs/architecture.md, "Extension points").

A name is looked up as registered; a name no one registered yet is looked for in the plug-ins
(``denserc.plugins.load_plugins``) before it is refused with the known names; a name registered twice is
refused (one policy for duplicates). (VFMs are timm models: timm's own registry holds them, and the VFM
lookup falls back to the plug-ins in the same way.)
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .plugins import load_plugins

T = TypeVar("T")


class Registry(Generic[T]):
    """Named items of one ``kind`` (the word error messages use, e.g. "detection protocol").

    ``spellings(name)`` gives the names a lookup accepts for ``name`` (e.g. ``coco_stuff`` for
    ``coco-stuff``); by default only the name itself.
    """

    def __init__(self, kind: str, spellings: Callable[[str], set[str]] | None = None):
        self.kind = kind
        self._spellings = spellings or (lambda name: {name})
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if self.find(name, plugins=False) is not None:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests that register a temporary item clean up with it)."""
        self._items.pop(name, None)

    def find(self, name: str, plugins: bool = True) -> str | None:
        """The registered name ``name`` stands for, loading the plug-ins first if no one registered it; None if
        there is none."""
        found = self._match(name)
        if found is None and plugins:
            load_plugins()
            found = self._match(name)
        return found

    def get(self, name: str) -> T:
        found = self.find(name)
        if found is None:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self._items)}")
        return self._items[found]

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(list(self._items.items()))

    def __contains__(self, name: str) -> bool:
        return self._match(name) is not None

    def _match(self, name: str) -> str | None:
        spellings = self._spellings(name)
        return next((registered for registered in self._items if registered in spellings), None)
