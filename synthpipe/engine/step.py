"""One stage's training step: the single copy of the update rule every runner calls.

:class:`StageStep` drives a :class:`~synthpipe.stages.stage.Stage` through one step::

    begun = step.begin(t, x, y)        # forward; the source sees h_r; h_r goes to r + 1
    step.early(begun)                  # the source's work before any wait (a local loss)
    grads = ... if step.waits(t)       # locked: the runner brings r + 1's gradient of t
    loss = step.update(begun, grads)   # loss or gradient -> backward -> send back -> step
    step.after(t)                      # the source trains on what came back (synthesizers)

``run`` does them in order, waiting through the links: that is the per-rank worker
and the benchmark's no-transfer ceiling. The single-process reference trainer calls the
phases itself (every forward and ``early`` first, the locked stages' updates in reverse
order, every ``after`` last), which is why they are separate. A source with
``owns_update`` runs the update itself (one that applies an older step's gradient).
Where the output gradient comes from is
the stage's :class:`~synthpipe.engine.sources.GradientSource`; how messages travel is
the runner's :class:`Links`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from ..stages.stage import NonFiniteError, Stage, all_finite
from .config import TrainConfig
from .history import StepLog
from .metrics import NULL_TIMERS, Timers
from .sources import GradientSource
from .sources.base import Begun, Links, nonfinite_message
from .sporadic import update_drawn

__all__ = ["Links", "StageStep", "Begun", "LiveStats", "nonfinite_message"]


@dataclasses.dataclass
class LiveStats:
    """The newest values a progress bar shows; they travel in gradient messages' headers.

    Attributes:
        loss: the last stage's newest training loss (NaN before the first).
        loss_step: the step of ``loss``.
        synth_losses: the newest synthesizer regression loss of each boundary 0..N-2.
    """

    loss: float = math.nan
    loss_step: float = math.nan
    synth_losses: list[float] = dataclasses.field(default_factory=list)

    @classmethod
    def empty(cls, n_stages: int) -> "LiveStats":
        return cls(synth_losses=[math.nan] * max(n_stages - 1, 0))

    def to_list(self) -> list[float]:
        """The flat form that travels in a message header."""
        return [self.loss, self.loss_step, *self.synth_losses]

    def merge(self, values: list[float], own_boundary: int | None) -> None:
        """Take the values a message from downstream carried, except this rank's own boundary."""
        if len(values) >= 2:
            self.loss, self.loss_step = values[0], values[1]
        for b, v in enumerate(values[2:2 + len(self.synth_losses)]):
            if b != own_boundary:
                self.synth_losses[b] = v


class StageStep:
    """Runs ``stage``'s training steps with ``source`` over ``links``.

    Args:
        stage: the stage.
        config: the trainer's options (``nonfinite``, ...).
        source: where its output gradient comes from (ignored on the last stage, which
            backpropagates its loss).
        links: its neighbours.
        log: where per-step values go (``loss``, ``synth_loss/r``).
        stats: the live values shown by the progress bar (updated in place).
        reduce_gradients: data parallelism's hook, called at every step after the backward
            (or instead of it, with ``False``, on a step this replica skips) and before the
            update: ``reduce_gradients(ok) -> ok``, averaging the stage's gradients over its
            replicas and returning ``False`` when any replica skips the step (then every
            replica skips it). ``None``: one replica.
    """

    def __init__(self, stage: Stage, config: TrainConfig, source: GradientSource, links: Links,
                 log: StepLog | None = None, stats: LiveStats | None = None,
                 reduce_gradients: Callable[[bool], bool] | None = None):
        self.stage = stage
        self.config = config
        self.source = source
        self.links = links
        self.log = log if log is not None else StepLog()
        self.stats = stats if stats is not None else LiveStats.empty(stage.n_stages)
        self.timers: Timers = NULL_TIMERS  # type: ignore[assignment]
        self.reduce_gradients = reduce_gradients
        self.has_next = not stage.is_last
        self.has_previous = not stage.is_first

    def waits(self, step: int) -> bool:
        """Does the update of ``step`` need stage r + 1's gradient of ``step``?"""
        return self.has_next and self.source.waits(step)

    def begin(self, step: int, x: tuple, y: Any) -> Begun:
        """The forward of ``step`` (and the loss, on the last stage); ``h_r`` goes downstream."""
        tm = self.timers
        params = self.source.forward_parameters(step) if self.has_next else None
        with tm.section("forward", step):
            inputs, outputs = (self.stage.forward(x) if params is None
                               else self.stage.forward(x, parameters=params))
        begun = Begun(step, inputs, outputs, y)
        if self.has_next:
            self.source.seen(step, outputs, y)
            with tm.section("send", step):
                self.links.send_activation(step, outputs, y)
        else:
            with tm.section("forward", step):
                begun.loss = self.stage.loss(outputs, y)
        return begun

    def early(self, begun: Begun) -> None:
        """The source's work between the forward of ``begun`` and any wait (none by default)."""
        if self.has_next:
            self.source.early(self, begun)

    def update(self, begun: Begun, downstream: tuple[tuple, bool] | None = None) -> float | None:
        """Backward and optimizer step of a begun step; returns the loss (last stage) or ``None``.

        ``downstream``: stage r + 1's ``(grads, skipped)`` of this step, when it waited for them.
        A non-finite loss or gradient raises :class:`NonFiniteError`, or with
        ``nonfinite="skip"`` leaves the stage as it was and tells stage r - 1 the step was skipped.
        A step this stage's ``p_update`` draw skips does no backward and no update either
        (:meth:`_skip_update`).
        """
        cfg, stage, tm, step = self.config, self.stage, self.timers, begun.step
        if begun.loss is None and self.source.owns_update:
            self.source.update(self, begun, downstream)
            return None
        if not update_drawn(cfg.p_update, cfg.p_update_seed, stage.index, step):
            return self._skip_update(begun)
        result: float | None = None
        grads: tuple | None = None
        if begun.loss is not None:
            with tm.section("forward", step):
                ok = all_finite([begun.loss.detach()])
            if not ok and cfg.nonfinite == "raise":
                stage.undo_forward()
                raise NonFiniteError(nonfinite_message(stage, "the loss", step, begun.loss))
        elif downstream is not None:
            grads, skipped = downstream
            ok = not skipped
        else:
            self.links.poll()
            with tm.section("synth", step):
                grads = self.source.gradient(step, begun.outputs, begun.y)
                ok = all_finite(grads)
            if not ok and cfg.nonfinite == "raise":
                stage.undo_forward()
                raise NonFiniteError(nonfinite_message(stage, f"the {self.source.name} gradient", step))
        if ok:
            with tm.section("backward", step):
                stage.backward(begun.outputs, grads, loss=begun.loss)
        if self.reduce_gradients is not None:  # before the send: every replica tells r - 1 the same
            with tm.section("reduce", step):
                ok = self.reduce_gradients(ok)
        if not ok:
            stage.undo_forward()  # a skipped step leaves the stage as it was
            stage.advance_schedule()  # (but the LR schedule follows the step id)
            self._send_back(step, (), skipped=True)
            return None
        if begun.loss is not None:
            result = float(begun.loss.detach())
            self.stats.loss, self.stats.loss_step = result, float(step)  # travels with this step's gradient
            self.log.put(step, "loss", result)
        # The input gradient is final once backward is done: send it before the update, so
        # it crosses (and stage r - 1 can use it) while this stage updates.
        back = stage.input_gradient(begun.inputs) if self.has_previous else ()
        # fp16: an overflow in the scaled backward; stage r - 1 skips the step, this one lowers its scale
        overflow = stage.scaler is not None and not all_finite(back)
        self._send_back(step, () if overflow else back, skipped=overflow)
        lr = stage.lr
        with tm.section("update", step):
            norm = stage.step(skip=overflow)
        if stage.log_metrics:
            if norm is not None:
                self.log.put(step, f"grad_norm/{stage.index}", norm)
            if lr is not None:
                self.log.put(step, f"lr/{stage.index}", lr)
        return result

    def _skip_update(self, begun: Begun) -> float | None:
        """``p_update``: this stage does no backward and no update at this step (engine/sporadic.py).

        Stage r - 1 is told the step was skipped (nothing waits for a gradient that never
        comes); the last stage still reports the loss its forward computed.
        """
        self.stage.advance_schedule()  # (the LR schedule follows the step id)
        self._send_back(begun.step, (), skipped=True)
        if begun.loss is None:
            return None
        result = float(begun.loss.detach())
        self.stats.loss, self.stats.loss_step = result, float(begun.step)
        self.log.put(begun.step, "loss", result)
        return result

    def after(self, step: int) -> None:
        """The source's work after the update of ``step`` (train a synthesizer on its targets)."""
        if not self.has_next:
            return
        with self.timers.section("synth", step):
            values = self.source.after_update(step, self.links.wait_received)
        for key, value in values.items():
            self.log.put(step, key, value)
            if key == f"synth_loss/{self.stage.index}":
                self.stats.synth_losses[self.stage.index] = value

    def run(self, step: int, x: tuple, y: Any) -> float | None:
        """One whole step, waiting through the links where the source says so."""
        begun = self.begin(step, x, y)
        self.early(begun)
        downstream = None
        if self.waits(step):
            with self.timers.section("wait", step):
                downstream = self.links.wait_gradient(step)
        loss = self.update(begun, downstream)
        self.after(step)
        return loss

    def received(self, step: int, grads: tuple, skipped: bool, stats: list[float] | None = None) -> None:
        """Stage r + 1's message of ``step`` arrived: give it to the source."""
        if stats:
            self.stats.merge(stats, self.stage.index)
        self.source.received(step, grads, skipped)

    def send_back(self, step: int, grads: tuple, skipped: bool) -> None:
        """Send the input gradient of ``step`` to stage r - 1 (where there is one and the source sends back)."""
        self._send_back(step, grads, skipped)

    def reduce(self, step: int, ok: bool) -> bool:
        """Average the stage's gradients over its replicas (a source's own update); ``False``: skip it."""
        if self.reduce_gradients is None:
            return ok
        with self.timers.section("reduce", step):
            return self.reduce_gradients(ok)

    def _send_back(self, step: int, grads: tuple, skipped: bool) -> None:
        if self.has_previous and self.source_sends_back:
            with self.timers.section("send", step):
                self.links.send_gradient(step, grads, skipped)

    @property
    def source_sends_back(self) -> bool:
        return type(self.source).sends_back
