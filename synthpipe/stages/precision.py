"""Mixed precision for one stage: the autocast region of its forward and its fp16 gradient scaler.

A stage trained in ``"bf16"`` or ``"fp16"`` keeps fp32 weights and optimizer state; its
forward (and loss) runs under ``torch.autocast(device_type, dtype)``, entered afresh at
every step. A fresh region per step matters: autocast caches the low-precision copy of
each weight for the whole region, so one region around many steps would keep using the
first step's weights after every optimizer step.

fp16 gradients underflow, so ``"fp16"`` also gives each stage its own
:class:`torch.amp.GradScaler`. With synthetic gradients the scale is applied where the
stage's backward starts (the loss on the last stage, the output gradient elsewhere) and
taken off everything that leaves the backward: the parameter gradients before the step
(and before clipping), the input gradient before it is sent to stage r - 1. What travels
between stages and what the synthesizers regress is always unscaled (docs/guide.md,
"Mixed precision").
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch

__all__ = ["PRECISIONS", "autocast_dtype", "autocast", "make_scaler", "to_float32", "user_autocast"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (``None`` for fp32).

    Raises:
        ValueError: ``precision`` is not one of ``"fp32"``, ``"bf16"``, ``"fp16"``.
    """
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}") from None


def autocast(device: torch.device, precision: str) -> Any:
    """A fresh autocast region for one forward on ``device`` (a no-op context for fp32)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """The gradient scaler of a stage trained in ``precision`` on ``device`` (fp16 only)."""
    if autocast_dtype(precision) is not torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def to_float32(tensors: Sequence[Any]) -> tuple:
    """``tensors`` with every bf16/fp16 tensor cast to fp32 (what fp32 synthesizers take)."""
    return tuple(t.float() if torch.is_tensor(t) and t.dtype in (torch.float16, torch.bfloat16) else t
                 for t in tensors)


def user_autocast(device_types: Sequence[str]) -> str | None:
    """The device type of an enclosing ``torch.autocast`` region, if the caller is in one."""
    for device_type in dict.fromkeys(device_types):
        try:
            if torch.is_autocast_enabled(device_type):
                return device_type
        except (RuntimeError, TypeError):  # a device type autocast does not know
            continue
    return None
