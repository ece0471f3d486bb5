"""``sp.Trainer``: the same ``fit``/``evaluate``/``save``/``export`` call in one process or N.

With one process (no torchrun environment) every stage runs here through the reference
trainer. Under torchrun, ``WORLD_SIZE = dp x len(stages)``: the job runs ``dp`` copies of
the pipeline side by side on a ``("dp", "pp")`` device mesh (see
:mod:`synthpipe.engine.data_parallel`); rank r keeps only stage ``r % len(stages)`` and
runs the pipeline worker, and the first rank of every pipeline reads its share of the
data. Everything else is identical. Stages built on the meta device are allocated only
where they run.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import os
import sys
import time
import warnings
from types import FrameType
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from ..stages.aux import AuxHead
from ..stages.materialize import InitFn
from ..stages.precision import user_autocast
from ..stages.stage import OptimizerFactory, SchedulerFactory, Stage, adam
from ..stages.synthesizer import Synthesizer
from . import checkpoint as ckpt
from .config import TrainConfig, check_options
from .data_parallel import Layout, Replicas, layout, mean_over_replicas
from .distributed import (
    backend_for,
    default_device,
    env_world_size,
    init_process_group,
    is_communication_error,
    keep_until_exit,
)
from .history import History, merge_logs
from .metrics import Timers
from .prefetch import PrefetchQueue
from .progress import epoch_line, live_postfix, open_bar
from .reference import ReferenceRunner
from .runner import Runner
from .sharding import shard
from .signals import StopSignals
from .sources import SOURCES
from .tensorboard import TensorBoardLog
from .watchdog import Watchdog, open_store
from .worker import Channels, PipelineWorker

__all__ = ["Trainer"]

_END = object()  # a data loop's end of the epoch

_T = TypeVar("_T")


def _collective(call: str) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """A Trainer method every rank must call together: the ranks first agree that ``call``
    is what each makes next, then it runs watched (a rank that stops making progress
    warns) and guarded (a rank that fails tells the others which rank and why)."""
    def wrap(method: Callable[..., _T]) -> Callable[..., _T]:
        @functools.wraps(method)
        def collective(self: "Trainer", *args: Any, **kwargs: Any) -> _T:
            self._agree(call)
            with self._watching(call):
                return self._guard(lambda: method(self, *args, **kwargs))
        return collective
    return wrap


def _input_and_target(batch: Any, step: int) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and torch.is_tensor(batch[1]):
        return batch[0], batch[1]
    shown = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    keyword = (f" (keys {list(batch)[:8]}): give keyword inputs as (dict_of_inputs, target), the target apart"
               if isinstance(batch, dict) else "")
    raise ValueError(f"fit expects (input, target) batches; batch {step} is a {shown}{keyword}. A conditional "
                     f"synthesizer and the loss both need the target")


def _split_fingerprint(stages: Sequence[nn.Module]) -> list[list[tuple[str, tuple[int, ...]]]]:
    return [[(k, tuple(v.shape)) for k, v in m.state_dict().items()] for m in stages]


# The options that decide each stage's update rule; the others (progress, prefetch, ...) may differ.
_RULE_OPTIONS = ("gradients", "delay", "synthetic_scale", "warmup_steps", "max_inflight", "staleness", "predict_ahead",
                 "nonfinite",
                 "precision", "synth_precision", "clip_grad_norm", "p_update", "p_update_seed")


def _check_same_job(stages: Sequence[nn.Module], config: TrainConfig, rank: int) -> None:
    """Every rank must hold the same split (a per-rank ``by="time"`` profile may differ) and
    train it by the same rule (a rank in ``backprop`` mode beside ranks in ``synthetic``
    mode would run, but not the method anyone asked for)."""
    my_split, my_rule = _split_fingerprint(stages), {k: getattr(config, k) for k in _RULE_OPTIONS}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (my_split, my_rule))
    for other, (their_split, their_rule) in enumerate(gathered):
        if their_split != my_split:
            stage = next(i for i, (a, b) in enumerate(zip(my_split, their_split, strict=False)) if a != b)
            raise ValueError(
                f"rank {rank} and rank {other} split the model differently (stage {stage} holds "
                f"{[k for k, _ in my_split[stage]][:4]}... here and "
                f"{[k for k, _ in their_split[stage]][:4]}... there); "
                f"build the same model on every rank and split it with an explicit balance (a by='time' "
                f"profile can differ between ranks: compute it on one rank and broadcast it)")
        differ = [k for k in _RULE_OPTIONS if other != rank and their_rule[k] != my_rule[k]]
        if differ:
            shown = ", ".join(f"{k}={my_rule[k]!r} here and {their_rule[k]!r} there" for k in differ)
            raise ValueError(f"rank {rank} and rank {other} were given different training options ({shown}); "
                             f"pass the same Trainer options on every rank")


def _warn_user(message: str) -> None:
    """A RuntimeWarning attributed to the first caller outside synthpipe (the user's line)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame: FrameType | None = sys._getframe(0)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)


class Trainer:
    """Train a list of stage modules with synthetic (or true) gradients.

    Args:
        stages: the stage modules, e.g. from :func:`synthpipe.split`; stage r is called as
            ``stages[r](*boundary)`` where ``boundary`` is the tuple stage r-1 returned.
        loss_fn: ``loss_fn(output, target)``, a batch mean (e.g. ``nn.CrossEntropyLoss()``).
        optimizer: ``params -> Optimizer`` for each stage (default Adam, lr 1e-3).
        synthesizer: recipe for the synthesizers of boundaries 0..N-2 (default ``"linear"``).
        gradients: ``"synthetic"``, ``"backprop"``, ``"delayed"``, ``"corrected"``, ``"local"``
            or ``"interlocking"``; see :class:`TrainConfig`.
        synth_optimizer: ``params -> Optimizer`` for each synthesizer (default Adam).
        synth_lr: learning rate of the default synthesizer optimizer (default 1e-3).
        device: this process's device (default: ``cuda:LOCAL_RANK`` if CUDA, else CPU).
        backend: ``"nccl"`` or ``"gloo"`` (default: nccl on CUDA, gloo on CPU).
        init: for stages built on the meta device (each rank then allocates only its own
            stage), ``init(module)`` runs after the stage is allocated on ``device`` and
            its submodules' ``reset_parameters`` ran; needed only for tensors of modules
            without one (see :mod:`synthpipe.stages.materialize`).
        aux_head: the auxiliary head recipe (``sp.AuxHead``) of every stage but the last,
            for ``gradients="local"`` and ``"interlocking"``, which need one.
        lr_scheduler: ``optimizer -> scheduler`` (e.g. ``lambda opt: LambdaLR(opt, f)``), one per
            stage, stepped once per training step (skipped steps too), so that every stage's
            learning rate follows the same schedule by step id; saved in checkpoints. See
            :func:`synthpipe.engine.schedules.named_schedule` for cosine/linear with warmup.
        synth_lr_scheduler: the same for each synthesizer's optimizer, stepped after each
            of its regression steps.
        dp: pipelines run side by side (data parallelism); default ``WORLD_SIZE // len(stages)``.
            Each pipeline's first rank reads its own share of every epoch (see
            :mod:`synthpipe.engine.sharding`), each stage's gradients (and its
            synthesizer's) are averaged over its replicas before every update, and every
            replica starts from replica 0's weights. ``WORLD_SIZE`` must be ``dp x len(stages)``.
        **options: the remaining :class:`TrainConfig` fields (``delay``, ``synthetic_scale``,
            ``warmup_steps``, ``max_inflight``, ``nonfinite``, ``failure_timeout``,
            ``precision``, ``clip_grad_norm``, ``log_dir``, ...).

    Raises:
        TypeError: an option that is neither a parameter here nor a :class:`TrainConfig`
            field (the message lists the known ones).
        ImportError: ``log_dir`` without the tensorboard package.
    """

    _instances = 0

    def __init__(self, stages: Sequence[nn.Module], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 optimizer: OptimizerFactory | None = None, synthesizer: Synthesizer | None = None,
                 gradients: str = "synthetic", synth_optimizer: OptimizerFactory | None = None,
                 synth_lr: float = 1e-3, device: torch.device | str | None = None,
                 backend: str | None = None, init: InitFn | None = None, dp: int | None = None,
                 aux_head: AuxHead | None = None,
                 lr_scheduler: SchedulerFactory | None = None, synth_lr_scheduler: SchedulerFactory | None = None,
                 **options: Any):
        if len(stages) < 1:
            raise ValueError("a Trainer needs at least one stage")
        check_options(options, others=[name for name, p in inspect.signature(Trainer.__init__).parameters.items()
                                       if name != "self" and p.kind is not p.VAR_KEYWORD])
        self.config = TrainConfig(gradients=gradients, **options)
        self.n_stages = len(stages)
        SOURCES[gradients].check(self.config, self.n_stages, aux_head)  # (alike on every rank, before any starts)
        self.device = torch.device(device) if device is not None else default_device()
        optimizer = optimizer or adam()
        synthesizer = synthesizer if synthesizer is not None else Synthesizer("linear")
        synth_optimizer = synth_optimizer or adam(synth_lr)

        def make(r: int) -> Stage:
            return Stage(r, self.n_stages, stages[r], optimizer, loss_fn=loss_fn,
                         synthesizer=synthesizer if r < self.n_stages - 1 else None,
                         synth_optimizer=synth_optimizer, synthetic_scale=self.config.synthetic_scale,
                         device=self.device, init=init, aux_head=aux_head, precision=self.config.precision,
                         synth_precision=self.config.synth_precision, clip_grad_norm=self.config.clip_grad_norm,
                         lr_scheduler=lr_scheduler, synth_lr_scheduler=synth_lr_scheduler)

        self.watchdog: Watchdog | None = None
        self._owns_group = False
        self.rank = 0
        self.layout = Layout(1, self.n_stages, 0)
        self.mesh: Any = None  # the ("dp", "pp") DeviceMesh of a multi-process run
        self._drivers: Replicas | None = None  # every pipeline's first rank, when dp > 1 (they agree on each step)
        self._shards: dict[int, tuple[Any, Any]] = {}
        self.runner: Runner = self._make_runner(stages, make, backend, dp)
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self._fit_finished = True  # set by rank 0's data loop, shared by _collect
        self._fit_start = time.perf_counter()
        self._partial_epoch: tuple[int, int, int, float] | None = None  # epoch, steps, samples, seconds
        self._bar: Any = None
        self.stopped: str | None = None  # why the last fit ended early (e.g. "SIGTERM on rank 1")
        self._signals = StopSignals(self.rank, self.watchdog)
        self._tensorboard = self._open_tensorboard()

    def _open_tensorboard(self) -> TensorBoardLog | None:
        """This process's TensorBoard writer (``log_dir``), fed by the step log and the timers."""
        if self.config.log_dir is None:
            return None
        world = 1 if self.watchdog is None else self.n_stages
        tb = TensorBoardLog(self.config.log_dir, self.rank, world, self.config.log_every, lambda: self.runner.timers)
        if not getattr(self.runner.timers, "enabled", False):
            self.runner.timers = Timers(self.device)  # (the busy and wait fractions come from them)
        for stage in self.local_stages:
            stage.log_metrics = True
        self.runner.log.sink = tb.put
        return tb

    def _make_runner(self, stages: Sequence[nn.Module], make: Callable[[int], Stage],
                     backend: str | None, dp: int | None) -> Runner:
        """The runner factory: every stage here (one process), or this rank's stage (torchrun)."""
        world = env_world_size()
        if world <= 1:
            backend_for(self.device, backend)  # validates an explicit nccl request
            if dp not in (None, 1):
                raise ValueError(f"dp={dp} pipelines of {self.n_stages} stages need {dp * self.n_stages} processes "
                                 f"under torchrun; this is one process")
            return ReferenceRunner([make(r) for r in range(self.n_stages)], self.config)
        planned = layout(world, self.n_stages, dp, 0)  # (before the group: a wrong world size is refused at once)
        if self.config.synthetic_inputs and planned.dp > 1:  # (before any process group: every rank refuses alike)
            raise ValueError(f"synthetic_inputs=True runs one pipeline, not dp={planned.dp} of them: the input "
                             f"synthesizers' regression is not averaged over replicas; run {self.n_stages} processes")
        self._owns_group = not dist.is_initialized()
        init_process_group(self.device, backend_for(self.device, backend))
        self.rank = dist.get_rank()
        self.layout = lay = layout(world, self.n_stages, dp, self.rank)
        Trainer._instances += 1  # every rank creates its trainers in the same order
        _check_same_job(stages, self.config, self.rank)
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device.type, (lay.dp, lay.pp), mesh_dim_names=("dp", "pp"))
        channel_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        replicas = None
        if lay.dp > 1:
            replicas = Replicas(self.mesh.get_group("dp"), lay.dp, lay.dp_rank, lay.pp_rank, channel_device)
            if lay.pp_rank == 0:
                self._drivers = replicas
        runner = PipelineWorker(make(lay.pp_rank), self.config,
                                Channels(self.rank, world, channel_device, self.n_stages,
                                         data=self.config.synthetic_inputs),
                                replicas=replicas, pipeline_group=self.mesh.get_group("pp") if lay.dp > 1 else None,
                                upstream=stages[:lay.pp_rank] if self.config.synthetic_inputs else ())
        prefix = "synthpipe/{}/{}/{}".format(os.environ.get("TORCHELASTIC_RUN_ID", "run"),
                                             os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), Trainer._instances)
        self.watchdog = Watchdog(open_store(self.config.failure_timeout), self.rank, world,
                                 timeout=self.config.failure_timeout, prefix=prefix, describe=lay.describe).start()
        return runner

    @property
    def local_stages(self) -> list[Stage]:
        """The stages this process runs: all of them in one process, its own under torchrun."""
        return list(self.runner.stages)

    @property
    def timers(self) -> Timers:
        """The section timers of this process's stages (a no-op unless a :class:`Timers` is set)."""
        return self.runner.timers

    @timers.setter
    def timers(self, timers: Timers) -> None:
        self.runner.timers = timers

    @property
    def is_main(self) -> bool:
        """True on the rank that prints (rank 0)."""
        return self.rank == 0

    @property
    def drives_data(self) -> bool:
        """True where ``fit`` and ``evaluate`` read their loaders: every pipeline's first rank."""
        return self.runner.drives_data

    @property
    def dp(self) -> int:
        """Pipelines side by side (1: one pipeline, or one process)."""
        return self.layout.dp

    # -- failure handling ---------------------------------------------------------------
    def _agree(self, call: str) -> None:
        """Every rank must make this collective call next (see :meth:`Watchdog.agree`)."""
        if self.watchdog is not None:
            self.watchdog.agree(call)

    def _watching(self, call: str) -> Any:
        """A block in which the watchdog warns if this rank stops making progress (multi-process)."""
        if self.watchdog is None:
            return contextlib.nullcontext()
        runner = self.runner
        return self.watchdog.watching(call, lambda: runner.progress, self.config.stall_warning)

    def _guard(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn``; on error tell the other ranks which rank failed and why.

        A communication error (a peer's connection closed) is this rank's symptom, not its
        failure: it waits for the watchdog's verdict, which the watchdog prints (naming the
        failed rank) before it ends this process.
        """
        try:
            return fn()
        except BaseException as e:
            if self.watchdog is not None:
                if is_communication_error(e):
                    verdict = self.watchdog.wait_for_verdict()
                    if verdict:
                        self.watchdog.wait_for_exit()
                        raise RuntimeError(verdict) from e
                self.watchdog.report(f"{type(e).__name__}: {e}")
            raise

    # -- training -----------------------------------------------------------------------
    def fit(self, train_loader: Iterable[Any], epochs: int = 1, eval_loader: Iterable[Any] | None = None,
            max_steps: int | None = None, resume: str | None = None, checkpoint: str | None = None,
            checkpoint_every: int | None = None) -> History:
        """Train until ``epochs`` epochs (or ``max_steps`` steps) in total have run.

        Both limits count from the start of the run, so ``fit(..., resume=dir)`` with the
        same arguments continues where the checkpoint stopped. ``train_loader`` yields
        ``(input, target)`` batches; it is only read on the first rank of each pipeline (other
        ranks may pass the same object or ``None``), and with ``dp`` pipelines each reads its
        own share of every epoch (:mod:`synthpipe.engine.sharding`). Calls ``set_epoch`` on
        its sampler when it has one.

        With ``checkpoint`` (a directory) the state is saved there when training ends;
        with ``checkpoint_every=N`` as well, also at every N-th step (counted from the
        start of the run): the pipeline drains, every rank saves its stage, and training
        goes on from there exactly as a resume from that checkpoint would. A run that is
        killed loses at most the steps since the last save, and a save that is cut short
        leaves the one before it intact. Every rank must pass a ``checkpoint`` (its own
        stage is saved there), the same ``checkpoint_every`` and, when resuming, a
        ``resume``: a different plan is a ``ValueError`` on every rank before anything runs.

        With a ``checkpoint``, SIGTERM (what torchrun and cluster schedulers send before
        killing a job) and a first SIGINT (Ctrl-C; torchrun passes it on to the ranks) stop
        the run cleanly instead of killing it: whichever rank gets it, rank 0 ends the data
        loop after its current step, the pipeline drains, every rank saves, and ``fit``
        returns with :attr:`stopped` naming the signal and rank (for example ``"SIGINT on
        rank 0"``; the run continues with ``resume=checkpoint``). A second SIGINT raises
        ``KeyboardInterrupt`` at once, as Ctrl-C normally does; the last complete
        checkpoint is kept. The handlers are installed only for the fit, in the main
        thread, and only where the signal has its default handler.
        Returns the :class:`History` (the same on every rank).
        """
        given = [f"{name}=..." for name, value in (("checkpoint", checkpoint), ("resume", resume)) if value is not None]
        given += [f"checkpoint_every={checkpoint_every}"] if checkpoint_every is not None else []
        self._agree(f"fit({', '.join(given)})")  # (paths may differ between hosts: only their presence must agree)
        if checkpoint_every is not None:
            if checkpoint is None:
                raise ValueError("checkpoint_every needs a checkpoint directory to save into")
            if checkpoint_every < 1:
                raise ValueError(f"checkpoint_every must be >= 1 step, got {checkpoint_every}")
        inside = user_autocast([self.device.type, "cpu"])
        if inside is not None:
            raise RuntimeError(
                f"fit was called inside torch.autocast({inside!r}): PyTorch caches the first low-precision copy of "
                f"every weight for the whole autocast region, so every step would run on the weights of the first "
                f"one and training would silently do nothing. Call fit outside autocast and pass "
                f"Trainer(precision='bf16') (or 'fp16'): each stage's forward then runs under autocast, per step")
        if resume is not None:
            self.load(resume)
        if self.is_main:
            self._warn_if_done(epochs, max_steps)
        self.runner.log.clear()  # (the steps of an earlier fit that raised are not this fit's)
        self._fit_start = time.perf_counter()
        self._partial_epoch = None
        self.stopped = None
        self._signals = StopSignals(self.rank, self.watchdog)
        if checkpoint is not None:
            self._signals.install()
        history = History()
        try:
            while True:
                goal = max_steps
                if checkpoint_every is not None:
                    nxt = (self.step // checkpoint_every + 1) * checkpoint_every
                    goal = nxt if max_steps is None else min(nxt, max_steps)
                with self._watching("fit()"):
                    part = self._guard(functools.partial(self._fit, train_loader, epochs, eval_loader, max_steps, goal))
                history.steps += part.steps
                history.epochs += part.epochs
                if checkpoint is not None:
                    self.save(checkpoint)
                    if self._bar is not None and self.config.progress and not self._fit_finished:
                        self._bar.write(f"checkpoint at step {self.step} saved to {checkpoint}")
                if self._fit_finished or checkpoint_every is None:
                    break
        finally:
            self._signals.restore()
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if self._tensorboard is not None:
                self._tensorboard.flush()
        self._signals.act_late(self.stopped)
        return history

    def _warn_if_done(self, epochs: int, max_steps: int | None) -> None:
        """A fit whose limits the trainer has reached already trains nothing: say why (as Lightning does)."""
        if max_steps is not None and self.step >= max_steps:
            _warn_user(f"fit(max_steps={max_steps}) trains nothing: this trainer is at step {self.step} already, "
                       f"and max_steps counts the steps in total, not more of them; pass "
                       f"max_steps={self.step + max_steps} to train {max_steps} more")
        elif self.epoch >= epochs:
            _warn_user(f"fit(epochs={epochs}) trains nothing: this trainer has run {self.epoch} epoch"
                       f"{'s' if self.epoch != 1 else ''} already, and epochs counts the epochs in total, not more of "
                       f"them; pass epochs={self.epoch + epochs} to train {epochs} more")

    def _fit(self, loader: Iterable[Any], epochs: int, eval_loader: Iterable[Any] | None,
             max_steps: int | None, goal: int | None) -> History:
        epoch_rows: list[dict[str, Any]] = []
        if self.runner.drives_data:
            epoch_rows = self._drive(loader, epochs, eval_loader, max_steps, goal)
        else:
            self._serve_fit()
        return self._collect(epoch_rows)

    def _drive(self, loader: Iterable[Any], epochs: int, eval_loader: Iterable[Any] | None,
               max_steps: int | None, goal: int | None) -> list[dict[str, Any]]:
        """Every pipeline's first rank (or the single process): the data loop, until ``goal``
        steps (a checkpoint or ``max_steps``) or the last epoch's end. With ``dp`` pipelines
        each reads its own share of ``loader``, and they agree before every step that all
        have a batch and none is stopping, so every replica runs the same steps."""
        cfg, runner = self.config, self.runner
        loader = self._shard(loader, even=True)
        rows: list[dict[str, Any]] = []
        try:
            per_epoch = len(loader)  # type: ignore[arg-type]
        except TypeError:
            per_epoch = None
        total = max_steps if max_steps is not None else (per_epoch * epochs if per_epoch else None)
        if self._bar is None:  # one bar for the whole fit, across checkpoints
            layout = f" x{self.n_stages}" + (f" (dp {self.dp})" if self.dp > 1 else "")
            self._bar = open_bar(total, self.step, cfg.progress and self.is_main, f"synthpipe {cfg.gradients}{layout}")
        # (it may have come during a checkpoint's save; pipelines learn it together, at their first step)
        self.stopped = self._signals.reason if self._drivers is None else None
        done = self.stopped is not None or (goal is not None and self.step >= goal)
        while self.epoch < epochs and not done:
            set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
            if callable(set_epoch):
                set_epoch(self.epoch)
            steps, samples, before = 0, 0, 0.0
            if self._partial_epoch is not None and self._partial_epoch[0] == self.epoch:
                _, steps, samples, before = self._partial_epoch  # the epoch went on across a checkpoint
            self._partial_epoch = None
            t_epoch = time.perf_counter() - before
            steps, samples, done, exhausted = self._train_epoch(loader, goal, t_epoch, steps, samples)
            if self._drivers is not None and self.stopped is not None:  # the pipelines agreed to stop
                done, exhausted = True, False
            elapsed = time.perf_counter() - t_epoch
            if exhausted and self.step_in_epoch == 0:
                _warn_user(f"epoch {self.epoch}: the training loader yielded no batches, so training stops "
                           f"here (a generator or iterator is used up after one epoch: pass a list or "
                           f"a DataLoader)")
                break
            if done and not exhausted and (per_epoch is None or self.step_in_epoch < per_epoch):
                self._partial_epoch = (self.epoch, steps, samples, elapsed)
                break  # stopped inside an epoch: no epoch record yet
            rows.append(self._epoch_record(steps, samples, elapsed, eval_loader))
            self.epoch += 1
            self.step_in_epoch = 0
        self._fit_finished = (self.stopped is not None or self.epoch >= epochs
                              or (max_steps is not None and self.step >= max_steps))
        runner.end_fit()
        return rows

    def _train_epoch(self, loader: Iterable[Any], goal: int | None, t_epoch: float, steps: int,
                     samples: int) -> tuple[int, int, bool, bool]:
        """The rest of the current epoch's batches, until ``goal`` or a stop; returns the
        epoch's ``steps`` and ``samples`` so far, whether to stop, and whether the loader ran out."""
        cfg, runner, bar, start = self.config, self.runner, self._bar, self._fit_start
        batches = itertools.islice(iter(loader), self.step_in_epoch, None)
        # closing(): the queue's iterator is closed here, not when it is collected, so a
        # second Ctrl-C that lands while it stops its thread is raised, not ignored.
        with PrefetchQueue(batches, self.device, depth=cfg.prefetch) as prefetch, \
                contextlib.closing(iter(prefetch)) as queue:
            for batch in (queue if self._drivers is None else self._common_steps(queue)):
                x, y = _input_and_target(batch, self.step)
                runner.train_step(self.step, x, y)
                runner.log.put(self.step, "time", time.perf_counter() - start)
                runner.log.put(self.step, "epoch", self.epoch)
                self.step += 1
                self.step_in_epoch += 1
                samples += int(y.shape[0])
                steps += 1
                bar.update(1)
                if self.step % cfg.log_every == 0:
                    rate = samples / max(time.perf_counter() - t_epoch, 1e-9)
                    bar.set_postfix(live_postfix(runner.live_stats(), rate), refresh=False)
                    if self._tensorboard is not None:
                        self._tensorboard.scalar("train/samples_per_s", rate, self.step)
                if self._drivers is None:
                    self.stopped = self._signals.reason
                if self.stopped is not None or (goal is not None and self.step >= goal):
                    return steps, samples, True, False
        return steps, samples, False, True

    def _epoch_record(self, steps: int, samples: int, elapsed: float,
                      eval_loader: Iterable[Any] | None) -> dict[str, Any]:
        """A finished epoch's row (evaluated on ``eval_loader``), also shown and logged."""
        row = {"epoch": self.epoch, "steps": steps, "samples": samples, "time": elapsed,
               "samples_per_s": samples / max(elapsed, 1e-9)}
        if eval_loader is not None:
            metrics = self._evaluate(eval_loader)
            row.update(eval_loss=metrics["loss"], eval_accuracy=metrics["accuracy"])
            if self._tensorboard is not None:
                self._tensorboard.scalar("eval/loss", metrics["loss"], self.step)
                self._tensorboard.scalar("eval/accuracy", metrics["accuracy"], self.step)
        if self.config.progress and self.is_main:
            self._bar.write(epoch_line(row))
        return row

    def _shard(self, loader: Any, even: bool) -> Any:
        """This pipeline's share of ``loader`` (the loader itself with one pipeline); built
        once per loader (a DataLoader is rebuilt around a sharding sampler)."""
        if self.dp == 1 or loader is None:
            return loader
        key = id(loader) * 2 + even
        if key not in self._shards or self._shards[key][0] is not loader:
            self._shards[key] = (loader, shard(loader, self.dp, self.layout.dp_rank, even))
        return self._shards[key][1]

    def _common_steps(self, batches: Iterable[Any]) -> Iterable[Any]:
        """The batches of the steps every pipeline takes (see :meth:`_common_step`)."""
        stream = iter(batches)
        while True:
            batch = self._common_step(next(stream, _END))
            if batch is _END:
                return
            yield batch

    def _common_step(self, batch: Any) -> Any:
        """With several pipelines: ``batch`` if every pipeline has one for this step and none
        is stopping, else ``_END`` (and :attr:`stopped` set where a stop was asked anywhere)."""
        if self._drivers is None:
            return batch
        reason = self._signals.reason
        every, some = self._drivers.agree(batch is not _END, reason is not None)
        if some:
            deadline = time.monotonic() + 5.0
            while reason is None and time.monotonic() < deadline:  # another pipeline's: the watchdog brings it
                time.sleep(0.05)
                reason = self._signals.reason
            self.stopped = reason or "a stop request on another pipeline"
            return _END
        if not every and batch is not _END:
            _warn_user(f"epoch {self.epoch}: pipeline {self.layout.dp_rank} still had batches when another pipeline's "
                       f"share of the epoch ended; every pipeline stops the epoch here (give every pipeline as many "
                       f"batches: see synthpipe.engine.sharding)")
        return batch if every else _END

    def _serve_fit(self) -> None:
        self.step = self.runner.serve_fit()

    def _collect(self, epoch_rows: list[dict[str, Any]]) -> History:
        """Merge every rank's step log into one History, on every rank."""
        gathered = self.runner.gather((self.runner.log.values, epoch_rows,
                                       (self.step, self.epoch, self.step_in_epoch, self._fit_finished, self.stopped)))
        logs = [g[0] for g in gathered]
        epoch_rows = gathered[0][1]
        if self.dp > 1:  # losses: the replicas' mean; samples: the pipelines' sum
            logs = mean_over_replicas(logs, self.n_stages)
            for i, row in enumerate(epoch_rows):
                row["samples"] = sum(g[1][i]["samples"] for g in gathered[::self.n_stages])
                row["samples_per_s"] = row["samples"] / max(row["time"], 1e-9)
        self.step, self.epoch, self.step_in_epoch, self._fit_finished, self.stopped = gathered[0][2]
        history = History(steps=merge_logs(logs, self.n_stages - 1), epochs=epoch_rows)
        self.runner.log.clear()
        return history

    # -- evaluation -----------------------------------------------------------------------
    def _evaluate(self, loader: Iterable[Any]) -> dict[str, float]:
        loader = self._shard(loader, even=False)  # (every sample once: shares may differ by a batch)
        with PrefetchQueue(loader, self.device, depth=self.config.prefetch) as queue:
            metrics = self.runner.evaluate(queue)
        if metrics["samples"] == 0:
            _warn_user("evaluate: the loader yielded no batches; loss and accuracy are NaN")
        return metrics

    @_collective("evaluate()")
    def evaluate(self, loader: Iterable[Any] | None) -> dict[str, float]:
        """Forward-only pass over ``loader``: ``{"loss", "accuracy", "samples"}`` over all of it, on every rank.

        It is read on every pipeline's first rank, each pipeline taking its share.
        """
        if not self.runner.drives_data:
            return self.runner.serve_evaluation()
        if loader is None:
            raise ValueError(f"evaluate needs a loader on {self.layout.describe(self.rank)} (the first rank of "
                             f"a pipeline)")
        return self._evaluate(loader)

    # -- checkpoints ----------------------------------------------------------------------
    @_collective("save()")
    def save(self, directory: str) -> None:
        """Write a checkpoint: every rank its stage file, then rank 0 ``meta.json``, which
        records each file's size and sha256 (checked by :meth:`load` before it reads a file).

        Saving into a directory that holds an earlier checkpoint is crash-safe: the
        earlier one stays loadable until the new one is complete (see
        :mod:`synthpipe.engine.checkpoint`).

        Raises:
            TypeError: a stage's state holds something other than plain data (a custom
                optimizer's object, say), which a checkpoint cannot hold; nothing is written.
        """
        # rank 0 decides the file names
        suffix = self.runner.share(ckpt.save_suffix(directory, self.step) if self.is_main else "")
        rng = ckpt.rng_state()
        states = self.runner.states()
        files: dict[str, Any] = {}
        for r, state in states:
            state.update(rng=rng, step=self.step)
            files[str(r)] = ckpt.save_stage(directory, r, self.step, state, suffix)
        # (the gather is also the barrier: every stage file is complete before meta.json names it)
        files = {k: v for part in self.runner.gather(files) for k, v in part.items()}
        if self.is_main:
            ckpt.write_meta(directory, {
                "version": ckpt.VERSION, "n_stages": self.n_stages, "dp": self.dp, "step": self.step,
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "suffix": suffix, "files": files,
                "config": vars(self.config)})
        self.runner.barrier()
        for r, _ in states:  # meta.json names these files now: the others are unreachable
            ckpt.remove_stale_stages(directory, r, self.step, suffix)

    def load(self, directory: str) -> "Trainer":
        """Restore a checkpoint written by :meth:`save` (same number of stages).

        Every rank checks its stage files (size and sha256 against ``meta.json``, then a
        ``weights_only`` load) and whether they fit its stages, and learns whether every
        other rank's did, before any rank changes anything.

        Raises:
            FileNotFoundError: no ``meta.json``, or a stage file of this process is missing.
            CheckpointError: (a ``ValueError``) a stage file of this process is truncated,
                corrupt, another checkpoint's, or holds another model, split or optimizer;
                the message names the file and the rank that read it.
            ValueError: another rank could not load its part (the message names each such
                rank, its file and what is wrong), or the checkpoint has another number of
                stages or a newer version. Raised on every rank at once; no rank has loaded.
        """
        self._agree("load()")
        problem, own_error, prepared = None, None, None

        def read(r: int) -> dict[str, Any]:
            return ckpt.load_stage(directory, meta, r, self.n_stages, self.device, reader=self.rank)

        def explain(r: int, e: Exception) -> Exception:
            return ckpt.CheckpointError(f"rank {self.rank} cannot load stage {r}'s file "
                                        f"{ckpt.saved_stage_file(directory, meta, r)}: {e}")
        # Any exception counts: a rank that raised alone would leave the others in the gather.
        try:
            meta = ckpt.read_meta(directory)
            prepared = self.runner.prepare_load(read, explain)
        except Exception as e:
            own_error, problem = e, f"{type(e).__name__}: {e}"
        problems = self._guard(lambda: self.runner.gather(problem))
        if own_error is not None:
            raise own_error
        failed = [(r, p) for r, p in enumerate(problems) if p is not None]
        if failed:
            raise ValueError("the checkpoint was not loaded on any rank: " +
                             "; ".join(f"rank {r}: {p}" for r, p in failed))

        def commit() -> None:
            state = self.runner.commit_load(prepared)
            ckpt.set_rng_state(state["rng"])
            self.step, self.epoch, self.step_in_epoch = meta["step"], meta["epoch"], meta["step_in_epoch"]
        self._guard(commit)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The original model's state_dict (all stages, no synthesizers), on every rank."""
        self._agree("state_dict()")
        return ckpt.merge_module_states(self.runner.module_states())

    @_collective("export()")
    def export(self, path: str) -> None:
        """Write the original model's state_dict (for ``model.load_state_dict``); rank 0 writes."""
        state = ckpt.merge_module_states(self.runner.module_states())  # (export's own agreement covers the gather)
        if self.is_main:
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
            torch.save(state, path)
        self.runner.barrier()

    def close(self) -> None:
        """Finish cleanly (all ranks): stop the receiver threads and the watchdog.

        The process group stays up for later trainers of this process and is destroyed
        when the process exits (see :func:`synthpipe.engine.distributed.keep_until_exit`).
        """
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
            self.runner.log.sink = None
        if self.watchdog is not None:
            self._agree("close()")
            self.runner.close()
            self.runner.barrier()
            self.watchdog.close()
            self.watchdog = None
            if self._owns_group:
                keep_until_exit()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
