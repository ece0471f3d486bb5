#!/usr/bin/env python
"""Transformer: every gradient source on a character-level GPT, per step and in wall-clock.

The workload is :func:`synthpipe.models.char_gpt` (token + position embedding, ``--layers``
pre-norm blocks, LM head) trained with :func:`synthpipe.models.lm_loss` on
:func:`synthpipe.text.char_lm` (the standard library's own sources as bytes), split into
2 stages by :func:`synthpipe.split`, Adam at ``--lr``.

Part 1, per step (one process, the reference trainer ``sp.Trainer``, which runs the
multi-process engine's update rule): backprop, stage 0 frozen (only stage 1 trains, by
backprop; stage 0 keeps its initial weights), and every update-unlocked source, each on
``--seeds`` seeds with the same batches per seed and the same ``--steps``. Prints a
markdown table: mean and min-max test loss (nats per byte), the gap to backprop, and
whether the mean beats freezing stage 0.

Part 2, wall-clock: the best source of part 1 on 2 ranks (2 processes x 1 thread, the
benchmark's ``RankPool``, gloo) against plain backprop in one process (1 thread), both
evaluated every ``--eval-every`` steps (evaluation untimed); reports the training time
each needs to reach backprop's final test loss.

    python benchmarks/transformer.py --quick      # smoke test: tiny model, 1 seed, 20 steps (~15 s)
    python benchmarks/transformer.py              # dim 128, 4 layers, seq 64, batch 16, 300 steps, 3 seeds
                                                  # (30-100 s per run on one shared core: 24 runs, then the race)
    python benchmarks/transformer.py --only "delayed;local" --best local --no-wallclock
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn as nn

import synthpipe as sp
from synthpipe.benchmark.launcher import RankContext, RankPool
from synthpipe.models import char_gpt, lm_loss
from synthpipe.text import VOCAB_SIZE, char_lm

# Every update-unlocked source, as (label, gradients=, Trainer options); a "synthetic" entry's
# "recipe" holds extra Synthesizer options (the token synthesizer; cDNI where the label says).
SOURCES: list[tuple[str, str, dict[str, Any]]] = [
    ("cDNI (token)", "synthetic", {}),
    ("DNI (token)", "synthetic", {}),
    ("delayed", "delayed", {}),
    ("delayed, predict", "delayed", {"staleness": "predict"}),
    ("delayed, lr", "delayed", {"staleness": "lr"}),
    ("local", "local", {}),
    ("interlocking", "interlocking", {}),
    ("corrected (token)", "corrected", {}),
    ("corrected, predict", "corrected", {"staleness": "predict"}),
]


@dataclasses.dataclass
class Spec:
    """One run: the model size, the data, the optimizer and the method."""

    dim: int = 128
    layers: int = 4
    heads: int = 4
    seq: int = 64
    batch: int = 16
    steps: int = 300
    lr: float = 1e-3
    seed: int = 0
    test_batches: int = 4
    eval_every: int = 25
    method: str = "backprop"  # "single" (plain backprop, no stages), "frozen", or a gradients= name
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    label: str = ""


def data(spec: Spec) -> tuple[list, list]:
    """The run's ``steps`` training batches (drawn by its seed) and a fixed test set."""
    train, test = char_lm(seq_len=spec.seq)
    g = torch.Generator().manual_seed(1000 + spec.seed)
    idx = torch.randint(0, len(train), (spec.steps, spec.batch), generator=g)
    batches = [(train.tensors[0][i], train.tensors[1][i]) for i in idx]
    ti = torch.randperm(len(test), generator=torch.Generator().manual_seed(7))[:spec.test_batches * 128]
    tests = [(test.tensors[0][ti[i:i + 128]], test.tensors[1][ti[i:i + 128]]) for i in range(0, len(ti), 128)]
    return batches, tests


def model(spec: Spec) -> nn.Sequential:
    torch.manual_seed(spec.seed)
    return char_gpt(VOCAB_SIZE, dim=spec.dim, n_layers=spec.layers, heads=spec.heads, max_len=spec.seq)


def trainer(spec: Spec, stages: list[nn.Module]) -> sp.Trainer:
    options = dict(spec.options)
    recipe = options.pop("recipe", {})
    options.setdefault("progress", False)
    if spec.method in ("local", "interlocking"):
        options.setdefault("aux_head", sp.AuxHead("token", num_classes=VOCAB_SIZE))
    if spec.method in ("synthetic", "corrected"):
        conditional = spec.label.startswith("cDNI")
        options.setdefault("synthesizer", sp.Synthesizer("token", conditional=conditional,
                                                         num_classes=VOCAB_SIZE if conditional else None,
                                                         **recipe))
    return sp.Trainer(stages, lm_loss, lambda ps: torch.optim.Adam(ps, lr=spec.lr), gradients=spec.method,
                      **options)


def plain_eval(m: nn.Module, tests: list) -> float:
    m.eval()
    with torch.no_grad():
        loss = sum(float(lm_loss(m(x), y)) for x, y in tests) / len(tests)
    m.train()
    return loss


def per_step(spec: Spec) -> float:
    """Test loss after ``spec.steps`` steps of ``spec.method`` (one process)."""
    torch.set_num_threads(1)
    batches, tests = data(spec)
    net = model(spec)
    if spec.method == "frozen":  # stage 0 keeps its initial weights; stage 1 by backprop
        s0, s1 = sp.split(net, n_stages=2)
        s0.requires_grad_(False)
        opt = torch.optim.Adam(s1.parameters(), lr=spec.lr)
        for x, y in batches:
            opt.zero_grad()
            lm_loss(s1(s0(x)), y).backward()
            opt.step()
        return plain_eval(nn.Sequential(s0, s1), tests)
    t = trainer(spec, sp.split(net, n_stages=2))
    t.fit(batches)
    return float(t.evaluate(tests)["loss"])


# -- wall-clock -----------------------------------------------------------------------------
def curve_single(spec: Spec) -> list[tuple[int, float, float]]:
    """Plain backprop in this process: ``(step, training seconds so far, test loss)`` every ``eval_every``."""
    torch.set_num_threads(1)
    batches, tests = data(spec)
    net = model(spec)
    opt = torch.optim.Adam(net.parameters(), lr=spec.lr)
    out, elapsed = [], 0.0
    for start in range(0, spec.steps, spec.eval_every):
        t0 = time.perf_counter()
        for x, y in batches[start:start + spec.eval_every]:
            opt.zero_grad()
            lm_loss(net(x), y).backward()
            opt.step()
        elapsed += time.perf_counter() - t0
        out.append((min(start + spec.eval_every, spec.steps), elapsed, plain_eval(net, tests)))
    return out


def curve_ranks(ctx: RankContext, spec: Spec) -> list[tuple[int, float, float]]:
    """One rank of the 2-rank run: the same curve, each chunk of steps timed on every rank."""
    ctx.set_env()
    torch.set_num_threads(ctx.threads)
    batches, tests = data(spec)
    t = trainer(spec, sp.split(model(spec), n_stages=2))
    out, elapsed = [], 0.0
    try:
        for start in range(0, spec.steps, spec.eval_every):
            t0 = time.perf_counter()  # (fit starts with every rank agreeing, and ends drained)
            t.fit(batches, max_steps=min(start + spec.eval_every, spec.steps))  # (counts from the run's start)
            elapsed += time.perf_counter() - t0
            out.append((t.step, elapsed, float(t.evaluate(tests)["loss"])))
    finally:
        t.close()
    return out


def time_to(curve: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    return next(((s, sec) for s, sec, loss in curve if loss <= target), None)


def table(rows: list[tuple[str, list[float]]], backprop: float, frozen: float, steps: int) -> str:
    lines = [f"| method ({steps} steps) | test loss, mean | min-max | vs backprop | beats frozen stage 0 |",
             "|---|---|---|---|---|"]
    for label, losses in rows:
        mean = statistics.fmean(losses)
        beats = "-" if label in ("backprop", "stage 0 frozen") else ("yes" if mean < frozen else "no")
        lines.append(f"| {label} | {mean:.3f} | {min(losses):.3f}-{max(losses):.3f} | "
                     f"{100 * (mean - backprop) / backprop:+.1f}% | {beats} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 1 seed, few steps: a smoke test")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--race-steps", type=int, default=None,
                   help="steps the 2-rank run may take to reach the target (default: --steps)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--only", default="", help="';'-separated labels of the sources to run (default: all)")
    p.add_argument("--no-wallclock", action="store_true", help="skip part 2")
    p.add_argument("--best", default="", help="the source for part 2 (default: part 1's best)")
    a = p.parse_args(argv)
    base = Spec(dim=a.dim, layers=a.layers, seq=a.seq, batch=a.batch, steps=a.steps, lr=a.lr, eval_every=a.eval_every)
    seeds = a.seeds
    if a.quick:
        base = dataclasses.replace(base, dim=32, layers=2, heads=2, seq=16, batch=8, steps=20, test_batches=1,
                                   eval_every=10)
        seeds = 1
    torch.set_num_threads(1)
    wanted = [s for s in SOURCES if not a.only or s[0] in a.only.split(";")]
    runs = [("backprop", "backprop", {}), ("stage 0 frozen", "frozen", {}), *wanted]
    results: list[tuple[str, list[float]]] = []
    for label, method, options in runs:
        losses = []
        for seed in range(seeds):
            t0 = time.perf_counter()
            losses.append(per_step(dataclasses.replace(base, seed=seed, method=method, options=options, label=label)))
            print(f"{label:18s} seed {seed}: test loss {losses[-1]:.4f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
        results.append((label, losses))
    means = {label: statistics.fmean(v) for label, v in results}
    print(f"\nchar_gpt dim {base.dim}, {base.layers} layers, seq {base.seq}, batch {base.batch}, Adam lr {base.lr}, "
          f"2 stages, {seeds} seed(s), {base.steps} steps; test loss in nats per byte\n")
    print(table(results, means["backprop"], means["stage 0 frozen"], base.steps))
    if a.no_wallclock:
        return 0
    unlocked = [label for label, _, _ in wanted]
    best = a.best or min(unlocked, key=means.__getitem__)
    label, method, options = next(s for s in SOURCES if s[0] == best)
    spec = dataclasses.replace(base, method=method, options=options, label=label)
    single = curve_single(dataclasses.replace(spec, method="single"))
    target = single[-1][2]
    race = dataclasses.replace(spec, steps=max(a.race_steps or spec.steps, spec.steps))  # (the same first batches)
    with RankPool(2, threads=1) as pool:
        ranks = pool.run(curve_ranks, race, world=2, timeout=1800)
    # (each chunk is timed on every rank; the pipeline's time is its slowest rank's)
    piped = [(s, max(r[i][1] for r in ranks), loss) for i, (s, _, loss) in enumerate(ranks[0])]
    print(f"\nWall-clock, seed 0, {base.steps} steps (2 ranks: up to {race.steps}), test loss every "
          f"{base.eval_every} steps (untimed); "
          f"target: one-process backprop's final test loss {target:.3f}\n")
    print("| run | final test loss | steps to target | training s to target | total training s |")
    print("|---|---|---|---|---|")
    for name, curve in (("backprop, 1 process x 1 thread", single), (f"{best}, 2 ranks x 1 thread", piped)):
        hit = time_to(curve, target)
        print(f"| {name} | {curve[-1][2]:.3f} | {hit[0] if hit else 'not reached'} | "
              f"{f'{hit[1]:.1f}' if hit else '-'} | {curve[-1][1]:.1f} |")
    hit_single, hit_piped = time_to(single, target), time_to(piped, target)
    if hit_single and hit_piped:
        print(f"\n{best} on 2 ranks reaches the target {hit_single[1] / hit_piped[1]:.2f}x sooner than one process")
    else:
        print(f"\n{best} on 2 ranks does not reach the target within {race.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
