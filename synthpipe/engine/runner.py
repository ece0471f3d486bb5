"""The runner protocol: what :class:`~synthpipe.engine.trainer.Trainer` asks of the thing
that runs its stages, so that it never needs to know which one it holds.

Two runners implement it: :class:`~synthpipe.engine.reference.ReferenceRunner` (every
stage in this process) and :class:`~synthpipe.engine.worker.PipelineWorker` (this rank's
stage, the others in their own processes). The trainer's factory picks one.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol

import torch

from ..stages.stage import Stage
from .history import StepLog
from .metrics import Timers
from .step import LiveStats

__all__ = ["Runner"]


class Runner(Protocol):
    """Runs stages; every method is called on every rank unless it says otherwise."""

    @property
    def drives_data(self) -> bool:
        """True where the data loop runs (rank 0, or the single process)."""

    log: StepLog
    """Per-step values of the stages run here (merged into the History by the trainer)."""
    progress: int
    """Steps, batches and gradients done here: the watchdog's sign of life."""
    timers: Timers

    @property
    def stages(self) -> list[Stage]:
        """The stages run in this process."""

    # -- the data loop (where drives_data) and its counterpart elsewhere
    def train_step(self, step: int, x: Any, y: torch.Tensor) -> float | None:
        """One training step; the loss where it is known here, else ``None``."""

    def evaluate(self, batches: Iterable[tuple[Any, torch.Tensor]]) -> dict[str, float]:
        """Forward-only metrics over ``batches``."""

    def serve_fit(self) -> int:
        """Where the data loop does not run: train until the fit ends; the next step id."""

    def serve_evaluation(self) -> dict[str, float]:
        """Where the data loop does not run: take part in an evaluation; the metrics."""

    def end_fit(self) -> None:
        """Drain what is in flight at the end of a fit (or before a checkpoint)."""

    def live_stats(self) -> LiveStats:
        """The newest loss and synthesizer losses known here."""

    # -- state
    def states(self) -> list[tuple[int, dict[str, Any]]]:
        """``[(stage index, state)]`` of the stages this process saves."""

    def prepare_load(self, read: Callable[[int], dict[str, Any]],
                     explain: Callable[[int, Exception], Exception]) -> Any:
        """Read (``read(stage index)``) and check this process's stages; changes nothing.
        A state that does not fit its stage raises ``explain(stage index, error)``."""

    def commit_load(self, prepared: Any) -> dict[str, Any]:
        """Install what ``prepare_load`` returned; one stage's state (its RNG state)."""

    def module_states(self) -> list[dict[str, torch.Tensor]]:
        """Every stage's module ``state_dict``, in stage order (gathered where needed)."""

    # -- the trainer's own bookkeeping across processes
    def share(self, value: Any) -> Any:
        """The data loop's ``value``, everywhere."""

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order."""

    def barrier(self) -> None:
        """Wait for every process."""

    def close(self) -> None:
        """Stop background threads (after a fit or evaluation has ended)."""
