"""``gradients="corrected"``: a synthetic step now, corrected by the true gradient when it arrives.

At step t stage r steps at once on its synthesizer's prediction ``s_t = M_r(h_t, y_t)``,
backpropagated through step t's forward, as ``synthetic`` does. When the true gradient
``g_t`` of that step comes back (``lag_r`` steps later, as for ``delayed``), the stage
backpropagates the difference ``g_t - s_t`` through step t's own forward (its stashed
weights and its kept graph) and adds it to the update of the step it is due at. So the
update at step t is::

    J_t^T s_t  +  J_{t-lag}^T (g_{t-lag} - s_{t-lag})

Under SGD the synthesizer's errors telescope: the updates applied up to step T sum to the
true gradients of steps up to T - lag plus only the last ``lag`` predictions, whatever the
synthesizer's bias. That bias is what a synthetic gradient costs (a synthesizer is wrong
the same way for the same input until its regression catches up, and an optimizer follows
a repeated error at the full rate); a fresh, fixed-size difference ``s_t - s_{t-lag}`` in
its place averages out. A perfect synthesizer gives the fresh true gradient; a zero one
(the zero-initialised synthesizer before it has learnt) gives exactly ``delayed``.

What travels back is the true input gradient of step t (``J^T s_t + J^T (g_t - s_t)``,
the two backward passes accumulating in the input), sent when ``g_t`` arrives, so the
stages upstream get true gradients, as under ``delayed``, and every synthesizer regresses
on true targets: no bootstrapping. ``delay``, the weight versions (``lag_r + 1`` on stage
r), ``max_inflight``'s bound, the drain at a fit's end and ``staleness=`` are those of
``delayed``; ``delay=0`` is exactly backprop. The cost over ``delayed``: a second backward
of the stage per step (the synthetic one, whose graph is kept until the correction) and
the synthesizer's forward and regression.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ...stages.stage import NonFiniteError, Stage, all_finite
from ..targets import TargetCache, train_due_synthesizer
from .base import Begun, StepRunner, nonfinite_message, register
from .delayed import Delayed, _InFlight

__all__ = ["Corrected"]


@register("corrected")
class Corrected(Delayed):
    """``delayed`` plus a synthetic step now: ``J^T s_t`` at once, ``J^T (g - s)`` when ``g`` arrives."""

    uses_synthesizer = True

    def __init__(self, stage: Stage, config: Any):
        super().__init__(stage, config)
        self.cache = TargetCache()  # (h, y) of each step in flight, until its true gradient trains M_r
        self.applied: dict[int, tuple] = {}  # the synthetic gradient each step in flight stepped on

    @classmethod
    def check(cls, config: Any, n_stages: int, aux_head: Any = None) -> None:
        super().check(config, n_stages, aux_head)
        if config.precision == "fp16":
            raise ValueError("gradients='corrected' keeps each step's graph for two backward passes, which fp16's "
                             "loss scaling would scale differently: use precision='bf16' or 'fp32'")

    def seen(self, step: int, outputs: tuple, y: Any) -> None:
        if self.lag:
            self.cache.add(step, outputs, y)

    def received(self, step: int, grads: tuple, skipped: bool) -> None:
        if self.cache.get(step) is not None:
            self.cache.put_target(step, grads, skipped=skipped)
        super().received(step, grads, skipped)

    def update(self, runner: "StepRunner", begun: "Begun", downstream: tuple[tuple, bool] | None) -> None:
        if not self.lag:  # no staleness: the true gradient of this very step (backprop)
            super().update(runner, begun, downstream)
            return
        stage, step = self.stage, begun.step
        current = self.flights[step]
        current.inputs, current.outputs = begun.inputs, begun.outputs
        with runner.timers.section("synth", step):
            synthetic = stage.synthetic_gradient(begun.outputs, begun.y)
        if not all_finite(synthetic):
            if self.config.nonfinite == "raise":
                stage.undo_forward()  # (the stage as it was before this step)
                raise NonFiniteError(nonfinite_message(stage, "the synthetic gradient", step))
            synthetic = tuple(None for _ in synthetic)  # "skip": this step's synthetic part only
        now = self._synthetic_backward(runner, current, synthetic)
        due = self._take_due(runner, step)
        self._step(runner, step, _sum(now, None if due is None else due.param_grads))

    def _synthetic_backward(self, runner: "StepRunner", flight: _InFlight,
                            synthetic: tuple) -> dict[str, torch.Tensor | None]:
        """``J^T s`` into the step's stashed weights (kept graph); returns it, leaving them clean."""
        assert flight.params is not None and flight.outputs is not None
        pairs = [(o, s.to(o.device, o.dtype)) for o, s in zip(flight.outputs, synthetic, strict=False)
                 if s is not None and torch.is_tensor(o) and o.requires_grad]
        self.applied[flight.step] = synthetic
        if not pairs:
            return {n: None for n in flight.params}
        with runner.timers.section("backward", flight.step):
            torch.autograd.backward([o for o, _ in pairs], [s for _, s in pairs], retain_graph=True)
        now = {n: t.grad for n, t in flight.params.items()}
        for t in flight.params.values():
            t.grad = None
        return now  # (the input's gradient stays: the correction's backward adds to it, making J^T g)

    def _backward(self, runner: "StepRunner", flight: _InFlight) -> None:
        synthetic = self.applied.pop(flight.step, None)
        if synthetic is not None and flight.grads is not None:
            flight.grads = tuple(g if s is None or g is None else g - s.to(g.device, g.dtype)
                                 for g, s in zip(flight.grads, synthetic, strict=False))
        super()._backward(runner, flight)

    def after_update(self, step: int, wait_for: Callable[[int], None]) -> dict[str, float]:
        if not self.lag:
            return {}

        def wait_target(s: int) -> None:
            entry = self.cache.get(s)
            if entry is not None and not entry.ready:
                wait_for(s)
        # The true gradient of step t - lag is here (the update just applied its correction):
        # train M_r on exactly it, a deterministic run whatever the transport.
        trained = train_due_synthesizer(self.stage, self.cache, step, self.lag, self.config.max_inflight,
                                        wait_target)
        return {} if trained is None else {f"synth_loss/{self.stage.index}": trained}

    def state_dict(self) -> Any:
        state = super().state_dict()
        state["targets"] = self.cache.state_dict()
        return state

    def load_state_dict(self, state: Any, device: torch.device) -> None:
        super().load_state_dict(state, device)
        self.cache.load_state_dict(state.get("targets", []), device)
        self.applied = {}


def _sum(a: dict[str, torch.Tensor | None], b: dict[str, torch.Tensor | None] | None) -> dict[str, torch.Tensor | None]:
    if b is None:
        return a
    out: dict[str, torch.Tensor | None] = {}
    for n, x in a.items():
        y = b.get(n)
        out[n] = y if x is None else (x if y is None else x.add_(y))
    return out
