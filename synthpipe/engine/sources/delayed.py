"""``gradients="delayed"``: the true gradient, applied when it arrives (DDG / PipeDream).

Stage r never waits for the backward of the rest of the pipeline: at step t it runs the
forward of step t and then applies the true gradient of its own step ``t - lag_r``, which
stage r + 1 sent back earlier, where ``lag_r = (N - 1 - r) * delay`` (stage r + 1 sends
the input gradient of a step when it applies that step, ``delay`` steps after stage r
did its forward). ``delay`` is the per-hop delay in steps: ``delay=1`` (the default, also
in one process) is PipeDream's 1F1B schedule, where stage r's gradients are N - 1 - r
steps stale; ``delay=0`` is no staleness at all, every stage waiting for the gradient of
the same step: exactly backprop. A run is deterministic for every ``delay`` (each stage's
work at step t depends only on its state, step t's input and the gradient of step
``t - lag_r``), and a multi-process run equals the single-process trainer.

**Weight stashing.** The backward of step s must use the weights its forward used,
which the stage has since updated ``lag_r`` times. Each training forward therefore runs
(``torch.func.functional_call``) on a stashed copy of the stage's parameters; the step's
autograd graph holds that copy, the gradient lands in it, and is moved to the live
parameters for the optimizer step. Stashing was chosen over recomputing the forward
(Features Replay) because the gradient then belongs to the very activation that stage
r + 1 saw (recomputing with newer weights pairs ``dL/dh_r`` with another ``h_r``), and
because it costs no second forward; its price is memory: stage r holds ``lag_r + 1``
weight versions and as many activation graphs during a step (PipeDream's N - r at
``delay=1``), which ``max_inflight`` bounds: a pipeline needing more on stage 0,
``(N - 1) * delay + 1``, is refused by name. When a fit ends (and before a checkpoint)
the pipeline drains: every stage backpropagates each in-flight step whose gradient is
there, sends its input gradient back and keeps only the parameter gradient until its
step is due, so nothing is left in flight, the checkpoint holds no graph, and the
numbers are those of an uninterrupted run.

**Staleness correction** (``staleness=``): ``"lr"`` scales the learning rate of stage
r's steps by ``1 / (1 + lag_r)`` (staleness-aware asynchronous SGD; it acts through the
learning rate, so it works with Adam too); ``"predict"`` runs the forward of step t on
weights extrapolated along the last update, ``W + a * lag_r * (W - W_before)`` with
``a = predict_ahead``. With ``a = 1`` (SpecTrain / PipeMare's weight prediction) the
gradient, applied ``lag_r`` steps later, is taken near the weights it is applied to; the
default ``a = 3`` (``DEFAULT_PREDICT_AHEAD``) also looks ahead along the update, as
Nesterov momentum does, which measured better per step on every workload tried.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ...stages.stage import NonFiniteError, Stage, all_finite
from .base import Begun, GradientSource, StepRunner, nonfinite_message, register
from .local import check_loaded

__all__ = ["Delayed", "STALENESS", "DEFAULT_PREDICT_AHEAD"]

STALENESS = ("lr", "predict")
# measured (benchmarks/per_step.py, 3 seeds, 2-4 stages, both MLPs): 1 x lag -0.6 to +0.2 points
# from backprop, 2 x lag -0.0 to +1.4, 3 x lag +0.6 to +2.1, 4 x lag +0.8 to +2.1
DEFAULT_PREDICT_AHEAD = 3.0


def hop_delay(config: Any) -> int:
    """The per-hop delay of ``config`` (``None``: 1, PipeDream's 1F1B)."""
    return 1 if config.delay is None else int(config.delay)


@dataclasses.dataclass
class _InFlight:
    """A step whose gradient this stage has not applied yet.

    It goes through three states: forward done (``params``, ``inputs``, ``outputs``: the
    stashed weights and the graph); gradient arrived (``grads``); backward done
    (``param_grads``, the input gradient sent back, the weights and graph let go).
    """

    step: int
    params: dict[str, torch.Tensor] | None  # the stashed weights its forward ran with
    inputs: tuple | None = None
    outputs: tuple | None = None
    grads: tuple | None = None
    skipped: bool = False
    param_grads: dict[str, torch.Tensor | None] | None = None

    @property
    def ready(self) -> bool:
        return self.grads is not None or self.skipped

    @property
    def done(self) -> bool:
        return self.param_grads is not None or (self.skipped and self.params is None)


@register("delayed")
class Delayed(GradientSource):
    """The true gradient of this stage's step ``t - lag``, with the weights that step's forward used."""

    owns_update = True
    default_delay = 1
    staleness_modes = STALENESS

    def __init__(self, stage: Stage, config: Any):
        super().__init__(stage, config)
        self.lag = (stage.n_stages - 1 - stage.index) * hop_delay(config)
        # how many updates ahead the forward's weights are extrapolated ("predict"; 0: not at all)
        self.ahead = (self.lag * (DEFAULT_PREDICT_AHEAD if config.predict_ahead is None else config.predict_ahead)
                      if config.staleness == "predict" else 0.0)
        self.flights: dict[int, _InFlight] = {}
        self.most_versions = 0  # the most weight versions held at once (versions() at its peak)
        self._before: dict[str, torch.Tensor] | None = None  # the weights before the last update ("predict")
        self._finishing: "StepRunner | None" = None  # set while a fit ends: backward on arrival
        self._spare: list[dict[str, torch.Tensor]] = []  # weight versions done with, refilled by the next stash
        if config.staleness == "lr" and stage.optimizer is not None and any(
                "lr" not in g for g in stage.optimizer.param_groups):
            raise ValueError(f"{stage.name}: staleness='lr' scales the learning rate, but the stage's optimizer "
                             f"{type(stage.optimizer).__name__} has no 'lr' setting")

    @classmethod
    def check(cls, config: Any, n_stages: int, aux_head: Any = None) -> None:
        d = hop_delay(config)
        need = (n_stages - 1) * d + 1
        if need > config.max_inflight:
            raise ValueError(
                f"gradients={cls.name!r} with {n_stages} stages and delay={d} keeps up to {need} weight versions on "
                f"stage 0 (one per step in flight: (n_stages - 1) * delay + 1), but max_inflight="
                f"{config.max_inflight}; pass max_inflight={need} or more, or a smaller delay")
        if config.warmup_steps:
            raise ValueError(f"warmup_steps={config.warmup_steps} has no meaning for gradients={cls.name!r} "
                             f"(it warms up synthesizers): leave it 0")

    def waits(self, step: int) -> bool:
        return self.lag == 0  # no staleness: the gradient of this very step, as backprop

    def versions(self) -> int:
        """Stashed weight versions held now (one per step whose backward has not run)."""
        return sum(1 for f in self.flights.values() if f.params is not None)

    def held_versions(self) -> int:
        """Weight versions allocated: those in flight and those kept to refill at the next stash."""
        return self.versions() + len(self._spare)

    def in_flight(self) -> int:
        return len(self.flights)

    # -- the forward: on a stashed copy of the weights -------------------------------------
    def forward_parameters(self, step: int) -> dict[str, torch.Tensor]:
        self._finishing = None
        ahead = self.ahead if self._before is not None else 0.0
        named = list(self.stage.module.named_parameters())
        # A weight version whose backward is done is refilled in place: a stash costs one
        # pass over the weights, and no fresh allocation of their size on every step.
        params = self._spare.pop() if self._spare else None
        with torch.no_grad():
            if params is None:
                params = {n: torch.empty_like(p.detach()).requires_grad_(p.requires_grad) for n, p in named}
            if ahead:  # W + ahead (W - W_before), in the same one pass: lerp(W_before, W, 1 + ahead)
                assert self._before is not None
                for n, p in named:
                    torch.lerp(self._before[n], p.detach(), float(1 + ahead), out=params[n])
            else:
                torch._foreach_copy_(list(params.values()), [p.detach() for _, p in named])
        self.flights[step] = _InFlight(step, params)
        self.most_versions = max(self.most_versions, self.versions())
        return params

    @property
    def velocity(self) -> dict[str, torch.Tensor] | None:
        """The last update, ``W - W_before`` per parameter (``None`` before the first; ``staleness="predict"``)."""
        if self._before is None:
            return None
        return {n: p.detach() - self._before[n] for n, p in self.stage.module.named_parameters()}

    def received(self, step: int, grads: tuple, skipped: bool) -> None:
        flight = self.flights.get(step)
        if flight is None:
            raise KeyError(f"{self.stage.name}: a gradient arrived for step {step}, which is not in flight "
                           f"(in flight: {sorted(self.flights)})")
        flight.grads, flight.skipped = (None if skipped else tuple(grads)), skipped
        if self._finishing is not None:
            self._backward(self._finishing, flight)

    def finish(self, runner: "StepRunner") -> None:
        """The fit ends: backpropagate every step whose gradient is here (and each that comes
        during the drain), send its input gradient back, and keep only its parameter gradient
        for the step it is due at: nothing stays in flight upstream, and a checkpoint holds
        no graph. The numbers are those of backpropagating at the due step."""
        self._finishing = runner
        for flight in list(self.flights.values()):
            if flight.ready and not flight.done:
                self._backward(runner, flight)

    # -- the update: the due step's gradient, through its own forward --------------------------
    def update(self, runner: "StepRunner", begun: "Begun", downstream: tuple[tuple, bool] | None) -> None:
        current = self.flights[begun.step]
        current.inputs, current.outputs = begun.inputs, begun.outputs
        if downstream is not None:  # (no staleness: the runner waited for this step's gradient)
            current.grads, current.skipped = (None if downstream[1] else tuple(downstream[0])), downstream[1]
        due = self._take_due(runner, begun.step)
        if due is None:
            return  # the first lag steps of a run: no gradient is due yet
        # skipped (param_grads None): no update (its forward's running statistics stay: that forward is long done)
        self._step(runner, begun.step, due.param_grads)

    def _take_due(self, runner: "StepRunner", step: int) -> _InFlight | None:
        """The step due at ``step`` (``step - lag``), backpropagated and out of flight; ``None``: none yet."""
        due = self.flights.get(step - self.lag)
        if due is None:
            return None
        if not due.done:  # (done: backpropagated when the last fit ended)
            if not due.ready:  # (its message reaches received(), which finds it in flight)
                with runner.timers.section("wait", step):
                    runner.links.wait_received(due.step)
            self._backward(runner, due)
        return self.flights.pop(due.step)

    def _backward(self, runner: "StepRunner", flight: _InFlight) -> None:
        """Backpropagate ``flight``'s gradient through its own forward; send its input gradient back."""
        stage, step = self.stage, flight.step
        ok = not flight.skipped and flight.grads is not None and all_finite(flight.grads)
        if not ok and not flight.skipped and self.config.nonfinite == "raise":
            raise NonFiniteError(nonfinite_message(stage, "the delayed gradient", step))
        if ok:
            assert flight.params is not None and flight.outputs is not None and flight.inputs is not None
            with runner.timers.section("backward", step):
                stage.backward(flight.outputs, flight.grads)  # into the stashed weights (and the inputs)
            runner.send_back(step, stage.input_gradient(flight.inputs), skipped=False)
            flight.param_grads = {n: t.grad for n, t in flight.params.items()}
        else:
            flight.skipped = True
            runner.send_back(step, (), skipped=True)
        if flight.params is not None:  # (the graph goes; the weight version is kept for a later stash)
            for t in flight.params.values():
                t.grad = None
            self._spare.append(flight.params)
        flight.params = flight.inputs = flight.outputs = None
        flight.grads = None

    def _step(self, runner: "StepRunner", step: int, param_grads: dict[str, torch.Tensor | None] | None) -> None:
        """The optimizer step on ``param_grads`` (``None``: none this step), averaged over the replicas."""
        stage = self.stage
        named = list(stage.module.named_parameters())
        for name, p in named:
            p.grad = None if param_grads is None else param_grads[name]
        # (every replica reduces at every due step, even one with nothing to give: none waits alone)
        if not runner.reduce(step, param_grads is not None):
            for _, p in named:
                p.grad = None
            return
        if self.ahead:  # "predict" with some staleness: keep W_before (in place: one pass)
            if self._before is None:
                self._before = {n: torch.empty_like(p.detach()) for n, p in named}
            torch._foreach_copy_([self._before[n] for n, _ in named], [p.detach() for _, p in named])
        with runner.timers.section("update", step), self._scaled_lr():
            stage.step()

    @contextmanager
    def _scaled_lr(self) -> Iterator[None]:
        groups = stage_groups(self.stage) if self.config.staleness == "lr" and self.lag else []
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] / (1 + self.lag)
        try:
            yield
        finally:
            for g, lr in zip(groups, saved, strict=False):
                g["lr"] = lr

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> Any:
        """The steps in flight, each with its parameter gradient (a fit's end has run their backward)."""
        pending = [f.step for f in self.flights.values() if not f.done]
        if pending:
            raise RuntimeError(f"{self.stage.name}: steps {pending} are still waiting for their gradient; a "
                               f"checkpoint is taken only after the pipeline drained (the end of a fit)")
        return {"source": self.name, "lag": self.lag, "most_versions": self.most_versions,
                "velocity": self.velocity,
                "flights": [{"step": f.step, "param_grads": f.param_grads, "skipped": f.skipped}
                            for f in self.flights.values()]}

    def check_state(self, state: Any) -> None:
        check_loaded(self.stage, self.name, state)
        if state["lag"] != self.lag:
            raise ValueError(f"{self.stage.name}: the checkpoint's delayed gradients are {state['lag']} steps stale, "
                             f"this trainer's {self.lag} (another delay or number of stages)")
        names = {n for n, _ in self.stage.module.named_parameters()}
        for f in state["flights"]:
            if f["param_grads"] is not None and set(f["param_grads"]) != names:
                raise ValueError(f"{self.stage.name}: the checkpoint's gradient of step {f['step']} is not for "
                                 f"this stage's parameters")

    def load_state_dict(self, state: Any, device: torch.device) -> None:
        self.check_state(state)

        def to(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)
        self.flights = {}
        for f in state["flights"]:
            grads = None if f["param_grads"] is None else {n: to(t) for n, t in f["param_grads"].items()}
            self.flights[f["step"]] = _InFlight(f["step"], None, skipped=f["skipped"], param_grads=grads)
        self.most_versions = state["most_versions"]
        velocity = state["velocity"]  # (the stage's weights are loaded: W_before = W - velocity)
        self._before = None if velocity is None else {
            n: p.detach() - velocity[n].to(device) for n, p in self.stage.module.named_parameters()}
        self._finishing = None


def stage_groups(stage: Stage) -> list[dict[str, Any]]:
    return list(stage.optimizer.param_groups) if stage.optimizer is not None else []
