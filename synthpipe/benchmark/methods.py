"""The benchmarked methods, each a job function ``fn(ctx, spec)`` run on every rank.

* :func:`run_single` — single-device backprop: the unsplit model in one process (the
  baseline, speedup 1.0).
* :func:`run_synthpipe` — ``synthpipe`` on ``spec.ranks`` processes: ``backprop`` mode
  (naive, locked model parallelism), DNI and cDNI (synthetic gradients).
* :func:`synthpipe.benchmark.pipelining.run_pipelining` — torch.distributed.pipelining.
* :func:`run_alone` — every rank runs its synthpipe stage's training step on its own,
  all ranks at once but with no transfers and no waiting: the ceiling that a perfect
  transport and schedule would reach on this machine (not a method anyone would train with).
* :func:`run_pingpong` — the one-way transfer time of a boundary tensor (for the simulator).
* :func:`run_ddp` — pure data parallelism: the unsplit model in ``DistributedDataParallel``
  on every rank, each on ``batch / ranks`` rows of every global batch.

A synthpipe job with ``stages`` < ``ranks`` runs ``ranks / stages`` pipelines side by side
(data parallel x pipeline parallel), each pipeline on its ``batch / dp`` rows of every
global batch, so every method trains on the same global batch.

Two modes. ``throughput``: ``spec.warmup`` steps, then ``spec.steps`` timed steps between
two synchronisation points; the rank's section timers (forward, backward, update, synth,
send, recv, wait) run during the timed steps. ``converge``: ``spec.epochs`` epochs of
the workload's data, the test accuracy after each; only training counts as time.

Every job returns one dict per rank (see :func:`rank_result`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from ..engine.metrics import COMM_KINDS, NULL_TIMERS, WAIT_KINDS, Timers
from ..engine.sources import make_source
from ..engine.step import StageStep
from .job import (
    METHODS,
    JobSpec,
    converge_run,
    epoch_parts,
    model_accuracy,
    param_checksum,
    rank_device,
    rank_result,
    synchronize,
)
from .launcher import RankContext
from .monitor import reset_peak_memory
from .pipelining import run_pipelining
from .workload import build_model, make_optimizer, optimizer_factory, test_batches, train_batches

__all__ = ["job_function", "run_single", "run_synthpipe", "run_ddp", "run_alone", "run_pingpong", "chunk_times"]


def job_function(spec: JobSpec) -> Callable[[RankContext, JobSpec], dict[str, Any]]:
    if spec.method == "single":
        return run_single
    if spec.method == "synthpipe":
        return run_synthpipe
    if spec.method == "pipelining":
        return run_pipelining
    if spec.method == "alone":
        return run_alone
    if spec.method == "pingpong":
        return run_pingpong
    if spec.method == "ddp":
        return run_ddp
    raise ValueError(f"unknown method {spec.method!r}; choose one of {METHODS}")


def _timed_steps(step: Callable[[torch.Tensor, torch.Tensor], Any], batches: list, warmup: int,
                 device: torch.device, timers: Timers, after_warmup: Callable[[], Any] | None = None
                 ) -> tuple[list[Any], float, float, float]:
    """``warmup`` untimed steps, then the rest of ``batches`` timed (peak memory and timers
    reset in between; ``after_warmup`` lines the ranks up). Returns the timed steps'
    losses, the wall-clock seconds, and the start and end times (epoch seconds)."""
    for x, y in batches[:warmup]:
        step(x, y)
    if after_warmup is not None:
        after_warmup()
    synchronize(device)
    reset_peak_memory(device)
    timers.reset()
    t_start, t0 = time.time(), time.perf_counter()
    losses = [step(x, y) for x, y in batches[warmup:]]
    synchronize(device)
    return losses, time.perf_counter() - t0, t_start, time.time()


def run_single(ctx: RankContext, spec: JobSpec) -> dict[str, Any]:
    """The unsplit model, one process, plain ``forward / backward / step`` (the baseline)."""
    w = spec.workload
    device = rank_device(spec, 0)
    model = build_model(w).to(device)
    opt = make_optimizer(w)(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    timers = Timers(device)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with timers.section("forward"):
            loss = loss_fn(model(x), y)
        with timers.section("backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with timers.section("update"):
            opt.step()
        return loss.detach()

    if spec.mode == "converge":
        return _converge_single(ctx, spec, device, model, step)
    batches = train_batches(w, count=spec.warmup + spec.steps)
    losses, wall, t_start, t_end = _timed_steps(step, batches, spec.warmup, device, timers)
    checksum = param_checksum([model])
    chunks = chunk_times(model, loss_fn, batches[0], spec.chunk_sweep, device)
    return rank_result(ctx, spec, device, wall=wall, steps=spec.steps, samples=spec.steps * w.batch,
                       t_start=t_start, t_end=t_end, timers=timers,
                       losses=[float(v) for v in losses], chunks=chunks, param_checksum=checksum)


def chunk_times(model: nn.Module, loss_fn: Callable[..., torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor],
                sweep: list[int], device: torch.device, repeats: int = 3) -> list[dict[str, float]]:
    """Forward and backward seconds of the whole model on one micro-batch of ``batch / m``.

    For the simulator: how much slower per sample small micro-batches are (untimed by
    the throughput figures; the model's gradients are left dirty, nothing is stepped).
    """
    x, y = batch
    out: list[dict[str, float]] = []
    for m in sweep:
        b = max(1, len(y) // m)
        xb, yb = x[:b].to(device), y[:b].to(device)
        fs, bs = [], []
        for rep in range(repeats + 1):
            t0 = time.perf_counter()
            loss = loss_fn(model(xb), yb)
            synchronize(device)
            t1 = time.perf_counter()
            loss.backward()
            synchronize(device)
            t2 = time.perf_counter()
            if rep:
                fs.append(t1 - t0)
                bs.append(t2 - t1)
        fs.sort()
        bs.sort()
        out.append({"m": m, "forward_s": fs[len(fs) // 2], "backward_s": bs[len(bs) // 2]})
    model.zero_grad(set_to_none=True)
    return out


def _converge_single(ctx: RankContext, spec: JobSpec, device: torch.device, model: nn.Module,
                     step: Callable[[torch.Tensor, torch.Tensor], Any]) -> dict[str, Any]:
    test = test_batches(spec.workload)

    def train_epoch(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for x, y in batches:
            step(x, y)
        synchronize(device)

    return converge_run(ctx, spec, device, model_accuracy(model, test, device), train_epoch,
                        lambda: model_accuracy(model, test, device))


# -- synthpipe ----------------------------------------------------------------------------
def replica_batches(batches: list[tuple[torch.Tensor, torch.Tensor]] | None, dp: int) -> list | None:
    """Each global batch cut into ``dp`` equal row chunks, in order: the list a data-parallel
    synthpipe job's pipelines share (pipeline d takes chunk d of every batch)."""
    if batches is None or dp == 1:
        return batches
    return [(x.chunk(dp)[d], y.chunk(dp)[d]) for x, y in batches for d in range(dp)]


def _synthpipe_split(spec: JobSpec) -> tuple[list[nn.Module], Any]:
    """The stages and the synthesizer recipe of a synthpipe job."""
    import synthpipe as sp

    w = spec.workload
    model = build_model(w)
    if spec.balance:
        stages = sp.split(model, balance=list(spec.balance))
    else:
        stages = sp.split(model, n_stages=spec.stages or spec.ranks)
    options: dict[str, Any] = {"rank": spec.synth_rank} if spec.synth == "lowrank" else {}
    synth = sp.Synthesizer(spec.synth, conditional=spec.conditional,
                           num_classes=w.num_classes if spec.conditional else None, **options)
    return stages, synth


def _synthpipe_trainer(spec: JobSpec, device: torch.device,
                       split: tuple[list[nn.Module], Any] | None = None) -> Any:
    import synthpipe as sp

    w = spec.workload
    stages, synth = split if split is not None else _synthpipe_split(spec)
    aux = sp.AuxHead(spec.aux_head, num_classes=w.num_classes) if spec.gradients in ("local", "interlocking") else None
    return sp.Trainer(stages, nn.CrossEntropyLoss(), optimizer=make_optimizer(w), synthesizer=synth,
                      gradients=spec.gradients, synth_optimizer=optimizer_factory(w.optimizer, w.synth_lr),
                      device=device, progress=False, aux_head=aux, staleness=spec.staleness,
                      max_inflight=spec.max_inflight, failure_timeout=120.0)


def _close_trainer(trainer: Any) -> None:
    """Close a job's trainer and end its process group: the trainer keeps the group for
    later trainers of the process, but the pool's next job makes its own, on its own port."""
    import torch.distributed as dist

    trainer.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def run_synthpipe(ctx: RankContext, spec: JobSpec) -> dict[str, Any]:
    """synthpipe's Trainer, one stage per process (``backprop``, DNI or cDNI)."""
    import torch.distributed as dist

    ctx.set_env()
    w = spec.workload
    device = rank_device(spec, ctx.rank)
    trainer = _synthpipe_trainer(spec, device)
    try:
        if spec.mode == "converge":
            return _converge_synthpipe(ctx, spec, device, trainer)
        main = trainer.drives_data  # (every pipeline's first rank)
        batches = train_batches(w, count=spec.warmup + spec.steps) if main else []
        trainer.fit(replica_batches(batches[:spec.warmup], trainer.dp) if main else None, epochs=1)
        timers = Timers(device)
        trainer.timers = timers
        data = replica_batches(batches[spec.warmup:], trainer.dp) if main else None
        dist.barrier()
        synchronize(device)
        reset_peak_memory(device)
        timers.reset()
        t_start, t0 = time.time(), time.perf_counter()
        history = trainer.fit(data, epochs=2)
        synchronize(device)
        wall = time.perf_counter() - t0
        result = rank_result(ctx, spec, device, wall=wall, steps=spec.steps, samples=spec.steps * w.batch,
                             t_start=t_start, t_end=time.time(), timers=timers,
                             losses=[s["loss"] for s in history.steps],
                             param_checksum=param_checksum([s.module for s in trainer.local_stages])
                             if trainer.layout.dp_rank == 0 else [0.0, 0.0])  # (a replica: counted once)
        trainer.timers = NULL_TIMERS  # stop recording
        return result
    finally:
        _close_trainer(trainer)


def _converge_synthpipe(ctx: RankContext, spec: JobSpec, device: torch.device, trainer: Any) -> dict[str, Any]:
    import torch.distributed as dist

    w = spec.workload
    main = trainer.drives_data
    test = test_batches(w) if main else None
    m = trainer.evaluate(test)
    curve = [{"time": 0.0, "epoch": 0, "steps": 0, "accuracy": m["accuracy"], "loss": m["loss"]}]
    total, steps, samples = 0.0, 0, 0
    reset_peak_memory(device)
    t_start = time.time()
    parts = max(1, spec.evals_per_epoch)
    fits = 0  # each part is one fit of one "epoch" of the trainer's count
    for epoch in range(spec.epochs):
        # every rank must make as many fit calls as rank 0; only the pipelines' first ranks hold data
        shared = replica_batches(train_batches(w, epoch=epoch), trainer.dp) or []
        chunks: list[Any] = epoch_parts(shared, parts) if main else []
        count = [len(chunks)]
        dist.broadcast_object_list(count, src=0)
        chunks = chunks or [None] * count[0]
        for i, batches in enumerate(chunks):
            dist.barrier()
            t0 = time.perf_counter()
            fits += 1
            history = trainer.fit(batches, epochs=fits)
            total += time.perf_counter() - t0
            row = history.epochs[-1] if history.epochs else {"steps": 0, "samples": 0}
            steps += int(row["steps"])
            samples += int(row["samples"])
            m = trainer.evaluate(test)
            curve.append({"time": total, "epoch": round(epoch + (i + 1) / len(chunks), 4), "steps": steps,
                          "accuracy": m["accuracy"], "loss": m["loss"]})
    return rank_result(ctx, spec, device, wall=total, steps=steps, samples=samples, t_start=t_start,
                       t_end=time.time(), timers=None, curve=curve)


# -- pure data parallelism -------------------------------------------------------------------
def run_ddp(ctx: RankContext, spec: JobSpec) -> dict[str, Any]:
    """The unsplit model in ``DistributedDataParallel`` on every rank, each taking its
    ``batch / ranks`` rows of every global batch (throughput mode only)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if spec.mode != "throughput":
        raise ValueError("the ddp method measures throughput only")
    ctx.set_env()
    w = spec.workload
    device = rank_device(spec, ctx.rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(build_model(w).to(device),
                                        device_ids=[device] if device.type == "cuda" else None)
        opt = make_optimizer(w)(model.parameters())
        loss_fn = nn.CrossEntropyLoss()
        timers = Timers(device)

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            x, y = x.chunk(spec.ranks)[ctx.rank].to(device), y.chunk(spec.ranks)[ctx.rank].to(device)
            with timers.section("forward"):
                loss = loss_fn(model(x), y)
            with timers.section("backward"):  # (the gradient all-reduce overlaps the backward)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            with timers.section("update"):
                opt.step()
            return loss.detach()

        batches = train_batches(w, count=spec.warmup + spec.steps)
        losses, wall, t_start, t_end = _timed_steps(step, batches, spec.warmup, device, timers, dist.barrier)
        return rank_result(ctx, spec, device, wall=wall, steps=spec.steps, samples=spec.steps * w.batch,
                           t_start=t_start, t_end=t_end, timers=timers, losses=[float(v) for v in losses],
                           param_checksum=param_checksum([model.module]) if ctx.rank == 0 else [0.0, 0.0])
    finally:
        dist.destroy_process_group()


# -- the no-transfer ceiling ---------------------------------------------------------------
class _Loopback:
    """Links that send nothing: the target of every activation "arrives" at once, a fixed
    tensor of the boundary's shape (its value does not change the cost of the regression)."""

    def __init__(self) -> None:
        self.step: StageStep | None = None
        self._target: tuple | None = None

    def send_activation(self, step: int, outputs: tuple, y: Any) -> None:
        if self._target is None:
            self._target = tuple(torch.randn_like(o.detach()) * 1e-4 for o in outputs)
        assert self.step is not None
        self.step.received(step, self._target, False)

    def send_gradient(self, step: int, grads: tuple, skipped: bool) -> None:
        pass

    def wait_gradient(self, step: int) -> tuple[tuple, bool]:
        raise RuntimeError("the no-transfer ceiling never waits for a gradient")

    def wait_received(self, step: int) -> None:
        pass

    def poll(self) -> None:
        pass


class _ComputeTimers(Timers):
    """The ceiling's timers: the step's hand-offs to its links are no transfers here, so
    their sections (send, receive, wait) are not timed and the ceiling's time is compute."""

    def section(self, kind: str, step: int = -1) -> Any:
        return NULL_TIMERS.section(kind, step) if kind in COMM_KINDS + WAIT_KINDS else super().section(kind, step)


def run_alone(ctx: RankContext, spec: JobSpec) -> dict[str, Any]:
    """Rank r runs stage r of the synthpipe job ``spec`` describes, on its own.

    The same split, synthesizer and optimizers as :func:`run_synthpipe`, and per step the
    pipeline worker's own synthetic-gradient step (:class:`~synthpipe.engine.step.StageStep`):
    forward; the synthetic gradient (not on the last stage) or the loss; backward; update;
    the input gradient (not on rank 0); one synthesizer regression step (not on the last
    stage). Inputs are
    the real boundary activations of the workload's batches, computed once beforehand;
    the regression target is a fixed tensor of the boundary's shape (its value does not
    change the cost). Nothing is sent and nothing waits, but all ranks run at the same
    time (a barrier before the timed steps), so they still share the machine's cores,
    caches and memory bandwidth: the step time is what a perfect transport and schedule
    would reach here, a ceiling for the synthpipe row with the same settings.
    """
    import torch.distributed as dist

    ctx.set_env()
    w = spec.workload
    device = rank_device(spec, ctx.rank)
    stages, synth = _synthpipe_split(spec)
    r = ctx.rank
    batches = train_batches(w, count=spec.warmup + spec.steps)
    inputs = []
    with torch.no_grad():  # the boundary activations rank r would receive, from the untrained model
        for x, y in batches:
            h: Any = (x,)
            for s in stages[:r]:
                out = s(*h)
                h = out if isinstance(out, tuple) else (out,)
            inputs.append((tuple(t.to(device) for t in h), y.to(device)))
    # The trainer builds the stage exactly as for run_synthpipe; its worker is not used:
    # the stage runs the shared training step with links that send nothing.
    trainer = _synthpipe_trainer(spec, device, (stages, synth))
    stage = trainer.local_stages[0]
    config = dataclasses.replace(trainer.config, gradients="synthetic", delay=None, warmup_steps=0)
    links = _Loopback()
    stage_step = StageStep(stage, config, make_source(stage, config), links)
    links.step = stage_step
    timers = _ComputeTimers(device)
    stage_step.timers = timers
    try:
        for i, (h, y) in enumerate(inputs[:spec.warmup]):
            stage_step.run(i, h, y)
        synchronize(device)
        dist.barrier()
        reset_peak_memory(device)
        timers.reset()
        t_start, t0 = time.time(), time.perf_counter()
        for i, (h, y) in enumerate(inputs[spec.warmup:], start=spec.warmup):
            stage_step.run(i, h, y)
        synchronize(device)
        wall = time.perf_counter() - t0
        return rank_result(ctx, spec, device, wall=wall, steps=spec.steps, samples=spec.steps * w.batch,
                           t_start=t_start, t_end=time.time(), timers=timers)
    finally:
        _close_trainer(trainer)  # a barrier first: no rank leaves while another still times


# -- transfer time ------------------------------------------------------------------------
def run_pingpong(ctx: RankContext, spec: JobSpec, repeats: int = 20) -> dict[str, Any]:
    """One-way time of a message between ranks 0 and 1, per size (half the round trip)."""
    import torch.distributed as dist

    ctx.set_env()
    device = rank_device(spec, ctx.rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    try:
        out = []
        for size in spec.sizes:
            buf = torch.zeros(max(1, size // 4), dtype=torch.float32, device=device)
            times = []
            for i in range(repeats + 2):
                dist.barrier()
                t0 = time.perf_counter()
                if ctx.rank == 0:
                    dist.send(buf, 1)
                    dist.recv(buf, 1)
                elif ctx.rank == 1:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)
                synchronize(device)
                if i >= 2:
                    times.append((time.perf_counter() - t0) / 2)
            times.sort()
            out.append({"bytes": size, "one_way_s": times[len(times) // 2]})
        t = time.time()
        return rank_result(ctx, spec, device, wall=0.0, steps=0, samples=0, t_start=t, t_end=t, timers=None,
                           transfers=out)
    finally:
        dist.destroy_process_group()
