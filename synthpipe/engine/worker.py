"""The per-rank worker: one stage per process, update-unlocked (DESIGN.md, "One training step").

Rank 0 is driven by the trainer's data loop (``train_step``/``evaluate``); every other
rank runs :meth:`PipelineWorker.serve`, which processes the messages arriving on its
activation channel until the fit (or evaluation) ends. Messages of one channel arrive
in step order, so a rank processes steps in the same order as rank 0 issued them.

Statistics travel back for free: every gradient message carries, in its header, the
newest loss and the newest synthesizer loss of every boundary downstream, so rank 0 can
show them in its progress bar without any extra communication.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.distributed as dist

from ..stages.stage import NonFiniteError, Stage, all_finite, as_tuple, restore_training_modes, training_modes
from .config import TrainConfig
from .history import StepLog
from .metrics import NULL_TIMERS
from .reference import batch_metrics, mean_metrics, nonfinite_message
from .targets import TargetCache, train_due_synthesizer
from .transport import EVAL, EVAL_END, FIT_END, FLAG_SKIPPED, KIND_NAMES, TRAIN, Channel, Message, limit_sends


class Channels:
    """The four channels of a rank (``None`` where there is no neighbour)."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        # Every rank must create every group, in the same order.
        fwd_groups, bwd_groups = [], []
        for r in range(world_size - 1):
            fwd_groups.append(dist.new_group([r, r + 1]))
            bwd_groups.append(dist.new_group([r, r + 1]))
        self.act_in = Channel(fwd_groups[rank - 1], rank - 1, device, f"activations {rank - 1}->{rank}") if rank > 0 else None
        self.act_out = Channel(fwd_groups[rank], rank + 1, device, f"activations {rank}->{rank + 1}") if rank < world_size - 1 else None
        self.grad_in = Channel(bwd_groups[rank], rank + 1, device, f"gradients {rank + 1}->{rank}") if rank < world_size - 1 else None
        self.grad_out = Channel(bwd_groups[rank - 1], rank - 1, device, f"gradients {rank}->{rank - 1}") if rank > 0 else None

    def flush(self) -> None:
        for ch in (self.act_out, self.grad_out):
            if ch is not None:
                ch.flush()

    def close(self) -> None:
        """Stop the receiver threads (after a flush; nothing may still be expected)."""
        for ch in (self.act_in, self.grad_in):
            if ch is not None:
                ch.close()


class PipelineWorker:
    """Runs ``stage`` as rank ``stage.index`` of a pipeline of ``stage.n_stages`` processes."""

    def __init__(self, stage: Stage, config: TrainConfig, channels: Channels):
        self.stage = stage
        self.config = config
        self.rank = stage.index
        self.world_size = stage.n_stages
        self.ch = channels
        limit_sends((channels.act_out, channels.grad_out), config.max_inflight, config.delay)
        self.cache = TargetCache()
        self.log = StepLog()
        self.outstanding = 0  # gradient messages still to come from rank + 1
        self.locked_grads: dict[int, Message] = {}
        self.stats = [math.nan] * (2 + self.world_size - 1)  # loss, its step, synth loss per boundary
        self.next_step = 0
        self.progress = 0  # steps, batches and gradients done: the watchdog's sign of life
        self._eval = [0.0, 0.0, 0.0]
        self._modes_before_eval: list | None = None  # every submodule's flag, while evaluating
        self.timers = NULL_TIMERS  # metrics.Timers() to profile (the benchmark does)

    @property
    def drives_data(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    @property
    def device(self) -> torch.device:
        return self.stage.device

    # -- receiving gradients ------------------------------------------------------------
    def _receive_gradient(self) -> None:
        """Block for the next gradient message from rank + 1 and file it."""
        assert self.ch.grad_in is not None and self.outstanding > 0
        msg = self.ch.grad_in.recv()
        self.outstanding -= 1
        self.progress += 1
        if msg.stats:
            n = min(len(msg.stats), len(self.stats))
            own = 2 + self.rank
            self.stats[:n] = [v if i != own else self.stats[i] for i, v in enumerate(msg.stats[:n])]
        if self.config.locked(msg.step):
            self.locked_grads[msg.step] = msg
        if self.config.trains_synthesizers and self.cache.get(msg.step) is not None:
            self.cache.put_target(msg.step, msg.tensors, skipped=msg.skipped)

    def _poll_gradients(self) -> None:
        """File every gradient message that has already arrived (never blocks)."""
        while self.outstanding > 0 and self.ch.grad_in.ready():
            with self.timers.section("recv"):
                self._receive_gradient()

    def _wait_target(self, step: int) -> None:
        entry = self.cache.get(step)
        while entry is not None and not entry.ready:
            if self.outstanding == 0:
                raise RuntimeError(f"rank {self.rank}: waiting for the target of step {step}, but none is in flight")
            with self.timers.section("wait", step):
                self._receive_gradient()

    def _wait_locked(self, step: int) -> Message:
        while step not in self.locked_grads:
            if self.outstanding == 0:
                raise RuntimeError(f"rank {self.rank}: waiting for the gradient of step {step}, but none is in flight")
            with self.timers.section("wait", step):
                self._receive_gradient()
        return self.locked_grads.pop(step)

    # -- one training step ----------------------------------------------------------------
    def train_step(self, step: int, x: Any, y: torch.Tensor) -> float | None:
        """Rank 0's entry point (the others get their steps through :meth:`serve`)."""
        return self._train(step, as_tuple(x), y)

    def _send_back(self, step: int, grads: tuple, skipped: bool) -> None:
        if self.ch.grad_out is not None:
            with self.timers.section("send", step):
                self.ch.grad_out.send(TRAIN, step, () if skipped else grads,
                                      flags=FLAG_SKIPPED if skipped else 0, stats=self.stats)

    def _backward_and_update(self, step: int, inputs: tuple, outputs: tuple, grads: tuple | None = None,
                             loss: torch.Tensor | None = None) -> None:
        # The input gradient is final once backward is done: send it before the update, so
        # it crosses (and rank - 1 can train its synthesizer) while this rank updates.
        with self.timers.section("backward", step):
            self.stage.backward(outputs, grads, loss=loss)
        self._send_back(step, self.stage.input_gradient(inputs), skipped=False)
        with self.timers.section("update", step):
            self.stage.step()

    def _train(self, step: int, x: tuple, y: torch.Tensor) -> float | None:
        cfg, stage, tm = self.config, self.stage, self.timers
        locked = cfg.locked(step)
        self.next_step = step + 1
        self.progress += 1
        with tm.section("forward", step):
            inputs, outputs = stage.forward(x)
        if self.ch.act_out is not None:
            with tm.section("send", step):
                self.ch.act_out.send(TRAIN, step, (*outputs, y))
            self.outstanding += 1
            self.ch.grad_in.expect()  # its gradient comes back on the receiver thread
            if cfg.trains_synthesizers:
                self.cache.add(step, outputs, y)
        result: float | None = None
        if self.is_last:
            with tm.section("forward", step):
                loss = stage.loss(outputs, y)
                ok = all_finite([loss.detach()])
            if not ok:
                stage.undo_forward()
                if cfg.nonfinite == "raise":
                    raise NonFiniteError(nonfinite_message(stage, "the loss", step, loss))
            else:
                result = float(loss.detach())
                self.stats[0], self.stats[1] = result, float(step)  # travels with this step's gradient
                self.log.put(step, "loss", result)
                self._backward_and_update(step, inputs, outputs, loss=loss)
        else:
            if locked:
                msg = self._wait_locked(step)
                ok = not msg.skipped
                grads = msg.tensors
            else:
                self._poll_gradients()
                with tm.section("synth", step):
                    grads = stage.synthetic_gradient(outputs, y)
                    ok = all_finite(grads)
            if not ok:
                stage.undo_forward()  # a skipped step leaves the stage as it was
                if not locked and cfg.nonfinite == "raise":
                    raise NonFiniteError(nonfinite_message(stage, "the synthetic gradient", step))
            else:
                self._backward_and_update(step, inputs, outputs, grads=grads)
        if not ok:
            self._send_back(step, (), skipped=True)
        if self.ch.act_out is not None and cfg.trains_synthesizers:
            with tm.section("synth", step):
                trained = train_due_synthesizer(stage, self.cache, step, cfg.delay, cfg.max_inflight, self._wait_target)
            if trained is not None:
                self.stats[2 + self.rank] = trained
                self.log.put(step, f"synth_loss/{self.rank}", trained)
        return result

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def _eval_batch(self, step: int, x: tuple, y: torch.Tensor) -> None:
        self.progress += 1
        if self._modes_before_eval is None:
            self._modes_before_eval = training_modes(self.stage.module)
            self.stage.module.eval()
        _, outputs = self.stage.forward(x, requires_grad=False)
        if self.ch.act_out is not None:
            self.ch.act_out.send(EVAL, step, (*outputs, y))
        else:
            loss = self.stage.loss(outputs, y)
            t, c, n = batch_metrics(outputs[0], y, loss)
            self._eval = [self._eval[0] + t, self._eval[1] + c, self._eval[2] + n]

    def _finish_eval(self) -> dict[str, float]:
        """Every rank: metrics computed on the last rank, broadcast to all."""
        if self.ch.act_out is not None:
            self.ch.act_out.send(EVAL_END, 0)
        if self._modes_before_eval is not None:
            restore_training_modes(self._modes_before_eval)
            self._modes_before_eval = None
        total, correct, count = self._eval
        self._eval = [0.0, 0.0, 0.0]
        box = [mean_metrics(total, correct, count)]
        dist.broadcast_object_list(box, src=self.world_size - 1)
        return box[0]

    def evaluate(self, batches: Iterable[tuple[Any, torch.Tensor]]) -> dict[str, float]:
        """Rank 0: send every batch through the pipeline; all ranks get the metrics."""
        for i, (x, y) in enumerate(batches):
            self._eval_batch(i, as_tuple(x), y)
            if self.outstanding:
                self._poll_gradients()
        return self._finish_eval()

    # -- the loop of ranks > 0 --------------------------------------------------------------
    def serve(self, until: int = FIT_END) -> dict[str, float] | None:
        """Process messages from rank - 1 until ``until`` (FIT_END or EVAL_END) arrives.

        Returns the evaluation metrics when serving an evaluation.
        """
        assert self.ch.act_in is not None
        while True:
            with self.timers.section("wait"):
                msg = self.ch.act_in.recv()
            self.progress += 1
            if msg.kind in (TRAIN, EVAL):
                self.ch.act_in.expect()  # another message always follows: take it while we compute
            if msg.kind == TRAIN:
                self._train(msg.step, msg.tensors[:-1], msg.tensors[-1])
            elif msg.kind == EVAL:
                self._eval_batch(msg.step, msg.tensors[:-1], msg.tensors[-1])
            elif msg.kind == EVAL_END:
                metrics = self._finish_eval()
                if until == EVAL_END:
                    return metrics
            elif msg.kind == FIT_END:
                if until != FIT_END:
                    raise RuntimeError(f"rank {self.rank}: the fit ended while an evaluation was expected")
                self.end_fit()
                return None
            else:
                raise RuntimeError(f"rank {self.rank}: unexpected message {KIND_NAMES.get(msg.kind, msg.kind)}")

    def close(self) -> None:
        """Stop the channels' receiver threads (after a fit or evaluation has ended)."""
        self.ch.close()

    def end_fit(self) -> None:
        """Pass the end on, collect every gradient still in flight, finish all sends.

        Targets that arrive now are kept (not trained on) so that the next fit, or a run
        resumed from a checkpoint, uses them at exactly the steps it would have.
        """
        if self.ch.act_out is not None:
            self.ch.act_out.send(FIT_END, self.next_step)
        while self.outstanding:
            with self.timers.section("wait"):
                self._receive_gradient()
        self.locked_grads.clear()
        self.ch.flush()

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage.state_dict(), "cache": self.cache.state_dict()}
