"""``gradients="interlocking"``: pairwise interlocking backpropagation (Gomez et al.).

Every stage r < N-1 owns an auxiliary head ``a_r`` and a local loss
``L_r = loss_fn(a_r(h_r), y)`` (the last stage's is the model's own loss). Stage r steps on

    dL_r/dθ_r + dL_{r+1}/dθ_r

the gradient of its own local loss and of the next stage's, which flows one hop back
through stage r + 1 and no further. The order that keeps every wait to that one hop:

1. stage r + 1, right after its forward, backpropagates its local loss to its input and
   sends ``dL_{r+1}/dh_r`` to stage r at once (:meth:`Interlocking.early`), before it
   waits for anything;
2. stage r waits only for that message of the same step, then steps on the sum.

So a stage's update waits for one neighbour's forward and local backward, never for the
backward of the rest of the pipeline. ``delay`` has no meaning and is refused.

Costs: one auxiliary head per stage; a middle stage backpropagates twice (its local
loss to its input, early, then both losses to its parameters); the activation graph of
the current step is kept until the hop gradient arrives (one step, never more).
"""
from __future__ import annotations

from typing import Any

import torch

from ...stages.stage import NonFiniteError, Stage, all_finite
from .base import Begun, GradientSource, StepRunner, nonfinite_message, register
from .local import AuxHeadState, AuxLoss, check_aux_head

__all__ = ["Interlocking"]


@register("interlocking")
class Interlocking(AuxHeadState, GradientSource):
    """The local loss's gradient at once (one hop back), the next stage's when it comes."""

    uses_delay = False

    def __init__(self, stage: Stage, config: Any):
        super().__init__(stage, config)
        self.aux = AuxLoss(stage, self.name)
        self.local: dict[int, tuple | None] = {}  # step -> dL_r/dh_r (None: the step was skipped)

    owns_update = True

    @classmethod
    def check(cls, config: Any, n_stages: int, aux_head: Any = None) -> None:
        check_aux_head(cls.name, config, aux_head)

    def waits(self, step: int) -> bool:
        return True  # for stage r + 1's message of this step: its local loss, one hop

    def early(self, runner: "StepRunner", begun: "Begun") -> None:
        stage, step = self.stage, begun.step
        with runner.timers.section("synth", step):
            loss, local = self.aux.loss_and_gradient(step, begun.outputs, begun.y)
            ok = all_finite([loss]) and all_finite(local)
        if not ok:
            stage.undo_forward()  # a skipped step leaves the stage as it was
            if self.config.nonfinite == "raise":
                raise NonFiniteError(nonfinite_message(stage, "the local (auxiliary) loss", step, loss))
            self.local[step] = None
            runner.send_back(step, (), skipped=True)
            return
        self.aux.step_head()
        self.local[step] = local
        if runner.has_previous:  # dL_r/dh_{r-1}: stage r - 1's one hop, sent before this stage waits
            with runner.timers.section("backward", step):
                runner.send_back(step, self._input_gradient(begun, local), skipped=False)

    def _input_gradient(self, begun: "Begun", local: tuple) -> tuple:
        pairs = [(o, g) for o, g in zip(begun.outputs, local, strict=False) if g is not None and o.requires_grad]
        wanted = [i for i, t in enumerate(begun.inputs) if torch.is_tensor(t) and t.requires_grad]
        if not pairs or not wanted:
            return tuple(None for _ in begun.inputs)
        got = torch.autograd.grad([o for o, _ in pairs], [begun.inputs[i] for i in wanted], [g for _, g in pairs],
                                  retain_graph=True, allow_unused=True)
        by_index = dict(zip(wanted, got, strict=False))
        return tuple(by_index.get(i) for i in range(len(begun.inputs)))

    def update(self, runner: "StepRunner", begun: "Begun", downstream: tuple[tuple, bool] | None) -> None:
        stage, step = self.stage, begun.step
        local = self.local.pop(step)
        assert downstream is not None, "interlocking waits for the next stage's gradient of every step"
        hop, skipped = downstream
        if local is None:
            runner.reduce(step, False)  # (with the other replicas, which then skip the update too)
            return  # skipped (and said so) in early
        if not skipped and not all_finite(hop):
            if self.config.nonfinite == "raise":
                stage.undo_forward()
                raise NonFiniteError(nonfinite_message(stage, "the next stage's local gradient", step))
            skipped = True
        if skipped:  # as in backprop: the next stage skipped this step, so does this one
            stage.undo_forward()
            runner.reduce(step, False)
            return
        grads = tuple(_add(a, b) for a, b in zip(local, hop, strict=False)) if hop else local
        with runner.timers.section("backward", step):
            if stage.optimizer is not None:
                stage.optimizer.zero_grad(set_to_none=True)
            pairs = [(o, g.to(o.device, o.dtype)) for o, g in zip(begun.outputs, grads, strict=False)
                     if g is not None and torch.is_tensor(o) and o.requires_grad]
            params = [p for p in stage.module.parameters() if p.requires_grad]
            if pairs and params:  # (the parameters only: the input gradient went back in early)
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs], inputs=params)
        if not runner.reduce(step, True):  # another replica skips this step: so does this one
            stage.undo_forward()
            return
        with runner.timers.section("update", step):
            stage.step()

    def in_flight(self) -> int:
        return len(self.local)



def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b.to(a.device, a.dtype)
