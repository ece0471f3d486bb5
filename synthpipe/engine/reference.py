"""The single-process reference trainer: every stage in this process, the exact update rule.

It runs the stages of one step in order, 0..N-1, each on the (detached) output of the
one before, and models the pipeline's asynchrony with a fixed target delay d: the
synthesizer of stage r is trained at step t on the target of step t - d. A multi-process
run in fixed-delay mode computes exactly the same numbers (each rank's work at step t
depends only on its own state, step t's input and the target of step t - d), which is
what the determinism tests check.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import torch

from ..stages.input_synth import InputSynthesizer
from ..stages.stage import NonFiniteError, Stage, all_finite, as_tuple, restore_training_modes, training_modes
from .config import DEFAULT_DELAY, TrainConfig
from .history import StepLog
from .metrics import Timers
from .sources import SOURCES, make_source
from .step import Begun, LiveStats, StageStep
from .synthetic_inputs import input_seed, real_forward

__all__ = ["ReferenceRunner", "batch_metrics", "mean_metrics", "evaluate_model"]


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


class _HandOff:
    """The :class:`~synthpipe.engine.step.Links` of stage r in one process.

    Activations are passed on by the runner's loop itself; a gradient stage r sends back
    goes straight to stage r - 1's source (and, when r - 1 waits for it, to its update).
    Nothing can be waited for: every message of a step exists before anyone needs it.
    """

    def __init__(self, runner: "ReferenceRunner", index: int):
        self.runner = runner
        self.index = index

    def send_activation(self, step: int, outputs: tuple, y: Any) -> None:
        pass

    def send_gradient(self, step: int, grads: tuple, skipped: bool) -> None:
        upstream = self.runner.steps[self.index - 1]
        upstream.received(step, grads, skipped)
        self.runner.downstream[self.index - 1] = (grads, skipped)

    def wait_gradient(self, step: int) -> tuple[tuple, bool]:
        grads = self.runner.downstream.pop(self.index, None)
        if grads is None:
            raise RuntimeError(f"internal error: stage {self.index} waits for the gradient of step {step}, "
                               f"which stage {self.index + 1} has not sent")
        return grads

    def wait_received(self, step: int) -> None:
        raise RuntimeError(f"internal error: target of step {step} missing in the reference trainer")

    def poll(self) -> None:
        pass


class ReferenceRunner:
    """Runs all ``stages`` in this process with the update rule of :class:`StageStep`.

    Per step: every stage's forward (and its source's ``early`` work) in order (an
    update-unlocked stage updates right after its own), then the locked stages' updates
    from the last to the first, then each gradient source's work (training the synthesizers on
    the targets now due). With
    ``delay=None`` the source's ``default_delay`` is modelled (``DEFAULT_DELAY`` for the
    synthesizer targets), or none where the source has no use for one.

    ``synthetic_inputs``: forward unlocking (docs/paper.md, "Synthetic inputs"). The data
    ``x`` is at hand in this process; every stage r > 0 owns an
    :class:`~synthpipe.stages.input_synth.InputSynthesizer` ``I_r`` and, per step, in
    stage order: runs its forward, synthetic-gradient update (and ``after`` work) on
    ``I_r(x)``, takes back what that forward did to its norm layers' running statistics,
    trains ``I_r`` on the real input ``h_{r-1}`` (the real chain's output of stage r - 1,
    this very step: no delay is modelled for it), then runs the real input through
    without updating (:meth:`_real_forward`): its output is stage r + 1's real input and
    ``M_r``'s regression input, and the gradient at the real input, through ``M_r`` (or
    the loss), is ``M_{r-1}``'s target. So every regression target, and the norm layers'
    running statistics, come from the real chain, the network :meth:`evaluate` runs;
    only the updates use predicted inputs. The price: a second forward and an
    input-only backward per stage r > 0.
    """

    drives_data = True
    progress = 0  # (one process: the watchdog never watches it)

    def __init__(self, stages: Sequence[Stage], config: TrainConfig):
        self.stages = list(stages)
        self.config = config
        source = SOURCES[config.gradients]
        default = DEFAULT_DELAY if source.default_delay is None else source.default_delay
        # (a source for which no delay means anything models none)
        self.delay = config.delay if config.delay is not None or not source.uses_delay else default
        modelled = dataclasses.replace(config, delay=self.delay)
        self.log = StepLog()
        self.stats = LiveStats.empty(len(self.stages))
        self.downstream: dict[int, tuple[tuple, bool]] = {}
        self.sources = [make_source(s, modelled) for s in self.stages]
        self.steps = [StageStep(s, modelled, src, _HandOff(self, r), self.log, self.stats)
                      for r, (s, src) in enumerate(zip(self.stages, self.sources, strict=True))]
        self.input_synths: dict[int, InputSynthesizer] = {}
        if config.synthetic_inputs:
            if len(self.stages) < 2:
                raise ValueError("synthetic_inputs=True needs at least 2 stages: it gives every stage r > 0 a "
                                 "synthetic input, and stage 0, the only stage here, reads the data itself")
            self.input_synths = {r: InputSynthesizer(r, s.synth_optimizer_factory, config.input_synth_hidden,
                                                     s.device, seed=input_seed(r))
                                 for r, s in enumerate(self.stages) if r > 0}

    @property
    def caches(self) -> list[Any]:
        """Each boundary's target cache (synthetic gradients only)."""
        return [getattr(src, "cache", None) for src in self.sources[:-1]]

    @property
    def timers(self) -> Timers:
        return self.steps[0].timers

    @timers.setter
    def timers(self, timers: Timers) -> None:
        for s in self.steps:
            s.timers = timers

    @property
    def device(self) -> torch.device:
        return self.stages[0].device

    def live_stats(self) -> LiveStats:
        return self.stats

    def train_step(self, step: int, x: Any, y: torch.Tensor) -> float | None:
        """One training step of every stage. Returns the loss (``None`` if skipped)."""
        h = as_tuple(x)
        self.downstream.clear()
        if self.input_synths:
            return self._train_unlocked(step, h, y)
        waiting: list[tuple[int, Begun]] = []  # locked stages, waiting for r + 1's gradient
        loss: float | None = None
        try:
            for r, stage_step in enumerate(self.steps):
                begun = stage_step.begin(step, h, y)
                stage_step.early(begun)
                if stage_step.waits(step):
                    waiting.append((r, begun))
                else:
                    loss = stage_step.update(begun)
                h = tuple(o.detach() if torch.is_tensor(o) else o for o in begun.outputs)
            while waiting:  # the true gradient, from the last locked stage down
                r, begun = waiting[-1]
                self.steps[r].update(begun, self.steps[r].links.wait_gradient(step))
                waiting.pop()
        except NonFiniteError:
            for r, _ in waiting:  # the stages this loss would have trained skip the step
                self.stages[r].undo_forward()
            raise
        for stage_step in self.steps:
            stage_step.after(step)
        return loss

    def _train_unlocked(self, step: int, x: tuple, y: torch.Tensor) -> float | None:
        """One step with synthetic inputs: each stage r > 0 trains on ``I_r(x)``, ``I_r`` on the real input."""
        real, loss = x, None
        for r, (stage, stage_step) in enumerate(zip(self.stages, self.steps, strict=True)):
            synth = self.input_synths.get(r)
            if synth is not None and not synth.ready():
                synth.build(x, real)
            begun = stage_step.begin(step, real if synth is None else synth.predict(x), y)
            stage_step.early(begun)
            loss = stage_step.update(begun)
            stage_step.after(step)
            if synth is None:  # (stage 0: the data is its real input)
                real = tuple(o.detach() if torch.is_tensor(o) else o for o in begun.outputs)
                continue
            stage.undo_forward()  # (running statistics follow the real inputs, below)
            self.log.put(step, f"input_loss/{r}", synth.train(x, real))
            real = self._real_forward(r, step, real, y)
        return loss

    def _real_forward(self, r: int, step: int, real: tuple, y: torch.Tensor) -> tuple:
        """Stage r on its real input (:func:`~synthpipe.engine.synthetic_inputs.real_forward`):
        hands stage r - 1 its target, returns the real output (stage r + 1's real input).
        Nothing is sent where stage r skipped the step (``p_update``): its predicted pass
        already said so."""
        out, target = real_forward(self.stages[r], self.sources[r], self.config, step, real, y)
        if target is not None:
            self.steps[r - 1].received(step, target, skipped=not all_finite(target))
        return out

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
        """Every message is delivered in one process; pending entries stay for the next fit.

        Each source's ``finish`` runs from the last stage down, as the ranks drain.
        """
        for stage_step in reversed(self.steps):
            if stage_step.has_next:
                stage_step.source.finish(stage_step)

    def serve_fit(self) -> int:
        raise RuntimeError("the reference runner drives the data itself; it has nothing to serve")

    def serve_evaluation(self) -> dict[str, float]:
        raise RuntimeError("the reference runner drives the data itself; it has nothing to serve")

    # -- state ----------------------------------------------------------------------
    def states(self) -> list[tuple[int, dict[str, Any]]]:
        """``[(stage index, state)]`` for every stage (as each rank would save it)."""
        return [(r, {"stage": s.state_dict(), "cache": src.state_dict(),
                     **({"input": self.input_synths[r].state_dict()} if r in self.input_synths else {})})
                for r, (s, src) in enumerate(zip(self.stages, self.sources, strict=True))]

    def prepare_load(self, read: Callable[[int], dict[str, Any]],
                     explain: Callable[[int, Exception], Exception]) -> Any:
        """Read and check every stage's part; changes nothing (a bad part leaves all as they were).

        Raises what reading raised, and ``explain(stage index, error)`` for a part that does
        not fit its stage.
        """
        states = [read(r) for r in range(len(self.stages))]
        ready = []
        for r, (stage, source, state) in enumerate(zip(self.stages, self.sources, states, strict=True)):
            try:
                ready.append(stage.prepare_load(state["stage"]))
                source.check_state(state["cache"])
            except (ValueError, KeyError) as e:
                raise explain(r, e) from e
        return states, ready

    def commit_load(self, prepared: Any) -> dict[str, Any]:
        """Install what :meth:`prepare_load` accepted; returns stage 0's state (RNG, step)."""
        states, ready = prepared
        for stage, source, state, part in zip(self.stages, self.sources, states, ready, strict=True):
            stage.commit_load(state["stage"], part)
            source.load_state_dict(state["cache"], stage.device)
        for r, synth in self.input_synths.items():
            if "input" in states[r]:
                synth.load_state_dict(states[r]["input"])
        return states[0]

    def module_states(self) -> list[dict[str, torch.Tensor]]:
        """Every stage's module state, in stage order."""
        return [s.module.state_dict() for s in self.stages]

    def share(self, value: Any) -> Any:
        return value

    def gather(self, value: Any) -> list[Any]:
        return [value]

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass
