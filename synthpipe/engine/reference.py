"""The single-process reference trainer: every stage in this process, the exact update rule.

It runs the stages of one step in order, 0..N-1, each on the (detached) output of the
one before, and models the pipeline's asynchrony with a fixed target delay d: the
synthesizer of stage r is trained at step t on the target of step t - d. A multi-process
run in fixed-delay mode computes exactly the same numbers (each rank's work at step t
depends only on its own state, step t's input and the target of step t - d), which is
what the determinism tests check.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from ..stages.stage import NonFiniteError, Stage, all_finite, as_tuple, restore_training_modes, training_modes
from .config import DEFAULT_DELAY, TrainConfig
from .history import StepLog
from .targets import TargetCache, train_due_synthesizer


def nonfinite_message(stage: Stage, what: str, step: int, value: Any = None) -> str:
    shown = f" ({float(value.detach())})" if value is not None else ""
    return (f"{stage.name}: {what} is not finite{shown} at step {step}; lower the learning rate "
            f"or the synthetic-gradient scale, or pass nonfinite='skip' to skip such steps")


def batch_metrics(output: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> tuple[float, float, int]:
    """(summed loss, correct predictions, examples) of one batch; accuracy by argmax over the last dim."""
    n = int(y.shape[0])
    correct = 0.0
    if output.dim() >= 2 and not y.dtype.is_floating_point and output.shape[:-1] == y.shape:
        correct = float((output.argmax(-1) == y.to(output.device)).float().mean()) * n
    return float(loss.detach()) * n, correct, n


def mean_metrics(total: float, correct: float, count: float) -> dict[str, float]:
    """``{"loss", "accuracy", "samples"}`` from sums over batches; NaN when there were none."""
    if not count:
        return {"loss": float("nan"), "accuracy": float("nan"), "samples": 0}
    return {"loss": total / count, "accuracy": correct / count, "samples": int(count)}


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   device: torch.device | str) -> dict[str, float]:
    """Cross-entropy (mean) and accuracy of an unsplit classifier; its train/eval mode is restored.

    The ground truth the launcher and the benchmark compare pipelines against.
    """
    modes = training_modes(model)
    model.eval()
    total = correct = count = 0.0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            out = model(x)
            total += float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += float((out.argmax(-1) == y).sum())
            count += int(y.shape[0])
    finally:
        restore_training_modes(modes)
    metrics = mean_metrics(total, correct, count)
    del metrics["samples"]
    return metrics


class ReferenceRunner:
    """Runs all ``stages`` in this process with the update rule of :class:`Stage`."""

    drives_data = True

    def __init__(self, stages: Sequence[Stage], config: TrainConfig):
        self.stages = list(stages)
        self.config = config
        self.delay = DEFAULT_DELAY if config.delay is None else config.delay
        self.caches = [TargetCache() for _ in self.stages[:-1]]
        self.log = StepLog()

    @property
    def device(self) -> torch.device:
        return self.stages[0].device

    def _no_wait(self, step: int) -> None:
        raise RuntimeError(f"internal error: target of step {step} missing in the reference trainer")

    def train_step(self, step: int, x: Any, y: torch.Tensor) -> float | None:
        """One training step of every stage. Returns the loss (``None`` if skipped)."""
        cfg = self.config
        locked = cfg.locked(step)
        last = len(self.stages) - 1
        h = as_tuple(x)
        saved: list[tuple[tuple, tuple]] = []
        for r, stage in enumerate(self.stages):
            inputs, outputs = stage.forward(h)
            saved.append((inputs, outputs))
            if r < last and cfg.trains_synthesizers:
                self.caches[r].add(step, outputs, y)
            if r < last and not locked:
                grads = stage.synthetic_gradient(outputs, y)
                if all_finite(grads):
                    stage.backward(outputs, grads)
                    stage.step()
                    if r > 0:
                        self._put_target(r - 1, step, stage.input_gradient(inputs))
                else:
                    stage.undo_forward()
                    if cfg.nonfinite == "raise":
                        raise NonFiniteError(nonfinite_message(stage, "the synthetic gradient", step))
                    if r > 0:
                        self._put_target(r - 1, step, (), skipped=True)
            h = tuple(o.detach() if torch.is_tensor(o) else o for o in outputs)

        loss = self.stages[last].loss(saved[last][1], y)
        finite = all_finite([loss.detach()])
        # Backward from the last stage: one stage when update-unlocked, all when locked.
        first_backward = 0 if locked else last
        if not finite:
            for stage in self.stages[first_backward:]:
                stage.undo_forward()  # the stages this loss would have trained skip the step
            if cfg.nonfinite == "raise":
                raise NonFiniteError(nonfinite_message(self.stages[last], "the loss", step, loss))
        grad: tuple | None = None
        for r in range(last, first_backward - 1, -1):
            stage, (inputs, outputs) = self.stages[r], saved[r]
            if finite:
                if r == last:
                    stage.backward(outputs, loss=loss)
                else:
                    stage.backward(outputs, grad)
                stage.step()
                grad = stage.input_gradient(inputs)
            if r > 0:
                self._put_target(r - 1, step, grad or (), skipped=not finite)
        if finite:
            self.log.put(step, "loss", float(loss.detach()))
        for r, cache in enumerate(self.caches):
            trained = train_due_synthesizer(self.stages[r], cache, step, self.delay,
                                            cfg.max_inflight, self._no_wait)
            if trained is not None:
                self.log.put(step, f"synth_loss/{r}", trained)
        return float(loss.detach()) if finite else None

    def _put_target(self, boundary: int, step: int, target: tuple, skipped: bool = False) -> None:
        if self.config.trains_synthesizers:
            self.caches[boundary].put_target(step, target, skipped)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[Any, torch.Tensor]]) -> dict[str, float]:
        """Mean loss and accuracy over ``batches`` (modules in eval mode, restored after)."""
        modes = [training_modes(s.module) for s in self.stages]
        for s in self.stages:
            s.module.eval()
        total = correct = count = 0.0
        try:
            for x, y in batches:
                h = as_tuple(x)
                for stage in self.stages:
                    _, h = stage.forward(h, requires_grad=False)
                loss = self.stages[-1].loss(h, y)
                t, c, n = batch_metrics(h[0], y, loss)
                total, correct, count = total + t, correct + c, count + n
        finally:
            for saved in modes:
                restore_training_modes(saved)
        return mean_metrics(total, correct, count)

    def end_fit(self) -> None:
        """Nothing is in flight in one process; pending entries stay for the next fit."""

    # -- state ----------------------------------------------------------------------
    def state_dicts(self) -> list[dict[str, Any]]:
        """One dict per stage (as a rank would save it)."""
        return [{"stage": s.state_dict(), "cache": self.caches[r].state_dict() if r < len(self.caches) else []}
                for r, s in enumerate(self.stages)]

    def load_state_dicts(self, states: Sequence[dict[str, Any]]) -> None:
        # Every stage is checked before any changes: a bad checkpoint leaves all as they were.
        prepared = [stage.prepare_load(state["stage"]) for stage, state in zip(self.stages, states)]
        for r, (stage, state, ready) in enumerate(zip(self.stages, states, prepared)):
            stage.commit_load(state["stage"], ready)
            if r < len(self.caches):
                self.caches[r].load_state_dict(state["cache"], stage.device)
