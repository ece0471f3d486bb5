#!/usr/bin/env python
"""What forward unlocking (``synthetic_inputs=True``) buys a pipeline of processes: fill
time and straggler tolerance, measured on the real engine and transport.

Three ranks (gloo, one thread each) train the paper's MLP in 3 stages with cDNI, with
and without synthetic inputs, free-running (``max_inflight`` 4). Each stage's compute is
*emulated*: a module that sleeps ``--compute-ms`` in every forward (as a GPU kernel
would keep a device busy without using the host's CPU), so that 3 ranks on a 2-core
host measure the schedule, not the CPU's contention; the model's own compute is a
fraction of a millisecond. A forward-unlocked stage r > 0 runs two forwards per step
(the predicted and the real input), so it pays that sleep twice, as it would pay the
compute.

Measured, on a second fit (the pipeline refills at every fit's start):

* fill: the time from rank 0's first step until the last rank's first update;
* latency: the mean time from rank 0 starting a batch's step to the last rank's update
  on that batch;
* step: the wall-clock per step over the fit;
* stragglers: rank 1 stalls (a sleep in its optimizer step) for ``--stall-ms`` in every
  8th step (*intermittent*) or in every step (*persistent*); the step time then, over
  the same method's without stalls.

    python benchmarks/forward_unlock.py           # ~1 minute
    python benchmarks/forward_unlock.py --quick   # a smoke test, ~15 s
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

import synthpipe as sp
from synthpipe import data, models
from synthpipe.benchmark.launcher import RankContext, RankPool
from synthpipe.benchmark.machine import describe, summary_line

METHODS = {"cdni": "cDNI", "inputs": "cDNI + synthetic inputs"}
SCENARIOS = {"none": 0, "intermittent": 8, "persistent": 1}  # rank 1 stalls every N-th step (0: never)


@dataclasses.dataclass
class Spec:
    method: str
    stall_every: int
    steps: int = 64
    compute_ms: float = 10.0
    stall_ms: float = 40.0
    batch: int = 64


class Compute(nn.Module):
    """Emulated device compute: sleeps in every forward."""

    def __init__(self, ms: float):
        super().__init__()
        self.seconds = ms / 1000

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


def job(ctx: RankContext, spec: Spec) -> dict[str, Any]:
    ctx.set_env()
    torch.manual_seed(0)
    train, _ = data.mnist1d(num_samples=spec.batch * spec.steps + 1000)
    batches = list(data.loader(train, spec.batch))[:spec.steps]
    stages = [nn.Sequential(Compute(spec.compute_ms), s) for s in sp.split(models.paper_mlp(depth=3), n_stages=3)]
    trainer = sp.Trainer(stages, nn.CrossEntropyLoss(), lambda p: torch.optim.Adam(p, lr=1e-3),
                         synthesizer=sp.Synthesizer("linear", conditional=True, num_classes=10),
                         gradients="synthetic", synthetic_inputs=spec.method == "inputs", max_inflight=4,
                         progress=False)
    trainer.fit(batches[:8])  # warm-up (and the input synthesizers are built)
    stage, runner = trainer.runner.stage, trainer.runner
    updates: list[float] = []
    starts: list[float] = []
    step_of_optimizer = stage.optimizer.step

    def step(*args: Any, **kwargs: Any) -> Any:
        k = len(updates)
        if ctx.rank == 1 and spec.stall_every and k % spec.stall_every == spec.stall_every - 1:
            time.sleep(spec.stall_ms / 1000)
        updates.append(time.perf_counter())  # (CLOCK_MONOTONIC: one clock for every process on the host)
        return step_of_optimizer(*args, **kwargs)
    stage.optimizer.step = step  # type: ignore[method-assign]
    if ctx.rank == 0:
        train_step = runner.train_step

        def timed(s: int, x: Any, y: torch.Tensor) -> Any:
            starts.append(time.perf_counter())
            return train_step(s, x, y)
        runner.train_step = timed  # type: ignore[method-assign]
    trainer.fit(batches, epochs=2)
    trainer.close()
    if dist.is_initialized():  # (the pool's next job makes its own group, on its own port)
        dist.destroy_process_group()
    return {"rank": ctx.rank, "updates": updates, "starts": starts}


def summarize(results: list[dict[str, Any]]) -> dict[str, float]:
    starts, last = results[0]["starts"], results[-1]["updates"]
    n = min(len(starts), len(last))
    return {"fill_ms": 1000 * (last[0] - starts[0]),
            "latency_ms": 1000 * statistics.mean(last[k] - starts[k] for k in range(n)),
            "step_ms": 1000 * (last[n - 1] - starts[0]) / n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--compute-ms", type=float, default=10.0, help="emulated compute per forward and stage")
    p.add_argument("--stall-ms", type=float, default=40.0, help="rank 1's stall in a straggling step")
    p.add_argument("--repeats", type=int, default=3, help="runs per row; the median is shown")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 16, 1
    rows: dict[tuple[str, str], dict[str, float]] = {}
    with RankPool(3, threads=1) as pool:
        for scenario, every in SCENARIOS.items():
            for method in METHODS:
                spec = Spec(method, every, args.steps, args.compute_ms, args.stall_ms)
                runs = [summarize(pool.run(job, spec, world=3, timeout=300)) for _ in range(args.repeats)]
                rows[method, scenario] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                print(f"  {method:7s} {scenario:13s} " + "  ".join(f"{k} {v:7.1f}" for k, v in
                                                                  rows[method, scenario].items()), flush=True)
    print(f"\n{summary_line(describe(3, 1))}\n3 ranks x 1 thread (gloo); emulated compute "
          f"{args.compute_ms:g} ms per forward and stage; rank 1 stalls {args.stall_ms:g} ms; "
          f"{args.steps} steps per fit, median of {args.repeats}\n")
    print("| method | fill (ms) | latency (ms) | step (ms) | intermittent stall: step x | persistent stall: step x |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, name in METHODS.items():
        base = rows[method, "none"]
        print(f"| {name} | {base['fill_ms']:.1f} | {base['latency_ms']:.1f} | {base['step_ms']:.1f} | "
              f"{rows[method, 'intermittent']['step_ms'] / base['step_ms']:.2f} | "
              f"{rows[method, 'persistent']['step_ms'] / base['step_ms']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{m}/{s}": v for (m, s), v in rows.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
