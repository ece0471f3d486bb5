"""The names ``TrainConfig(gradients=...)`` accepts: every registered gradient source.

Kept apart from the protocol (``base``) so that the options (``engine.config``) can check
a name without importing what the sources themselves import.
"""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["SOURCES", "register"]

SOURCES: dict[str, Any] = {}  # name -> GradientSource subclass


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a gradient source available as ``gradients=name``.

    Raises:
        ValueError: another source has that name already.
    """
    def add(cls: type) -> type:
        if name in SOURCES:
            raise ValueError(f"a gradient source named {name!r} is registered already ({SOURCES[name].__name__})")
        cls.name = name  # type: ignore[attr-defined]
        SOURCES[name] = cls
        return cls
    return add
