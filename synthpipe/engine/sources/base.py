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

Three hooks let a source change more than where the gradient comes from:
:meth:`GradientSource.forward_parameters` (the weights the forward runs with: weight
stashing), :meth:`GradientSource.early` (work between the forward and any wait: a local
loss whose input gradient goes back at once) and, with ``owns_update``,
:meth:`GradientSource.update` (the whole update of a step: one that applies an older
step's gradient), with :meth:`GradientSource.finish` to send back, when a fit ends,
what it would otherwise send only in later steps. Sources that use none of them run the engine's own update unchanged.

A new source is one module in this package: a subclass registered with
:func:`register`, plus its tests.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Protocol

import torch

from ...stages.stage import Stage
from ..metrics import Timers
from .registry import SOURCES, register

if TYPE_CHECKING:  # (config imports the registry: no import at run time)
    from ..config import TrainConfig

__all__ = ["GradientSource", "Links", "Begun", "StepRunner", "register", "SOURCES", "make_source",
           "nonfinite_message"]

def nonfinite_message(stage: Stage, what: str, step: int, value: Any = None) -> str:
    """The error for a NaN/inf ``what`` (a loss, a gradient) of ``stage`` at ``step``."""
    shown = f" ({float(value.detach())})" if value is not None else ""
    return (f"{stage.name}: {what} is not finite{shown} at step {step}; lower the learning rate "
            f"or the synthetic-gradient scale, or pass nonfinite='skip' to skip such steps")


class Links(Protocol):
    """How a stage's step reaches its neighbours (channels, a hand-off in one process, nothing)."""

    def send_activation(self, step: int, outputs: tuple, y: Any) -> None:
        """Hand ``outputs`` (and the labels) of ``step`` to stage r + 1."""

    def send_gradient(self, step: int, grads: tuple, skipped: bool) -> None:
        """Hand the input gradient of ``step`` to stage r - 1 (``skipped``: none, the step was skipped)."""

    def wait_gradient(self, step: int) -> tuple[tuple, bool]:
        """Block until stage r + 1's gradient of ``step`` is here: ``(grads, skipped)``."""

    def wait_received(self, step: int) -> None:
        """Block until stage r + 1's message of ``step`` has been given to the source."""

    def poll(self) -> None:
        """Give the source every message from stage r + 1 that has arrived (never blocks)."""


@dataclasses.dataclass
class Begun:
    """A step after its forward: what its update needs."""

    step: int
    inputs: tuple
    outputs: tuple
    y: Any
    loss: torch.Tensor | None = None  # the last stage's


class StepRunner(Protocol):
    """What a source may use of the :class:`~synthpipe.engine.step.StageStep` driving it."""

    timers: Timers
    links: Links
    has_previous: bool

    def send_back(self, step: int, grads: tuple, skipped: bool) -> None:
        """Send the input gradient of ``step`` to stage r - 1 (where this source sends any)."""

    def reduce(self, step: int, ok: bool) -> bool:
        """Average the stage's parameter gradients over its data-parallel replicas before an update.

        A source that runs the update itself calls it once per update, on every replica
        alike (``ok=False``: this replica has no gradient to give, and every replica then
        skips the update). Returns whether the update goes ahead; with one replica, ``ok``.
        """


class GradientSource:
    """The gradient source of one stage (one instance per stage, never shared).

    Args:
        stage: the stage it serves.
        config: the trainer's options (``delay``, ``max_inflight``, ``warmup_steps``, ...).

    Class attributes:
        name: the ``gradients=`` value it is registered under.
        sends_back: stage r + 1 sends its input gradient back to stage r at every step
            (``False``: nothing travels backward, and no gradient channel is used).
        owns_update: the source runs a step's update itself (:meth:`update`).
        uses_delay: ``delay=`` means something for this source (``False``: it is refused).
        default_delay: the delay the single-process trainer models when ``delay=None``
            (``None``: the engine's default, ``DEFAULT_DELAY``).
        staleness_modes: the ``staleness=`` corrections the source takes (none by default).
        sporadic_updates: the engine's own update runs every step, so ``p_update < 1`` can
            skip it (``False``: refused).
        uses_synthesizer: the stages step on their synthesizers' predictions (the
            ``synthesizer=`` recipe, conditional on the labels for cDNI, means something).
    """

    name: ClassVar[str] = ""
    sends_back: ClassVar[bool] = True
    owns_update: ClassVar[bool] = False
    uses_delay: ClassVar[bool] = True
    default_delay: ClassVar[Optional[int]] = None
    staleness_modes: ClassVar[tuple[str, ...]] = ()
    sporadic_updates: ClassVar[bool] = False
    uses_synthesizer: ClassVar[bool] = False
    replicas: Any = None
    """Set by a data-parallel runner: the stage's :class:`~synthpipe.engine.data_parallel.Replicas`.
    A source whose work differs between replicas (how many targets it trains on) agrees
    through it; ``None``: one replica."""

    def __init__(self, stage: Stage, config: "TrainConfig"):
        self.stage = stage
        self.config = config

    @classmethod
    def check(cls, config: "TrainConfig", n_stages: int, aux_head: Any = None) -> None:
        """Refuse, by name, options this source cannot run with (called on every rank alike).

        Raises:
            ValueError: naming the option and the source.
        """

    def waits(self, step: int) -> bool:
        """Does this stage's update at ``step`` wait for stage r + 1's gradient of ``step``?"""
        return False

    def forward_parameters(self, step: int) -> Optional[dict[str, torch.Tensor]]:
        """The parameters the training forward of ``step`` runs with (``None``: the module's own)."""
        return None

    def early(self, runner: "StepRunner", begun: "Begun") -> None:
        """After the forward of ``begun`` and before any wait (the runner's links and stage are at hand)."""

    def update(self, runner: "StepRunner", begun: "Begun", downstream: Optional[tuple[tuple, bool]]) -> None:
        """The update of a step, where ``owns_update``: backward, send back, optimizer step."""
        raise NotImplementedError(f"the {self.name!r} source does not run its own update")

    def finish(self, runner: "StepRunner") -> None:
        """The fit ends (the pipeline drains): send back now whatever stage r - 1 would get later.

        Called before the stage collects its last messages from stage r + 1, each of which
        still reaches :meth:`received`; after the drain nothing may be left in flight.
        """

    def check_state(self, state: Any) -> None:
        """Refuse, naming the stage, a saved :meth:`state_dict` this source cannot load; changes nothing."""
        if isinstance(state, dict) and state.get("source", self.name) != self.name:
            raise ValueError(f"{self.stage.name}: the checkpoint was saved with gradients={state['source']!r}, "
                             f"this trainer uses gradients={self.name!r}")

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
    cls.check(config, stage.n_stages, getattr(stage, "aux_head", None))
    return cls(stage, config)
