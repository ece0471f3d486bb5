#!/usr/bin/env python
"""Soak: memory over a long fit. 2 gloo ranks x 1 thread train a cheap model whose
boundary is 1 MiB (batch 256 x 1024 float32) for 10,000 steps in one ``fit``, and every
rank samples its own RSS every 1% of the run (inside a probe module at the start of its
stage, so the figure is taken while the fit runs, not after it has ended).

Reports RSS per rank at 10%, 50% and 100% of the run and the slope, in MB per 1000
steps, of a least-squares line through the samples after the warm-up (the first 10%).
A transport that held any per-step buffer would show ~1 MB per step here (1000 MB per
1000 steps); a flat run stays under 1 MB per 1000 steps. Not part of CI:

    python benchmarks/soak.py                 # ~2-4 minutes on 2 cores
    python benchmarks/soak.py --steps 20000 --json soak.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any

import torch
import torch.nn as nn

from synthpipe.benchmark.launcher import RankContext, RankPool


@dataclasses.dataclass
class SoakSpec:
    """One soak run.

    Attributes:
        steps: training steps in the one ``fit``.
        batch: examples per step.
        width: features at the boundary (``batch * width * 4`` bytes cross it each way).
        max_inflight: synthpipe's bound on activations awaiting a target.
        samples: RSS samples per rank over the run.
    """

    steps: int = 10_000
    batch: int = 256
    width: int = 1024
    max_inflight: int = 4
    samples: int = 100


class Scale(nn.Module):
    """A per-feature scale: a learnable stage that costs almost nothing per step."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.weight


class RssProbe(nn.Module):
    """Passes its input through; every ``every`` training forwards, records (step, RSS in MB)."""

    def __init__(self, every: int):
        super().__init__()
        self.every, self.calls, self.rss = every, 0, []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls % self.every == 0:
                import psutil
                self.rss.append((self.calls, psutil.Process().memory_info().rss / 2**20))
        return h


def soak_job(ctx: RankContext, spec: SoakSpec) -> dict[str, Any]:
    """One rank of the soak: its RSS samples and the fit's wall time."""
    import torch.distributed as dist

    import synthpipe as sp

    ctx.set_env()
    torch.manual_seed(0)
    every = max(1, spec.steps // spec.samples)
    layers = [RssProbe(every), Scale(spec.width), nn.Tanh(), RssProbe(every), Scale(spec.width),
              nn.Linear(spec.width, 10)]
    stages = sp.split(nn.Sequential(*layers), balance=[3, 3])
    trainer = sp.Trainer(stages, nn.CrossEntropyLoss(), synthesizer=sp.Synthesizer("lowrank", rank=4),
                         progress=False, max_inflight=spec.max_inflight, stall_warning=None)
    g = torch.Generator().manual_seed(0)
    pool = [(torch.randn(spec.batch, spec.width, generator=g), torch.randint(0, 10, (spec.batch,), generator=g))
            for _ in range(8)]

    def batches():
        for i in range(spec.steps):
            yield pool[i % len(pool)]
    t0 = time.perf_counter()
    trainer.fit(batches() if ctx.rank == 0 else None, max_steps=spec.steps)
    wall = time.perf_counter() - t0
    rss = next(m.rss for m in trainer.runner.stage.module.modules() if isinstance(m, RssProbe))
    trainer.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"rank": ctx.rank, "rss": rss, "wall_s": wall}


def slope_mb_per_1000(samples: list[tuple[int, float]]) -> float:
    """Least-squares slope of RSS (MB) against step, times 1000."""
    n = len(samples)
    mx = sum(s for s, _ in samples) / n
    my = sum(r for _, r in samples) / n
    sxx = sum((s - mx) ** 2 for s, _ in samples)
    return 1000 * sum((s - mx) * (r - my) for s, r in samples) / sxx


def at(samples: list[tuple[int, float]], step: int) -> float:
    """The RSS sample nearest ``step``."""
    return min(samples, key=lambda s: abs(s[0] - step))[1]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=SoakSpec.steps, help="steps in the one fit (default 10000)")
    p.add_argument("--batch", type=int, default=SoakSpec.batch, help="examples per step (default 256)")
    p.add_argument("--width", type=int, default=SoakSpec.width, help="boundary features (default 1024)")
    p.add_argument("--max-inflight", type=int, default=SoakSpec.max_inflight, help="(default 4)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.steps < 100:
        p.error(f"--steps must be at least 100 (1% of the run is one sample), got {args.steps}")
    spec = SoakSpec(steps=args.steps, batch=args.batch, width=args.width, max_inflight=args.max_inflight)
    boundary_mib = spec.batch * spec.width * 4 / 2**20
    print(f"soak: {spec.steps} steps, boundary {spec.batch}x{spec.width} float32 ({boundary_mib:g} MiB), "
          f"2 gloo ranks x 1 thread, max_inflight {spec.max_inflight}", flush=True)
    with RankPool(2, threads=1) as pool:
        results = pool.run(soak_job, spec, world=2, timeout=3600)
    rows = []
    for r in results:
        samples = r["rss"]
        after_warmup = [s for s in samples if s[0] >= spec.steps // 10]
        row = {"rank": r["rank"], "rss_10_mb": at(samples, spec.steps // 10), "rss_50_mb": at(samples, spec.steps // 2),
               "rss_100_mb": at(samples, spec.steps), "slope_mb_per_1000_steps": slope_mb_per_1000(after_warmup),
               "steps_per_s": spec.steps / r["wall_s"], "samples": samples}
        rows.append(row)
        print(f"rank {row['rank']}: RSS {row['rss_10_mb']:.1f} MB at 10%, {row['rss_50_mb']:.1f} MB at 50%, "
              f"{row['rss_100_mb']:.1f} MB at 100%; slope after warm-up {row['slope_mb_per_1000_steps']:+.3f} "
              f"MB per 1000 steps ({row['steps_per_s']:.0f} steps/s)", flush=True)
    machine = {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version()}
    print(f"machine: {machine['cpu']}, {machine['cpus']} vCPUs, torch {machine['torch']}, "
          f"Python {machine['python']}", flush=True)
    flat = all(row["slope_mb_per_1000_steps"] < 1.0 for row in rows)
    print("soak: flat (under 1 MB per 1000 steps on every rank)" if flat
          else "soak: NOT flat: memory grows with the run", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"spec": dataclasses.asdict(spec), "machine": machine, "ranks": rows}, f, indent=1)
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
