"""Training methods: ``METHODS`` registry and ``create(name, **hparams) -> Method`` (docs/ARCHITECTURE.md)."""

from __future__ import annotations

from typing import Any

from greg.methods._registry import METHODS
from greg.methods.base import Batch, Method
from greg.registry import import_package_modules

import_package_modules(__name__, __path__)  # each method module registers itself

__all__ = ["METHODS", "Batch", "Method", "create", "names"]


def create(name: str, **hparams: Any) -> Method:
    """The method ``name`` with its ``defaults`` updated by ``hparams``.

    Raises ``KeyError`` for an unknown method (listing the known ones) and ``ValueError`` for an unknown
    hparam key or a bad value (naming the key and what was expected).
    """
    return METHODS.get(name)(**hparams)


def names() -> list[str]:
    return METHODS.names()
