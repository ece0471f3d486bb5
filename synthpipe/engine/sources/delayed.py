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
``(N - 1) * delay + 1``, is refused by name. A checkpoint saves each in-flight step's
stashed weights, inputs and RNG state (not its graph); a resumed run recomputes the
graph from them, with the same weights and the same random draws (dropout).

**Staleness correction** (``staleness=``): ``"lr"`` scales the learning rate of stage
r's steps by ``1 / (1 + lag_r)`` (staleness-aware asynchronous SGD; it acts through the
learning rate, so it works with Adam too); ``"predict"`` runs the forward of step t on
weights extrapolated ``lag_r`` updates ahead along the last update,
``W + lag_r * (W - W_before)`` (SpecTrain / PipeMare's weight prediction), so that the
gradient, applied ``lag_r`` steps later, is taken near the weights it is applied to.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ...stages.split import as_tuple
from ...stages.stage import NonFiniteError, Stage, all_finite
from .base import GradientSource, nonfinite_message, register

if TYPE_CHECKING:  # (the step module imports the sources)
    from ..step import Begun, StageStep

__all__ = ["Delayed", "STALENESS"]

STALENESS = ("lr", "predict")


def hop_delay(config: Any) -> int:
    """The per-hop delay of ``config`` (``None``: 1, PipeDream's 1F1B)."""
    return 1 if config.delay is None else int(config.delay)


@dataclasses.dataclass
class _InFlight:
    """A step whose gradient this stage has not applied yet."""

    step: int
    params: dict[str, torch.Tensor]  # the stashed weights its forward ran with
    rng: list[torch.Tensor]  # the RNG states before its forward (CPU, then the stage's CUDA device)
    inputs: tuple | None = None
    outputs: tuple | None = None  # (None after a resume: recomputed from params, inputs and rng)
    grads: tuple | None = None
    skipped: bool = False

    @property
    def ready(self) -> bool:
        return self.grads is not None or self.skipped


@register("delayed")
class Delayed(GradientSource):
    """The true gradient of this stage's step ``t - lag``, with the weights that step's forward used."""

    owns_update = True
    default_delay = 1
    staleness_modes = STALENESS

    def __init__(self, stage: Stage, config: Any):
        super().__init__(stage, config)
        d = hop_delay(config)
        self.lag = (stage.n_stages - 1 - stage.index) * d
        self.lag_next = max(self.lag - d, 0)  # stage r + 1's (the last stage's is 0)
        self.flights: dict[int, _InFlight] = {}
        self.most_versions = 0  # the most weight versions held at once (versions() at its peak)
        self.velocity: dict[str, torch.Tensor] | None = None  # the last update, for staleness="predict"
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
                f"gradients='delayed' with {n_stages} stages and delay={d} keeps up to {need} weight versions on "
                f"stage 0 (one per step in flight: (n_stages - 1) * delay + 1), but max_inflight="
                f"{config.max_inflight}; pass max_inflight={need} or more, or a smaller delay")
        if config.warmup_steps:
            raise ValueError(f"warmup_steps={config.warmup_steps} has no meaning for gradients='delayed' "
                             f"(it warms up synthesizers): leave it 0")

    def waits(self, step: int) -> bool:
        return self.lag == 0  # no staleness: the gradient of this very step, as backprop

    def versions(self) -> int:
        """Stashed weight versions held now (one per step in flight)."""
        return len(self.flights)

    def in_flight(self) -> int:
        return len(self.flights)

    # -- the forward: on a stashed copy of the weights -------------------------------------
    def forward_parameters(self, step: int) -> dict[str, torch.Tensor]:
        ahead = self.lag if self.config.staleness == "predict" and self.velocity is not None else 0
        with torch.no_grad():
            params = {}
            for name, p in self.stage.module.named_parameters():
                w = p.detach().clone() if not ahead else p.detach() + ahead * self.velocity[name]
                params[name] = w.requires_grad_(p.requires_grad)
        self.flights[step] = _InFlight(step, params, _rng_states(self.stage.device))
        self.most_versions = max(self.most_versions, len(self.flights))
        return params

    def received(self, step: int, grads: tuple, skipped: bool) -> None:
        flight = self.flights.get(step)
        if flight is None:
            raise KeyError(f"{self.stage.name}: a gradient arrived for step {step}, which is not in flight "
                           f"(in flight: {sorted(self.flights)})")
        flight.grads, flight.skipped = (None if skipped else tuple(grads)), skipped

    def held_back(self, next_step: int) -> int:
        return sum(1 for s, f in self.flights.items() if s >= next_step - self.lag_next and not f.ready)

    # -- the update: the due step's gradient, through its own forward --------------------------
    def update(self, runner: "StageStep", begun: "Begun", downstream: tuple[tuple, bool] | None) -> None:
        current = self.flights[begun.step]
        current.inputs, current.outputs = begun.inputs, begun.outputs
        if downstream is not None:  # (no staleness: the runner waited for this step's gradient)
            current.grads, current.skipped = (None if downstream[1] else tuple(downstream[0])), downstream[1]
        due = self.flights.get(begun.step - self.lag)
        if due is None:
            return  # the first lag steps of a run: no gradient is due yet
        if not due.ready:
            with runner.timers.section("wait", begun.step):
                runner.links.wait_received(due.step)
        self._apply(runner, due)

    def _apply(self, runner: "StageStep", flight: _InFlight) -> None:
        stage, step = self.stage, flight.step
        ok = not flight.skipped and all_finite(flight.grads)
        if not ok and not flight.skipped and self.config.nonfinite == "raise":
            raise NonFiniteError(nonfinite_message(stage, "the delayed gradient", step))
        del self.flights[step]
        if not ok:  # skipped: no update; its forward's running statistics stay (that forward is long done)
            runner.send_back(step, (), skipped=True)
            return
        with runner.timers.section("backward", step):
            outputs = flight.outputs if flight.outputs is not None else self._recompute(flight)
            stage.backward(outputs, flight.grads)  # into the stashed weights (and the inputs)
        runner.send_back(step, stage.input_gradient(flight.inputs), skipped=False)
        with runner.timers.section("update", step):
            before = None
            if self.config.staleness == "predict":
                before = {n: p.detach().clone() for n, p in stage.module.named_parameters()}
            for name, p in stage.module.named_parameters():
                p.grad = flight.params[name].grad
            with self._scaled_lr():
                stage.step()
            if before is not None:
                with torch.no_grad():
                    self.velocity = {n: p.detach() - before[n] for n, p in stage.module.named_parameters()}

    @contextmanager
    def _scaled_lr(self) -> Iterator[None]:
        groups = stage_groups(self.stage) if self.config.staleness == "lr" and self.lag else []
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] / (1 + self.lag)
        try:
            yield
        finally:
            for g, lr in zip(groups, saved):
                g["lr"] = lr

    def _recompute(self, flight: _InFlight) -> tuple:
        """The forward of a resumed in-flight step, rebuilt: its weights, inputs and random draws.

        The module's buffers are replaced by copies, so the running statistics, which that
        step's forward has already updated, are not updated again.
        """
        stage = self.stage
        assert flight.inputs is not None
        inputs = tuple(t.detach().requires_grad_(True) if torch.is_tensor(t) and t.dtype.is_floating_point
                       and not stage.is_first else t for t in flight.inputs)
        buffers = {n: b.clone() for n, b in stage.module.named_buffers()}
        devices = [stage.device] if stage.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            _set_rng_states(flight.rng, stage.device)
            outputs = as_tuple(torch.func.functional_call(stage.module, {**flight.params, **buffers}, inputs))
        flight.inputs = inputs
        return outputs

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> Any:
        def plain(ts: tuple | None) -> tuple | None:
            return None if ts is None else tuple(t.detach() if torch.is_tensor(t) else t for t in ts)
        return {"source": self.name, "lag": self.lag, "most_versions": self.most_versions,
                "velocity": self.velocity,
                "flights": [{"step": f.step, "params": {n: t.detach() for n, t in f.params.items()}, "rng": f.rng,
                             "inputs": plain(f.inputs), "grads": plain(f.grads), "skipped": f.skipped}
                            for f in self.flights.values()]}

    def check_state(self, state: Any) -> None:
        from .local import check_loaded
        check_loaded(self.stage, self.name, state)
        if state["lag"] != self.lag:
            raise ValueError(f"{self.stage.name}: the checkpoint's delayed gradients are {state['lag']} steps stale, "
                             f"this trainer's {self.lag} (another delay or number of stages)")
        names = {n for n, _ in self.stage.module.named_parameters()}
        for f in state["flights"]:
            if set(f["params"]) != names:
                raise ValueError(f"{self.stage.name}: the checkpoint's stashed weights of step {f['step']} are not "
                                 f"this stage's parameters")

    def load_state_dict(self, state: Any, device: torch.device) -> None:
        self.check_state(state)
        live = dict(self.stage.module.named_parameters())

        def to(ts: tuple | None) -> tuple | None:
            return None if ts is None else tuple(t.to(device) if torch.is_tensor(t) else t for t in ts)
        self.flights = {}
        for f in state["flights"]:
            params = {n: t.to(device).requires_grad_(live[n].requires_grad) for n, t in f["params"].items()}
            self.flights[f["step"]] = _InFlight(f["step"], params, list(f["rng"]), to(f["inputs"]), None,
                                                to(f["grads"]), f["skipped"])
        self.most_versions = state["most_versions"]
        self.velocity = None if state["velocity"] is None else {n: t.to(device) for n, t in state["velocity"].items()}


def stage_groups(stage: Stage) -> list[dict[str, Any]]:
    return list(stage.optimizer.param_groups) if stage.optimizer is not None else []


def _rng_states(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _set_rng_states(states: list[torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states[0].cpu())
    if device.type == "cuda" and len(states) > 1:
        torch.cuda.set_rng_state(states[1].cpu(), device)
