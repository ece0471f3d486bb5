"""Named learning-rate schedules, for where a lambda cannot be written (the command line, TOML).

``Trainer(lr_scheduler=...)`` takes any ``optimizer -> scheduler`` factory; this module
makes the usual ones::

    trainer = sp.Trainer(stages, loss_fn, lr_scheduler=named_schedule("cosine", total_steps=1000,
                                                                      warmup_steps=100))

The factor on the base learning rate at step ``t`` (``W`` warmup steps, ``T`` total):

* warmup, ``t < W``: ``(t + 1) / (W + 1)``, rising linearly towards 1;
* then, with ``p = (t - W) / max(T - W, 1)`` clamped to [0, 1]: ``"constant"`` 1,
  ``"linear"`` ``1 - p`` (0 at step T), ``"cosine"`` ``(1 + cos(pi p)) / 2`` (0 at step T).

``warmup_steps`` here warms the learning rate up; it is not :class:`TrainConfig`'s
``warmup_steps``, which are steps trained on true gradients.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

__all__ = ["SCHEDULES", "named_schedule", "lr_factor"]

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(name: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The factor on the base learning rate at ``step`` (see the module's docstring)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if name == "constant":
        return 1.0
    progress = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    if name == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class _Factor:
    """A picklable ``step -> factor`` for ``LambdaLR``."""

    def __init__(self, name: str, total_steps: int, warmup_steps: int):
        self.name, self.total_steps, self.warmup_steps = name, total_steps, warmup_steps

    def __call__(self, step: int) -> float:
        return lr_factor(self.name, step, self.total_steps, self.warmup_steps)


def named_schedule(name: str, total_steps: int, warmup_steps: int = 0) -> Callable[[torch.optim.Optimizer], Any]:
    """An ``optimizer -> LambdaLR`` factory for ``Trainer(lr_scheduler=...)``.

    Args:
        name: ``"constant"``, ``"linear"`` or ``"cosine"``.
        total_steps: the step at which ``linear`` and ``cosine`` reach 0 (the run's length).
        warmup_steps: steps of linear learning-rate warmup first.

    Raises:
        ValueError: an unknown name, or counts that are not whole numbers >= 0 (``total_steps`` >= 1).
    """
    if name not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {', '.join(SCHEDULES)}; got {name!r}")
    for what, value, least in (("total_steps", total_steps, 1), ("warmup_steps", warmup_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"the lr schedule's {what} must be a whole number >= {least}; got {value!r}")
    factor = _Factor(name, total_steps, warmup_steps)

    def make(optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return make
