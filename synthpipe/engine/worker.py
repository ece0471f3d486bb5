"""The per-rank worker: one stage per process, update-unlocked (docs/guide.md, "How a step runs").

Rank 0 is driven by the trainer's data loop (``train_step``/``evaluate``); every other
rank runs :meth:`PipelineWorker.serve`, which processes the messages arriving on its
activation channel until the fit (or evaluation) ends. Messages of one channel arrive
in step order, so a rank processes steps in the same order as rank 0 issued them.

Statistics travel back for free: every gradient message carries, in its header, the
newest loss and the newest synthesizer loss of every boundary downstream, so rank 0 can
show them in its progress bar without any extra communication.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..stages.input_synth import InputSynthesizer
from ..stages.stage import Stage, all_finite, as_tuple, restore_training_modes, training_modes
from .config import TrainConfig
from .data_parallel import Replicas, merge_cache_states, merge_replay_states, split_cache_state, split_replay_state
from .history import StepLog
from .metrics import Timers
from .reference import batch_metrics, mean_metrics
from .sources import make_source
from .step import LiveStats, StageStep
from .synthetic_inputs import input_seed, meta_input, real_forward
from .transport import EVAL, EVAL_END, FIT_END, FLAG_SKIPPED, KIND_NAMES, TRAIN, Channel, Message, limit_sends

__all__ = ["Channels", "PipelineWorker"]


class Channels:
    """The four channels of a rank (``None`` where there is no neighbour).

    ``rank`` and ``world_size`` are global; with ``n_stages`` < ``world_size`` the job
    runs ``world_size // n_stages`` pipelines side by side, each a block of consecutive
    ranks, and a rank's neighbours are those of its own pipeline.

    ``data=True`` (synthetic inputs) adds a data channel from each pipeline's first rank
    to every other rank of it: ``data_out`` (one per later stage, in stage order) on the
    first rank, ``data_in`` on the others.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, n_stages: int | None = None,
                 data: bool = False):
        n = world_size if n_stages is None else n_stages
        # Every rank must create every group, in the same order: pipeline by pipeline.
        fwd_groups, bwd_groups, data_groups = {}, {}, {}
        for first in range(0, world_size, n):
            for r in range(first, first + n - 1):
                fwd_groups[r] = dist.new_group([r, r + 1])
                bwd_groups[r] = dist.new_group([r, r + 1])
            if data:
                for r in range(first + 1, first + n):
                    data_groups[r] = dist.new_group([first, r])
        stage = rank % n
        first, last = stage == 0, stage == n - 1
        head = rank - stage  # this pipeline's first rank
        self.data_out = [Channel(data_groups[r], r, device, f"data {rank}->{r}")
                         for r in range(rank + 1, rank + n)] if data and first else []
        self.data_in = (Channel(data_groups[rank], head, device, f"data {head}->{rank}")
                        if data and not first else None)
        self.act_in = None if first else Channel(fwd_groups[rank - 1], rank - 1, device,
                                                 f"activations {rank - 1}->{rank}")
        self.act_out = None if last else Channel(fwd_groups[rank], rank + 1, device,
                                                 f"activations {rank}->{rank + 1}")
        self.grad_in = None if last else Channel(bwd_groups[rank], rank + 1, device,
                                                 f"gradients {rank + 1}->{rank}")
        self.grad_out = None if first else Channel(bwd_groups[rank - 1], rank - 1, device,
                                                   f"gradients {rank}->{rank - 1}")

    def flush(self) -> None:
        for ch in (self.act_out, self.grad_out, *self.data_out):
            if ch is not None:
                ch.flush()

    def close(self) -> None:
        """Stop the receiver threads (after a flush; nothing may still be expected)."""
        for ch in (self.act_in, self.grad_in, self.data_in):
            if ch is not None:
                ch.close()


class PipelineWorker:
    """Runs ``stage`` as rank ``stage.index`` of a pipeline of ``stage.n_stages`` processes.

    It is the :class:`~synthpipe.engine.step.Links` of its :class:`StageStep`: activations
    go out on the forward channel, and gradient messages from rank + 1 are taken on its
    receiver thread and handed to the stage's gradient source as they arrive.
    """

    def __init__(self, stage: Stage, config: TrainConfig, channels: Channels,
                 replicas: Replicas | None = None, pipeline_group: Any = None,
                 upstream: Sequence[nn.Module] = ()):
        self.stage = stage
        self.config = config
        self.rank = stage.index
        self.world_size = stage.n_stages
        self.ch = channels
        limit_sends((channels.act_out, channels.grad_out, *channels.data_out), config.max_inflight, config.delay)
        self.replicas = replicas  # the same stage in the other pipelines (data parallelism)
        self.pipeline_group = pipeline_group  # this pipeline's ranks (None: the whole job is one)
        self.log = StepLog()
        self.stats = LiveStats.empty(self.world_size)
        self.source = make_source(stage, config)
        reduce = None
        if replicas is not None:
            replicas.broadcast(stage.module)  # every replica starts from replica 0's weights
            stage.replicate = replicas.replicate  # and so does every synthesizer, when built
            self.source.replicas = replicas
            params = list(stage.module.parameters())

            def reduce(ok: bool) -> bool:
                return replicas.average_gradients(params, ok)
        self.step_runner = StageStep(stage, config, self.source, self, self.log, self.stats, reduce)
        self.outstanding = 0  # gradient messages still to come from rank + 1
        self.locked_grads: dict[int, Message] = {}
        self._received_upto = -1  # messages from rank + 1 arrive in step order
        self.next_step = 0
        self.progress = 0  # steps, batches and gradients done: the watchdog's sign of life
        self._eval = [0.0, 0.0, 0.0]
        self._modes_before_eval: list | None = None  # every submodule's flag, while evaluating
        # Forward unlocking (synthetic inputs, ranks > 0): the batches trained on predicted
        # inputs whose real input is still to be run, and real inputs received ahead of that.
        self.input_synth: InputSynthesizer | None = None
        if config.synthetic_inputs and not stage.is_first:
            self.input_synth = InputSynthesizer(self.rank, stage.synth_optimizer_factory, config.input_synth_hidden,
                                                stage.device, seed=input_seed(self.rank))
        self.upstream = list(upstream)  # stages 0..r-1's modules: the input's shapes, before it arrives
        self._unreal: deque[tuple[int, tuple, torch.Tensor]] = deque()
        self._reals: dict[int, tuple] = {}
        self.reals_received = 0
        self.reals_before_build: int | None = None  # real inputs in when I_r was sized (0: from meta shapes)
        self._predicting = False  # a pass on predicted inputs sends nothing
        self.most_unreal = 0  # the most batches left waiting for their real input after a step (<= unlock_lag)

    @property
    def stages(self) -> list[Stage]:
        """The stages this process runs (its own)."""
        return [self.stage]

    @property
    def timers(self) -> Timers:
        return self.step_runner.timers

    @timers.setter
    def timers(self, timers: Timers) -> None:
        self.step_runner.timers = timers

    @property
    def drives_data(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    @property
    def device(self) -> torch.device:
        return self.stage.device

    def live_stats(self) -> LiveStats:
        return self.stats

    # -- links: receiving gradients ------------------------------------------------------
    def _receive_gradient(self) -> None:
        """Block for the next gradient message from rank + 1 and hand it to the source."""
        assert self.ch.grad_in is not None and self.outstanding > 0
        msg = self.ch.grad_in.recv()
        self.outstanding -= 1
        self.progress += 1
        self._received_upto = msg.step
        if self.step_runner.waits(msg.step):
            self.locked_grads[msg.step] = msg
        self.step_runner.received(msg.step, msg.tensors, msg.skipped, msg.stats)

    def poll(self) -> None:
        """File every gradient message that has already arrived (never blocks)."""
        while self.outstanding > 0 and self.ch.grad_in is not None and self.ch.grad_in.ready():
            with self.timers.section("recv"):
                self._receive_gradient()

    def wait_received(self, step: int) -> None:
        while self._unreal and self._unreal[0][0] <= step:  # (its target needs its real output first)
            self._run_real()
        while self._received_upto < step:
            if self.outstanding == 0:
                raise RuntimeError(f"rank {self.rank}: waiting for the target of step {step}, but none is in flight")
            with self.timers.section("wait", step):
                self._receive_gradient()

    def wait_gradient(self, step: int) -> tuple[tuple, bool]:
        while step not in self.locked_grads:
            if self.outstanding == 0:
                raise RuntimeError(f"rank {self.rank}: waiting for the gradient of step {step}, but none is in flight")
            self._receive_gradient()
        msg = self.locked_grads.pop(step)
        return msg.tensors, msg.skipped

    # -- links: sending -----------------------------------------------------------------
    def send_activation(self, step: int, outputs: tuple, y: Any) -> None:
        if self._predicting:
            return  # (the real output of this step goes, once its real input has run)
        assert self.ch.act_out is not None
        self.ch.act_out.send(TRAIN, step, (*outputs, y))
        if self.step_runner.source_sends_back:
            assert self.ch.grad_in is not None
            self.outstanding += 1
            self.ch.grad_in.expect()  # its gradient comes back on the receiver thread

    def send_gradient(self, step: int, grads: tuple, skipped: bool) -> None:
        if self._predicting:
            return  # (the target comes from the real input's pass)
        if self.ch.grad_out is not None:
            self.ch.grad_out.send(TRAIN, step, () if skipped else grads,
                                  flags=FLAG_SKIPPED if skipped else 0, stats=self.stats.to_list())

    # -- one training step ----------------------------------------------------------------
    def train_step(self, step: int, x: Any, y: torch.Tensor) -> float | None:
        """Rank 0's entry point (the others get their steps through :meth:`serve`)."""
        x = as_tuple(x)
        for ch in self.ch.data_out:  # synthetic inputs: the data goes to every stage first
            with self.timers.section("send", step):  # (its tensors: all an input synthesizer reads)
                ch.send(TRAIN, step, (*(t for t in x if torch.is_tensor(t)), y))
        return self._train(step, x, y)

    def _train(self, step: int, x: tuple, y: torch.Tensor) -> float | None:
        self.next_step = step + 1
        self.progress += 1
        return self.step_runner.run(step, x, y)

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
        """Every rank: the sums of every pipeline's last rank, added up, on every rank."""
        if self.ch.act_out is not None:
            self.ch.act_out.send(EVAL_END, 0)
        if self._modes_before_eval is not None:
            restore_training_modes(self._modes_before_eval)
            self._modes_before_eval = None
        total, correct, count = self._eval
        self._eval = [0.0, 0.0, 0.0]
        sums: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(sums, (total, correct, count))
        return mean_metrics(*(sum(s[i] for s in sums) for i in range(3)))

    def evaluate(self, batches: Iterable[tuple[Any, torch.Tensor]]) -> dict[str, float]:
        """Rank 0: send every batch through the pipeline; all ranks get the metrics."""
        for ch in self.ch.data_out:  # (the others stop reading data: the batches come on the real chain)
            ch.send(EVAL, 0)
        for i, (x, y) in enumerate(batches):
            self._eval_batch(i, as_tuple(x), y)
            if self.outstanding:
                self.poll()
        return self._finish_eval()

    # -- the loop of ranks > 0 --------------------------------------------------------------
    def serve_fit(self) -> int:
        """Ranks > 0: train on the steps rank 0 sends until the fit ends; returns the next step."""
        if self.input_synth is not None:
            self._serve_unlocked()
        else:
            self.serve()
        return self.next_step

    def serve_evaluation(self) -> dict[str, float]:
        """Ranks > 0: take part in rank 0's evaluation; returns the metrics."""
        if self.ch.data_in is not None:
            self._data_marker(EVAL)
        metrics = self.serve(until=EVAL_END)
        assert metrics is not None
        return metrics

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

    # -- forward unlocking: synthetic inputs (ranks > 0) --------------------------------------
    @property
    def unlock_lag(self) -> int:
        """The most batches a rank trains on predicted inputs ahead of their real input: 0 with
        a fixed ``delay`` (each real input runs right after its step, as in one process),
        else ``max_inflight``."""
        return 0 if self.config.delay is not None else self.config.max_inflight

    def _data_marker(self, kind: int) -> None:
        assert self.ch.data_in is not None
        msg = self.ch.data_in.recv()
        if msg.kind != kind:
            raise RuntimeError(f"rank {self.rank}: expected a {KIND_NAMES[kind]} message from rank "
                               f"{self.ch.data_in.peer}'s data, got {KIND_NAMES.get(msg.kind, msg.kind)}")

    def _serve_unlocked(self) -> None:
        """Ranks > 0 with synthetic inputs: train on the data rank 0 sends, each batch on
        predicted inputs as soon as it comes; real inputs are run as they arrive, at most
        :attr:`unlock_lag` batches behind. An evaluation (a marker on the data channel)
        first runs every real input still due, then serves the evaluation batches."""
        data, act = self.ch.data_in, self.ch.act_in
        assert data is not None and act is not None
        while True:
            if act.expected == 0:
                act.expect()  # (a real input or the fit's end always comes next)
            with self.timers.section("wait"):
                msg = data.recv()
            self.progress += 1
            if msg.kind == TRAIN:
                data.expect()  # another message always follows: take it while we compute
                self._train_unlocked(msg.step, msg.tensors[:-1], msg.tensors[-1])
            elif msg.kind == EVAL:
                self._catch_up()
                self.serve(until=EVAL_END)
            elif msg.kind == FIT_END:
                self._catch_up()
                end = act.recv()
                if end.kind != FIT_END:
                    raise RuntimeError(f"rank {self.rank}: the fit ended on the data channel, but rank {self.rank - 1} "
                                       f"sent a {KIND_NAMES.get(end.kind, end.kind)} message")
                self.end_fit()
                return
            else:
                raise RuntimeError(f"rank {self.rank}: unexpected data message {KIND_NAMES.get(msg.kind, msg.kind)}")

    def _train_unlocked(self, step: int, x: tuple, y: torch.Tensor) -> None:
        """Step ``step`` on ``I_r(x)``: forward, synthetic-gradient update, synthesizer training
        (nothing is sent); then the real inputs that have arrived. The first step waits for
        its real input: ``I_r`` takes its shapes from it."""
        synth = self.input_synth
        assert synth is not None
        self.next_step = step + 1
        self.progress += 1
        if not synth.ready():
            shaped = meta_input(self.upstream, x) if self.upstream else None
            while shaped is None and step not in self._reals:
                self._receive_real()
            synth.build(x, shaped if shaped is not None else self._reals[step])
            self.reals_before_build = self.reals_received
        self._unreal.append((step, x, y))
        runner = self.step_runner
        self._predicting = True
        try:
            begun = runner.begin(step, synth.predict(x), y)
            runner.early(begun)
            runner.update(begun)
        finally:
            self._predicting = False
        runner.after(step)
        self.stage.undo_forward()  # (running statistics follow the real inputs)
        assert self.ch.act_in is not None
        while self._unreal and (len(self._unreal) > self.unlock_lag or self._unreal[0][0] in self._reals
                                or self.ch.act_in.ready()):
            self._run_real()
        self.most_unreal = max(self.most_unreal, len(self._unreal))

    def _receive_real(self) -> None:
        """Take the next real input from rank r - 1 (they come in step order)."""
        assert self.ch.act_in is not None
        with self.timers.section("wait"):
            msg = self.ch.act_in.recv()
        if msg.kind != TRAIN:
            raise RuntimeError(f"rank {self.rank}: expected the real input of a training step from rank "
                               f"{self.rank - 1}, got {KIND_NAMES.get(msg.kind, msg.kind)}")
        self.ch.act_in.expect()  # another message always follows
        self._reals[msg.step] = msg.tensors[:-1]
        self.reals_received += 1

    def _run_real(self) -> None:
        """The oldest predicted batch's real input: train ``I_r`` on it, run it through (no
        update), send its real output on and the target back."""
        step, x, y = self._unreal.popleft()
        while step not in self._reals:
            self._receive_real()
        real = self._reals.pop(step)
        assert self.input_synth is not None
        with self.timers.section("synth", step):
            self.log.put(step, f"input_loss/{self.rank}", self.input_synth.train(x, real))
        with self.timers.section("forward", step):
            out, target = real_forward(self.stage, self.source, self.config, step, real, y)
        self.send_gradient(step, () if target is None else target, skipped=target is None or not all_finite(target))
        if not self.is_last:
            self.send_activation(step, out, y)

    def _catch_up(self) -> None:
        while self._unreal:
            self._run_real()

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
        for ch in self.ch.data_out:
            ch.send(FIT_END, self.next_step)
        self.source.finish(self.step_runner)  # (a source may send back, now, what it would send later)
        while self.outstanding:
            with self.timers.section("wait"):
                self._receive_gradient()
        self.locked_grads.clear()
        self.ch.flush()

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {"stage": self.stage.state_dict(), "cache": self.source.state_dict()}
        if self.input_synth is not None:
            state["input"] = self.input_synth.state_dict()
        return state

    def states(self) -> list[tuple[int, dict[str, Any]]]:
        """``[(stage index, state)]`` for the stage this rank saves (none on replicas > 0).

        With replicas, replica 0 saves the stage with every replica's source state merged
        into the global batch's (:func:`~synthpipe.engine.data_parallel.merge_cache_states`).
        """
        state = self.state_dict()
        if self.replicas is not None:
            shares = self.replicas.gather_object((state["cache"], state["stage"]["synth_replay"]))
            if shares is None:
                return []
            state["cache"] = merge_cache_states([cache for cache, _ in shares])
            state["stage"]["synth_replay"] = merge_replay_states([replay for _, replay in shares])
        return [(self.rank, state)]

    def prepare_load(self, read: Callable[[int], dict[str, Any]],
                     explain: Callable[[int, Exception], Exception]) -> Any:
        """Read this rank's stage with ``read(stage index)`` and check it; changes nothing.

        With replicas, every replica reads the stage's file and takes its share of the
        source state (so a checkpoint saved with one ``dp`` resumes with another).
        Raises what reading raised, and ``explain(stage index, error)`` for a state that
        does not fit the stage (``ValueError`` or ``KeyError`` from the check).
        """
        state = read(self.rank)
        try:
            if self.replicas is not None:
                state["cache"] = split_cache_state(state["cache"], self.replicas.size, self.replicas.index)
                state["stage"]["synth_replay"] = split_replay_state(state["stage"].get("synth_replay", []),
                                                                    self.replicas.size, self.replicas.index)
            ready = self.stage.prepare_load(state["stage"])
            self.source.check_state(state["cache"])
        except (ValueError, KeyError) as e:
            raise explain(self.rank, e) from e
        return state, ready

    def commit_load(self, prepared: Any) -> dict[str, Any]:
        """Install what :meth:`prepare_load` accepted; returns the state (RNG, step)."""
        state, ready = prepared
        self.stage.commit_load(state["stage"], ready)
        self.source.load_state_dict(state["cache"], self.device)
        if self.input_synth is not None and "input" in state:
            self.input_synth.load_state_dict(state["input"])
        self.next_step = int(state["step"])
        self._received_upto = self.next_step - 1  # a saved run had drained everything before it
        return state

    def module_states(self) -> list[dict[str, torch.Tensor]]:
        """Every stage's module state (gathered from all ranks, on CPU), in stage order."""
        own = {k: v.detach().cpu() for k, v in self.stage.module.state_dict().items()}
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, own, group=self.pipeline_group)  # (the replicas hold the same)
        return gathered

    def share(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank (the trainer's own bookkeeping)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in (global) rank order, on every rank."""
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        dist.barrier()
