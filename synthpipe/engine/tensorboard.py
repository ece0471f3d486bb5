"""TensorBoard scalars of a fit (``Trainer(log_dir=...)``, ``synthpipe train --tensorboard DIR``).

Every process writes what it computes itself, so nothing extra crosses between ranks:
in one process everything goes to ``log_dir``; under torchrun rank r writes into
``log_dir/rank<r>`` (one TensorBoard run per rank). The scalars, by tag:

========================================  =============================================  =========
tag                                       value                                          written by
========================================  =============================================  =========
``train/loss``                            the last stage's training loss                 last rank
``synthesizer/loss/boundary_<b>``         boundary b's synthesizer regression loss (MSE)  rank b
``train/lr/stage_<r>``                    stage r's learning rate at that step           rank r
``train/grad_norm/stage_<r>``             stage r's gradient 2-norm (before clipping)    rank r
``train/samples_per_s``                   training throughput since the epoch began      rank 0
``time/busy_fraction/rank_<r>``           share of wall time rank r computed             rank r
``time/wait_fraction/rank_<r>``           share of wall time rank r waited               rank r
``eval/loss``, ``eval/accuracy``          the evaluation after each epoch                rank 0
========================================  =============================================  =========

Step values are written every ``log_every`` steps (the steps ``s`` with ``s % log_every == 0``);
the busy and wait fractions cover the time since the previous such write (from the
rank's :class:`~synthpipe.engine.metrics.Timers`).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

from .metrics import BUSY_KINDS, WAIT_KINDS, Timers

__all__ = ["TensorBoardLog", "require_tensorboard", "tag_of"]


def require_tensorboard(option: str = "log_dir") -> Any:
    """``torch.utils.tensorboard.SummaryWriter``.

    Raises:
        ImportError: the ``tensorboard`` package is not installed; the message names ``option``.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(f"{option} writes TensorBoard scalars and needs the tensorboard package, which is not "
                          f"installed ({e}); pip install 'synthpipe[tensorboard]' (or tensorboard), or leave "
                          f"{option} out") from None
    return SummaryWriter


def tag_of(key: str) -> str | None:
    """The TensorBoard tag of a step-log key (``None``: not written)."""
    if key == "loss":
        return "train/loss"
    name, _, index = key.partition("/")
    if not index:
        return None
    return {"synth_loss": f"synthesizer/loss/boundary_{index}", "lr": f"train/lr/stage_{index}",
            "grad_norm": f"train/grad_norm/stage_{index}"}.get(name)


class TensorBoardLog:
    """One process's TensorBoard writer.

    Args:
        log_dir: the run's directory (created if missing).
        rank, world_size: this process's place; with ``world_size > 1`` it writes into
            ``log_dir/rank<rank>``.
        every: write the values of every ``every``-th step.
        timers: returns the process's current :class:`Timers` (a disabled one: no fractions).
        clock: wall clock in seconds, for the fractions.

    Raises:
        ImportError: tensorboard is not installed (see :func:`require_tensorboard`).
    """

    def __init__(self, log_dir: str, rank: int, world_size: int, every: int,
                 timers: Callable[[], Any], clock: Callable[[], float] = time.perf_counter):
        writer = require_tensorboard()
        self.directory = log_dir if world_size <= 1 else os.path.join(log_dir, f"rank{rank}")
        self.writer = writer(self.directory)
        self.rank = rank
        self.every = every
        self.timers = timers
        self.clock = clock
        self._next_timing = 0
        self._last: tuple[float, float, float] | None = None  # (wall, busy, wait) at the last write

    def put(self, step: int, key: str, value: Any) -> None:
        """A :class:`~synthpipe.engine.history.StepLog` sink: write ``key`` if its step is due."""
        if step % self.every:
            return
        tag = tag_of(key)
        if tag is not None and isinstance(value, (int, float)):
            self.writer.add_scalar(tag, float(value), step)
        if step >= self._next_timing:
            self._next_timing = step + self.every
            self._write_timing(step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Write one scalar now (throughput, evaluation metrics)."""
        self.writer.add_scalar(tag, float(value), step)

    def _write_timing(self, step: int) -> None:
        timers = self.timers()
        if not isinstance(timers, Timers):
            return
        totals = timers.totals()
        now = self.clock()
        busy = sum(totals.get(k, 0.0) for k in BUSY_KINDS)
        wait = sum(totals.get(k, 0.0) for k in WAIT_KINDS)
        if self._last is not None and now > self._last[0]:
            wall = now - self._last[0]
            self.writer.add_scalar(f"time/busy_fraction/rank_{self.rank}", (busy - self._last[1]) / wall, step)
            self.writer.add_scalar(f"time/wait_fraction/rank_{self.rank}", (wait - self._last[2]) / wall, step)
        self._last = (now, busy, wait)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
