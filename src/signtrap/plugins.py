"""Registries that fill themselves on import, in the style of timm's `@register_model`.

A plugin is one file: a module inside the registry's package that registers itself when imported.
`Registry.load()` imports every module of that package (and the entry points of the group
`signtrap.<kind>s`, for plugins installed by other packages), so adding a plugin never means editing a
list elsewhere. A plugin defined anywhere else (a test module, a notebook) is registered the moment its
module runs `register(...)`.

This module imports no feature package at import time: `signtrap.config` validates the `defend:` section
through `DEFENCES` (`trigger:` through `TRIGGERS`, `data:` through `DATASETS`, `attack.persist` through `ATTACKS`, `model.name` through `MODELS`) without importing the feature packages themselves.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from typing import Generic, Iterator, TypeVar

from signtrap.errors import SigntrapError, unknown

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> plugin, in registration order; `package`'s modules are imported on first use."""

    def __init__(self, kind: str, package: str):
        self.kind, self.package = kind, package
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str, item: T) -> T:
        if not name or name != name.strip() or "." in name or "=" in name or "," in name:
            raise SigntrapError(f"{self.kind} name '{name}' must be non-empty without spaces, '.', '=' or ','")
        old = self._items.get(name)
        if old is not None and getattr(old, "module", None) != getattr(item, "module", None):
            raise SigntrapError(f"{self.kind} '{name}' is registered twice ({getattr(old, 'module', '?')} and "
                                f"{getattr(item, 'module', '?')})")
        self._items[name] = item
        return item

    def load(self) -> None:
        """Import every module of the package once (registering its plugins), then installed entry points."""
        if self._loaded:
            return
        self._loaded = True  # set first: a plugin module may itself look names up while importing
        package = importlib.import_module(self.package)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")
        for entry in importlib.metadata.entry_points(group=f"signtrap.{self.kind}s"):
            entry.load()

    def get(self, name: str) -> T:
        self.load()
        if name not in self._items:
            raise unknown(self.kind, name, self._items)
        return self._items[name]

    def names(self) -> list[str]:
        """Registered names, sorted: the same order whichever module registered first."""
        self.load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self.load()
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        self.load()
        return iter(list(self._items.values()))


DEFENCES: Registry = Registry("defence", "signtrap.defences")
TRIGGERS: Registry = Registry("trigger", "signtrap.triggers")
DATASETS: Registry = Registry("dataset", "signtrap.datasets")
ATTACKS: Registry = Registry("attack", "signtrap.attacks")
MODELS: Registry = Registry("model", "signtrap.models")


def register_model(fn):
    """timm's decorator: a function `fn(num_classes, dropout, **kw) -> nn.Module`, registered under its own name."""
    MODELS.register(fn.__name__, fn)
    return fn
