"""torch.distributed.pipelining baselines on the same split model, data and optimizer.

Schedules (``JobSpec.schedule``):

* ``gpipe`` — :class:`ScheduleGPipe`, one stage per rank;
* ``1f1b`` — :class:`Schedule1F1B`, one stage per rank;
* ``interleaved1f1b`` — :class:`ScheduleInterleaved1F1B`, ``stages_per_rank`` (>= 2)
  virtual stages per rank, stage ``i`` on rank ``i % ranks``;
* ``izb`` — :class:`ScheduleInterleavedZeroBubble` (zero bubble, ZB1P), same layout;
* ``zbv`` — :class:`ScheduleZBVZeroBubble`, exactly two stages per rank in a V
  (rank r holds stages r and 2 * ranks - 1 - r).

The model is cut with :func:`synthpipe.split` into ``ranks x stages_per_rank`` stages
(balanced by parameters) and each rank wraps its stages in :class:`PipelineStage`. The
batch is split into ``microbatches`` micro-batches; the loss is the mean cross-entropy of
each micro-batch and gradients are averaged over micro-batches (``scale_grads``), which
equals the full-batch mean for equal micro-batches; one Adam step per batch.

Per-rank timers: the stage's ``forward_one_chunk`` (forward), ``backward_one_chunk`` and
``backward_weight_one_chunk`` (backward), the optimizer step (update), posting P2P
operations (send) and waiting for them (wait) are timed by wrapping those functions in
this process only.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from ..engine.metrics import Timers
from .job import JobSpec, converge_run, model_accuracy, param_checksum, rank_device, rank_result, synchronize
from .launcher import RankContext
from .monitor import reset_peak_memory
from .workload import build_model, make_optimizer, test_batches, train_batches

__all__ = ["SCHEDULES", "MULTI_STAGE", "stages_per_rank", "stage_indices", "valid_microbatches", "run_pipelining"]

SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b", "izb", "zbv")
MULTI_STAGE = ("interleaved1f1b", "izb", "zbv")


def stages_per_rank(schedule: str, requested: int = 2) -> int:
    if schedule == "zbv":
        return 2
    return max(2, requested) if schedule in MULTI_STAGE else 1


def stage_indices(schedule: str, rank: int, ranks: int, per_rank: int) -> list[int]:
    """The global stage indices rank ``rank`` holds."""
    if schedule == "zbv":
        return [rank, 2 * ranks - 1 - rank]
    return [rank + k * ranks for k in range(per_rank)]


def valid_microbatches(schedule: str, ranks: int, m: int) -> bool:
    """Whether ``schedule`` accepts ``m`` micro-batches on ``ranks`` ranks."""
    if m < 1:
        return False
    if schedule in ("interleaved1f1b", "izb"):
        rounds = max(1, m // ranks)
        return m % rounds == 0
    if schedule == "zbv":
        return m >= 2 * ranks  # fewer leaves the V without steady state (torch warns / fails)
    return True


def _schedule_class(name: str) -> Any:
    from torch.distributed import pipelining as pp
    return {"gpipe": pp.ScheduleGPipe, "1f1b": pp.Schedule1F1B,
            "interleaved1f1b": pp.ScheduleInterleaved1F1B,
            "izb": pp.ScheduleInterleavedZeroBubble,
            "zbv": pp.ScheduleZBVZeroBubble}[name]


def _timed(fn: Callable[..., Any], timers: Timers, kind: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with timers.section(kind):
            return fn(*args, **kwargs)
    return wrapper


class _Instrument:
    """Wrap the stages' compute calls and the schedule module's P2P helpers with timers."""

    def __init__(self, stages: list[Any], timers: Timers):
        from torch.distributed.pipelining import schedules
        self.schedules = schedules
        self.saved: list[tuple[Any, str, Any]] = []
        for st in stages:
            for name, kind in (("forward_one_chunk", "forward"), ("backward_one_chunk", "backward"),
                               ("backward_weight_one_chunk", "backward")):
                if hasattr(st, name):
                    setattr(st, name, _timed(getattr(st, name), timers, kind))
        for name, kind in (("_batch_p2p", "send"), ("_wait_batch_p2p", "wait")):
            if hasattr(schedules, name):
                self.saved.append((schedules, name, getattr(schedules, name)))
                setattr(schedules, name, _timed(getattr(schedules, name), timers, kind))

    def undo(self) -> None:
        for obj, name, fn in self.saved:
            setattr(obj, name, fn)


def _boundary_examples(modules: list[nn.Module], in_features: int,
                       rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) example tensors of every stage for a micro-batch of ``rows`` rows.

    Runs the stages in eval mode without gradients, so no running statistic changes.
    """
    modes = [m.training for m in modules]
    out = []
    h = torch.zeros(rows, in_features)
    with torch.no_grad():
        for m in modules:
            m.eval()
            y = m(h)
            out.append((h.clone(), y.clone()))
            h = y
    for m, mode in zip(modules, modes, strict=True):
        m.train(mode)
    return out


class _Pipeline:
    """This rank's part of a torch pipeline: stages, optimizer, schedule."""

    def __init__(self, ctx: RankContext, spec: JobSpec, device: torch.device):
        from torch.distributed.pipelining import PipelineStage

        import synthpipe as sp

        w = spec.workload
        self.per_rank = stages_per_rank(spec.schedule, spec.stages_per_rank)
        self.n_stages = spec.ranks * self.per_rank
        self.mine = stage_indices(spec.schedule, ctx.rank, spec.ranks, self.per_rank)
        model = build_model(w)
        modules = sp.split(model, n_stages=self.n_stages)
        shapes = _boundary_examples(modules, w.in_features, w.batch // spec.microbatches)
        self.modules = [modules[i].to(device) for i in self.mine]
        # Static shapes: torch's dynamic shape inference runs each stage's module in
        # training mode on uninitialised tensors, which corrupts BatchNorm running statistics.
        # The examples' requires_grad tells torch which boundaries carry gradients back.
        self.stages = [PipelineStage(m, i, self.n_stages, device,
                                     input_args=shapes[i][0].to(device).requires_grad_(i > 0),
                                     output_args=shapes[i][1].to(device).requires_grad_(True))
                       for m, i in zip(self.modules, self.mine, strict=True)]
        params = [p for m in self.modules for p in m.parameters()]
        self.opt = make_optimizer(w)(params)
        cls = _schedule_class(spec.schedule)
        self.multi = spec.schedule in MULTI_STAGE
        self.schedule = cls(self.stages if self.multi else self.stages[0], n_microbatches=spec.microbatches,
                            loss_fn=nn.CrossEntropyLoss())
        self.has_first = 0 in self.mine
        self.has_last = self.n_stages - 1 in self.mine
        self.last_rank = next(r for r in range(spec.ranks)
                              if self.n_stages - 1 in stage_indices(spec.schedule, r, spec.ranks, self.per_rank))
        self.device = device
        self.timers: Timers | None = None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float | None:
        self.opt.zero_grad(set_to_none=True)
        args = (x.to(self.device),) if self.has_first else ()
        kwargs: dict[str, Any] = {"target": y.to(self.device)} if self.has_last else {}
        losses: list[torch.Tensor] | None = [] if self.has_last else None
        self.schedule.step(*args, **kwargs, losses=losses)
        if self.timers is not None:
            with self.timers.section("update"):
                self.opt.step()
        else:
            self.opt.step()
        if losses:
            return float(torch.stack([loss.detach() for loss in losses]).mean())
        return None

    def accuracy(self, batches: list, batch: int) -> tuple[float, float]:
        """Forward-only pass over ``batches`` (every rank holds the same list); metrics on every rank.

        torch's pipeline stages keep the activation shapes of their first step, so the test
        set goes through in training-sized batches: a short last batch is padded with its
        own first rows, which are left out of the metrics.
        """
        import torch.distributed as dist

        for m in self.modules:
            m.eval()
        total = correct = count = 0.0
        x_all = torch.cat([x for x, _ in batches])
        y_all = torch.cat([y for _, y in batches])
        for i in range(0, len(y_all), batch):
            x, y = x_all[i:i + batch], y_all[i:i + batch]
            real = len(y)
            if real < batch:
                idx = torch.arange(batch) % real
                x, y = x[idx], y[idx]
            args = (x.to(self.device),) if self.has_first else ()
            kwargs = {"target": y.to(self.device)} if self.has_last else {}
            with torch.no_grad():
                out = self.schedule.eval(*args, **kwargs)
            if self.has_last and out is not None:
                out = (out[0] if isinstance(out, (tuple, list)) else out)[:real]
                y = y[:real].to(out.device)
                total += float(nn.functional.cross_entropy(out, y, reduction="sum"))
                correct += float((out.argmax(-1) == y).sum())
                count += real
        for m in self.modules:
            m.train()
        stats = [total, correct, count]
        dist.broadcast_object_list(stats, src=self.last_rank)
        return stats[1] / max(stats[2], 1), stats[0] / max(stats[2], 1)


def run_pipelining(ctx: RankContext, spec: JobSpec) -> dict[str, Any]:
    """A torch.distributed.pipelining schedule on ``spec.ranks`` processes."""
    import torch.distributed as dist

    ctx.set_env()
    device = rank_device(spec, ctx.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        pipe = _Pipeline(ctx, spec, device)
        if spec.mode == "converge":
            return _converge(ctx, spec, device, pipe)
        w = spec.workload
        batches = train_batches(w, count=spec.warmup + spec.steps)
        for x, y in batches[:spec.warmup]:
            pipe.step(x, y)
        timers = Timers(device)
        pipe.timers = timers
        instrument = _Instrument(pipe.stages, timers)
        try:
            dist.barrier()
            synchronize(device)
            reset_peak_memory(device)
            timers.reset()
            t_start, t0 = time.time(), time.perf_counter()
            losses = [pipe.step(x, y) for x, y in batches[spec.warmup:]]
            synchronize(device)
            dist.barrier()
            wall = time.perf_counter() - t0
        finally:
            instrument.undo()
        return rank_result(ctx, spec, device, wall=wall, steps=spec.steps, samples=spec.steps * w.batch,
                           t_start=t_start, t_end=time.time(), timers=timers,
                           losses=[v for v in losses if v is not None], stages=pipe.mine,
                           n_stages=pipe.n_stages, param_checksum=param_checksum(pipe.modules))
    finally:
        dist.destroy_process_group()


def _converge(ctx: RankContext, spec: JobSpec, device: torch.device, pipe: _Pipeline) -> dict[str, Any]:
    import torch.distributed as dist

    w = spec.workload
    test = test_batches(w)

    def train_epoch(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for x, y in batches:
            pipe.step(x, y)
        synchronize(device)
        dist.barrier()

    # The untrained model's accuracy, computed locally: an evaluation through the schedule
    # before the first training step would initialise torch's stages without their
    # backward (and silently break the training that follows).
    initial = model_accuracy(build_model(w).to(device), test, device)
    return converge_run(ctx, spec, device, initial, train_epoch, lambda: pipe.accuracy(test, w.batch),
                        before_epoch=dist.barrier)
