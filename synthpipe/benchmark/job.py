"""One benchmark job: its spec, and the per-rank helpers every method's job function uses.

A job function ``fn(ctx, spec)`` runs on every rank (see :mod:`synthpipe.benchmark.methods`
and :mod:`synthpipe.benchmark.pipelining`); each returns one :func:`rank_result` dict.
Both method modules take their common pieces from here, so neither imports the other
for them.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from ..engine.metrics import Timers
from ..engine.reference import evaluate_model
from .launcher import RankContext
from .monitor import peak_memory, reset_peak_memory
from .workload import Workload, train_batches

__all__ = ["METHODS", "JobSpec", "rank_device", "synchronize", "timeline_rows", "rank_result", "param_checksum",
           "model_accuracy", "epoch_parts", "converge_run"]

METHODS = ("single", "synthpipe", "pipelining", "alone", "pingpong", "ddp")


@dataclasses.dataclass
class JobSpec:
    """One benchmark job (one row of the results).

    Attributes:
        name: the row's label (e.g. ``"cdni"``, ``"1f1b-m4"``).
        method: ``"single"``, ``"synthpipe"``, ``"pipelining"`` or ``"pingpong"``.
        workload: the shared model / data / optimizer.
        ranks: processes (1 for single).
        mode: ``"throughput"`` or ``"converge"``.
        steps, warmup: timed and untimed steps (throughput).
        epochs: training epochs (converge).
        gradients, synth, synth_rank, conditional, max_inflight, balance: synthpipe options.
        staleness: ``delayed``'s staleness correction (``None``, ``"lr"`` or ``"predict"``).
        aux_head: the auxiliary head kind of ``local`` and ``interlocking`` (``sp.AuxHead(kind)``).
        evals_per_epoch: test evaluations per epoch (converge): the time-to-accuracy curve's
            resolution (evaluation is never timed).
        schedule, microbatches, stages_per_rank: torch.distributed.pipelining options.
        device: ``"cpu"`` or ``"cuda"`` (rank r uses ``cuda:r``).
        timeline: return the per-rank timeline segments.
        stages: pipeline stages of a synthpipe job (0: one per rank); fewer than ``ranks``
            runs ``ranks // stages`` pipelines side by side.
    """

    name: str
    method: str
    workload: Workload
    ranks: int = 1
    mode: str = "throughput"
    steps: int = 20
    warmup: int = 3
    epochs: int = 0
    gradients: str = "synthetic"
    synth: str = "linear"
    synth_rank: int = 32
    conditional: bool = True
    max_inflight: int = 4
    balance: list[int] | None = None
    staleness: str | None = None
    aux_head: str = "linear"
    evals_per_epoch: int = 1
    schedule: str = ""
    microbatches: int = 0
    stages_per_rank: int = 1
    device: str = "cpu"
    timeline: bool = True
    sizes: list[int] = dataclasses.field(default_factory=list)  # pingpong: bytes per message
    chunk_sweep: list[int] = dataclasses.field(default_factory=list)  # single: micro-batch counts to time
    stages: int = 0

    @property
    def dp(self) -> int:
        """Pipelines side by side (synthpipe), or replicas (ddp); 1 otherwise."""
        if self.method == "ddp":
            return self.ranks
        if self.method == "synthpipe" and self.stages:
            return self.ranks // self.stages
        return 1

    @property
    def family(self) -> str:
        return {"single": "baseline", "synthpipe": "synthpipe", "pipelining": "torch.distributed.pipelining",
                "alone": "ceiling", "pingpong": "transport", "ddp": "data parallel"}[self.method]

    def label(self) -> str:
        """A readable description of the method's settings."""
        if self.method == "single":
            return "single-device backprop"
        if self.method == "ddp":
            return f"DistributedDataParallel on {self.ranks} ranks"
        if self.method == "synthpipe":
            dp = f", {self.dp} pipelines of {self.stages} stages" if self.dp > 1 else ""
            if self.gradients == "backprop":
                return f"synthpipe backprop (naive model parallel{dp})"
            if self.gradients == "delayed":
                return "synthpipe delayed gradients" + (f" (staleness={self.staleness})" if self.staleness else "")
            if self.gradients == "corrected":
                return ("synthpipe corrected synthetic gradients (cDNI now, the true gradient's correction later"
                        + (f", staleness={self.staleness})" if self.staleness else ")"))
            if self.gradients in ("local", "interlocking"):
                return f"synthpipe {self.gradients} ({self.aux_head} auxiliary head)"
            kind = self.synth + (f"-r{self.synth_rank}" if self.synth == "lowrank" else "")
            return f"synthpipe {'cDNI' if self.conditional else 'DNI'} ({kind} synthesizer{dp})"
        if self.method == "pipelining":
            return f"torch {self.schedule} ({self.microbatches} micro-batches)"
        if self.method == "alone":
            kind = self.synth + (f"-r{self.synth_rank}" if self.synth == "lowrank" else "")
            return f"{'cDNI' if self.conditional else 'DNI'} ({kind}) stages alone, no transfers (ceiling)"
        return self.method


def rank_device(spec: JobSpec, rank: int) -> torch.device:
    if spec.device.startswith("cuda"):
        return torch.device("cuda", rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeline_rows(timers: Timers) -> list[list[Any]]:
    """Segments as JSON-friendly ``[start_s, end_s, kind, step]``."""
    return [[round(s, 6), round(e, 6), k, int(st)] for s, e, k, st in timers.timeline()]


def rank_result(ctx: RankContext, spec: JobSpec, device: torch.device, *, wall: float, steps: int,
                samples: int, t_start: float, t_end: float, timers: Timers | None,
                **extra: Any) -> dict[str, Any]:
    """What one rank reports.

    Keys: ``rank``, ``wall`` (s, timed region), ``steps``, ``samples``, ``t_start`` /
    ``t_end`` (``time.time()`` of the timed region), ``timers`` (:meth:`Timers.summary`),
    ``timeline`` (segments, seconds from ``timeline_origin``), ``timeline_origin``
    (``time.time()``), ``memory`` (``rss_mb``, ``cuda_mb``), ``threads``, plus ``extra``.
    """
    out: dict[str, Any] = {
        "rank": ctx.rank, "wall": wall, "steps": steps, "samples": samples, "t_start": t_start, "t_end": t_end,
        "memory": peak_memory(device), "threads": torch.get_num_threads(), "device": str(device),
    }
    if timers is not None:
        out["timers"] = timers.summary(wall)
        out["timeline_origin"] = timers.origin_wall
        out["timeline"] = timeline_rows(timers) if spec.timeline else []
    out.update(extra)
    return out


def param_checksum(modules: list[nn.Module]) -> list[float]:
    """``[sum |p|, sum p^2]`` over the parameters of ``modules`` (in float64).

    Summed over the ranks, an exact method's checksums equal single-device backprop's
    after the same steps (up to float rounding): a cheap check that every stage trained.
    """
    a = b = 0.0
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                q = p.detach().double()
                a += float(q.abs().sum())
                b += float((q * q).sum())
    return [a, b]


def model_accuracy(model: nn.Module, batches: list, device: torch.device) -> tuple[float, float]:
    """``(accuracy, mean loss)`` of ``model`` on ``batches`` of ``(x, y)``, evaluated on ``device``."""
    metrics = evaluate_model(model, batches, device)
    return metrics["accuracy"], metrics["loss"]


def epoch_parts(batches: list, parts: int) -> list[list]:
    """``batches`` in ``parts`` consecutive, near-equal, non-empty lists (fewer when there are fewer batches)."""
    parts = max(1, min(parts, len(batches)))
    bounds = [i * len(batches) // parts for i in range(parts + 1)]
    return [batches[bounds[i]:bounds[i + 1]] for i in range(parts)]


def converge_run(ctx: RankContext, spec: JobSpec, device: torch.device, initial: tuple[float, float],
                 train_epoch: Callable[[list[tuple[torch.Tensor, torch.Tensor]]], None],
                 evaluate: Callable[[], tuple[float, float]],
                 before_epoch: Callable[[], None] | None = None) -> dict[str, Any]:
    """The time-to-accuracy loop of the unsplit and torch-pipelined methods.

    ``spec.epochs`` epochs of the workload's data, each in ``spec.evals_per_epoch``
    consecutive parts; ``train_epoch(batches)`` (which must return synchronised) trains
    one part and is the only timed section; ``evaluate()`` gives ``(accuracy, loss)``
    after each part and ``initial`` before the first; ``before_epoch`` runs untimed
    before each part (e.g. a barrier). The curve's ``epoch`` is fractional between parts.
    """
    w = spec.workload
    acc, loss = initial
    curve = [{"time": 0.0, "epoch": 0, "steps": 0, "accuracy": acc, "loss": loss}]
    total, steps, samples = 0.0, 0, 0
    reset_peak_memory(device)
    t_start = time.time()
    for epoch in range(spec.epochs):
        parts = epoch_parts(train_batches(w, epoch=epoch), spec.evals_per_epoch)
        for i, batches in enumerate(parts):
            if before_epoch is not None:
                before_epoch()
            t0 = time.perf_counter()
            train_epoch(batches)
            total += time.perf_counter() - t0
            steps += len(batches)
            samples += sum(len(y) for _, y in batches)
            acc, loss = evaluate()
            curve.append({"time": total, "epoch": round(epoch + (i + 1) / len(parts), 4), "steps": steps,
                          "accuracy": acc, "loss": loss})
    return rank_result(ctx, spec, device, wall=total, steps=steps, samples=samples, t_start=t_start,
                       t_end=time.time(), timers=None, curve=curve)
