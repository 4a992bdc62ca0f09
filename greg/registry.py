"""One tiny registry class, used once per kind of thing (models, methods, detectors, datasets, ...)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from greg.errors import did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a name to a factory. ``create`` fails with the list of known names (and a suggestion)."""

    def __init__(self, kind: str, name_attr: str | None = None):
        self.kind = kind
        # Set on each registered class to its registry key (so the class does not repeat it).
        self.name_attr = name_attr
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = factory
            if self.name_attr is not None:
                setattr(factory, self.name_attr, name)
            return factory

        return deco

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self._items)}; known: {', '.join(sorted(self._items))}"
            ) from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


def import_package_modules(package: str, path: Iterable[str]) -> None:
    """Import every public module of ``package`` (its ``__path__``) so each registers what it defines: a new
    method or detector is one file, with no import line to add elsewhere."""
    for info in sorted(pkgutil.iter_modules(list(path)), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
