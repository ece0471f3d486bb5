"""The gradient-source plug-in: where a stage's output gradient comes from at each step.

A stage's update at step t needs ``dL/dh_r`` for its output ``h_r``. Where that gradient
comes from is the only thing the update-unlocked methods differ in, so it is one small
object per stage, driven by :class:`synthpipe.engine.step.StageStep` in both runners
(one process or one process per stage) and in the benchmark's no-transfer ceiling.

The last stage never asks its source for a gradient: it backpropagates its loss. Every
other stage, at every step, either

* takes the gradient from its source at once (:meth:`GradientSource.gradient`): the
  stage is *update-unlocked*, or
* waits for the gradient that stage r + 1 sends back for this very step
  (:meth:`GradientSource.waits` is true): the stage is *locked* at that step.

Whatever stage r + 1 sends back reaches :meth:`GradientSource.received` (a synthesizer's
regression target, say), and after its update the stage gives its source
:meth:`GradientSource.after_update`, where it may train on what arrived.

A new source is one module in this package: a subclass registered with
:func:`register`, plus its tests.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from ...stages.stage import Stage

if TYPE_CHECKING:  # (config imports the registry: no import at run time)
    from ..config import TrainConfig

__all__ = ["GradientSource", "register", "SOURCES", "make_source"]

SOURCES: dict[str, type["GradientSource"]] = {}


def register(name: str) -> Callable[[type["GradientSource"]], type["GradientSource"]]:
    """Class decorator: make a :class:`GradientSource` available as ``gradients=name``."""
    def add(cls: type[GradientSource]) -> type[GradientSource]:
        if name in SOURCES:
            raise ValueError(f"a gradient source named {name!r} is registered already ({SOURCES[name].__name__})")
        cls.name = name
        SOURCES[name] = cls
        return cls
    return add


class GradientSource:
    """The gradient source of one stage (one instance per stage, never shared).

    Args:
        stage: the stage it serves.
        config: the trainer's options (``delay``, ``max_inflight``, ``warmup_steps``, ...).

    Class attributes:
        name: the ``gradients=`` value it is registered under.
        sends_back: stage r + 1 sends its input gradient back to stage r at every step
            (``False``: nothing travels backward, and no gradient channel is used).
    """

    name: ClassVar[str] = ""
    sends_back: ClassVar[bool] = True
    replicas: Any = None
    """Set by a data-parallel runner: the stage's :class:`~synthpipe.engine.data_parallel.Replicas`.
    A source whose work differs between replicas (how many targets it trains on) agrees
    through it; ``None``: one replica."""

    def __init__(self, stage: Stage, config: "TrainConfig"):
        self.stage = stage
        self.config = config

    def waits(self, step: int) -> bool:
        """Does this stage's update at ``step`` wait for stage r + 1's gradient of ``step``?"""
        return False

    def seen(self, step: int, outputs: tuple, y: Any) -> None:
        """This stage's forward of ``step`` produced ``outputs`` (called before they are sent)."""

    def gradient(self, step: int, outputs: tuple, y: Any) -> tuple:
        """The output gradient to step on now (one entry per output, ``None`` where none flows)."""
        raise NotImplementedError(f"the {self.name!r} source cannot give a gradient without waiting")

    def received(self, step: int, grads: tuple, skipped: bool) -> None:
        """Stage r + 1 sent back ``grads`` for ``step`` (``skipped``: it skipped that step)."""

    def after_update(self, step: int, wait_for: Callable[[int], None]) -> dict[str, float]:
        """After this stage's update at ``step`` (or its skipped step); returns values to log.

        ``wait_for(s)`` blocks until stage r + 1's message of step ``s`` has been received.
        """
        return {}

    def in_flight(self) -> int:
        """Steps whose message from stage r + 1 this source still keeps state for."""
        return 0

    def state_dict(self) -> Any:
        """What a checkpoint must hold to resume exactly (JSON-free: tensors allowed)."""
        return []

    def load_state_dict(self, state: Any, device: torch.device) -> None:
        """Restore :meth:`state_dict`'s output."""


def make_source(stage: Stage, config: "TrainConfig") -> GradientSource:
    """The source ``config.gradients`` names, for ``stage``.

    Raises:
        ValueError: no source of that name is registered.
    """
    try:
        cls = SOURCES[config.gradients]
    except KeyError:
        raise ValueError(f"gradients must be one of {tuple(SOURCES)}, got {config.gradients!r}") from None
    return cls(stage, config)
