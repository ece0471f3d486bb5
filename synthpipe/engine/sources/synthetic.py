"""``gradients="synthetic"``: DNI / cDNI, the stage steps on its synthesizer's prediction.

Stage r steps at once on ``M_r(h_r, y)``. The gradient stage r + 1 sends back for that
step (true for the stage before the last, bootstrapped from r + 1's own synthetic
gradient otherwise) is the regression target of ``M_r``: the activation waits in a
:class:`~synthpipe.engine.targets.TargetCache` until its target arrives, and after the
update the due entries train the synthesizer. ``warmup_steps``: the first steps wait for
the true gradient (as ``backprop``) while their targets already train ``M_r``.

``delay``: with ``d`` set, ``M_r`` is trained at step t on exactly the target of step
t - d (waiting for it if needed): a deterministic run. Without, on every target that has
arrived, and on the oldest one when ``max_inflight`` entries wait (bounding memory and
staleness).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ...stages.stage import Stage
from ..targets import TargetCache, train_due_synthesizer
from .base import GradientSource, register

__all__ = ["Synthetic"]


@register("synthetic")
class Synthetic(GradientSource):
    """A synthesizer's prediction now; the gradient that comes back trains it."""

    sporadic_updates = True
    uses_synthesizer = True

    def __init__(self, stage: Stage, config: Any):
        super().__init__(stage, config)
        self.cache = TargetCache()

    def waits(self, step: int) -> bool:
        return step < self.config.warmup_steps

    def seen(self, step: int, outputs: tuple, y: Any) -> None:
        self.cache.add(step, outputs, y)

    def gradient(self, step: int, outputs: tuple, y: Any) -> tuple:
        return self.stage.synthetic_gradient(outputs, y)

    def received(self, step: int, grads: tuple, skipped: bool) -> None:
        if self.cache.get(step) is not None:
            self.cache.put_target(step, grads, skipped=skipped)

    def after_update(self, step: int, wait_for: Callable[[int], None]) -> dict[str, float]:
        def wait_target(s: int) -> None:
            entry = self.cache.get(s)
            if entry is not None and not entry.ready:
                wait_for(s)
        agree = self.replicas.minimum if self.replicas is not None else None
        trained = train_due_synthesizer(self.stage, self.cache, step, self.config.delay,
                                        self.config.max_inflight, wait_target, agree)
        return {} if trained is None else {f"synth_loss/{self.stage.index}": trained}

    def in_flight(self) -> int:
        return len(self.cache)

    def state_dict(self) -> Any:
        return self.cache.state_dict()

    def load_state_dict(self, state: Any, device: torch.device) -> None:
        self.cache.load_state_dict(state, device)
