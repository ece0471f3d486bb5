"""The values that cross a stage boundary: one convention, one way to show them.

A boundary is always a tuple: a stage's output becomes the next stage's positional
inputs, so a single tensor travels as a 1-tuple (:func:`as_tuple`). Error messages show
a boundary by shape and dtype only (:func:`describe`), never by value.

This module imports nothing from the rest of the package, so :mod:`.split`,
:mod:`.trace` and :mod:`.stage` can all use it without importing each other.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["as_tuple", "describe"]


def as_tuple(x: Any) -> tuple:
    """A boundary value as a tuple (a tensor becomes a 1-tuple; a list becomes a tuple)."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def describe(tensors: Sequence[Any]) -> str:
    """Shapes and dtypes of a boundary, for error messages (never a whole value).

    Args:
        tensors: the boundary's values; tensors show as ``(4, 8):float32``, arrays by
            shape, dicts by key and shape, lists and tuples by length, anything else by a repr cut to 60 characters.
            At most 8 values are shown, then the count.

    Returns:
        One line, e.g. ``"(4, 8):float32, (4,):int64"``.
    """
    shown = ", ".join(_describe_one(t) for t in tensors[:8])
    return shown if len(tensors) <= 8 else f"{shown}, ... ({len(tensors)} values)"


def _describe_one(t: Any) -> str:
    if torch.is_tensor(t):
        return f"{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}"
    shape = getattr(t, "shape", None)
    if shape is not None:  # numpy arrays and the like
        return f"{type(t).__name__} of shape {tuple(shape)}"
    if isinstance(t, dict):  # keyword inputs: {input_ids: (4, 16):int64, ...}
        shown = ", ".join(f"{k}: {_describe_one(v) if torch.is_tensor(v) else type(v).__name__}"
                          for k, v in list(t.items())[:8])
        return "{" + shown + (", ..." if len(t) > 8 else "") + "}"
    if isinstance(t, (list, tuple)):
        return f"{type(t).__name__} of {len(t)}"
    text = repr(t)
    return text if len(text) <= 60 else f"{type(t).__name__} {text[:40]}..."
