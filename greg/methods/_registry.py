"""The method registry, kept apart from ``__init__`` so method files can import it without a cycle."""

from __future__ import annotations

from greg.methods.base import Method
from greg.registry import Registry

METHODS: Registry[Method] = Registry("method", name_attr="name")  # Method.name = its key
