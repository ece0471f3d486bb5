#!/usr/bin/env python
"""Forward unlocking (``synthetic_inputs=True``) on MNIST-1D against cDNI and backprop.

The DNI paper's complete unlock: every stage r > 0 trains on a predicted input
``I_r(x)`` and a synthetic gradient, so no stage waits for another's forward or
backward, and the network still learns, more slowly. Here: the paper's MLP
(``models.paper_mlp``, 3 hidden layers of 256 with BatchNorm) in 3 stages, conditional
linear synthesizers, Adam (lr 1e-3), batch 64, the same steps for every method; test
accuracy of the real network after each epoch, for a few seeds. Reference trainer, one
process, one torch thread::

    python benchmarks/synthetic_inputs.py            # ~5 minutes on one busy core
    python benchmarks/synthetic_inputs.py --quick    # ~30 seconds

Prints a markdown table and writes the plot to ``docs/images/synthetic_inputs.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

import synthpipe as sp
from synthpipe import data, models
from synthpipe.benchmark.machine import describe, summary_line

METHODS = {"backprop": "backprop", "cdni": "cDNI (update-unlocked)",
           "unlocked": "cDNI + synthetic inputs (forward- and update-unlocked)"}


def run(method: str, seed: int, args, train, test) -> dict:
    torch.manual_seed(seed)
    options: dict = {"progress": False, "gradients": "backprop" if method == "backprop" else "synthetic",
                     "synthesizer": sp.Synthesizer("linear", conditional=True, num_classes=10),
                     "synthetic_inputs": method == "unlocked"}
    trainer = sp.Trainer(sp.split(models.paper_mlp(depth=3, hidden=args.hidden), n_stages=3), nn.CrossEntropyLoss(),
                         lambda p: torch.optim.Adam(p, lr=args.lr), **options)
    curve, t0 = [], time.perf_counter()
    for epoch in range(args.epochs):
        trainer.fit(data.loader(train, args.batch, shuffle=True, seed=seed), epochs=epoch + 1)
        curve.append(trainer.evaluate(data.loader(test, 500))["accuracy"])
    trainer.close()
    return {"method": method, "seed": seed, "curve": curve, "accuracy": curve[-1],
            "seconds": time.perf_counter() - t0, "steps": trainer.step}


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, method in enumerate(METHODS):
        runs = [r["curve"] for r in results if r["method"] == method]
        if not runs:
            continue
        for j, curve in enumerate(runs):
            ax.plot(range(1, len(curve) + 1), curve, color=f"C{i}", alpha=0.8,
                    label=METHODS[method] if j == 0 else None)
    ax.axhline(0.1, color="black", linewidth=0.5)
    ax.set_xlabel("epoch (same steps for every method)")
    ax.set_ylabel("test accuracy (real network)")
    ax.set_title("MNIST-1D, paper MLP in 3 stages (one line per seed)")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--num-samples", type=int, default=10000, help="MNIST-1D examples (80%% train)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="short runs (a smoke test of the script)")
    p.add_argument("--plot", default=os.path.join("docs", "images", "synthetic_inputs.png"))
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.num_samples, args.seeds = 2, 2000, "0"
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    machine = describe(threads=args.threads)
    train, test = data.mnist1d(num_samples=args.num_samples)
    results = []
    for method in methods:
        for seed in seeds:
            results.append(run(method, seed, args, train, test))
            print(f"# {method} seed {seed}: {results[-1]['accuracy']:.3f} ({results[-1]['seconds']:.0f} s)",
                  file=sys.stderr)
    print(f"Test accuracy on MNIST-1D ({len(test)} test examples) after {args.epochs} epochs "
          f"({results[0]['steps']} steps, batch {args.batch}); seeds {args.seeds}; chance is 0.10.\n")
    print("| method | accuracy (mean) | per seed | epochs to 0.6 (mean) | seconds per run |")
    print("|---|---:|---|---:|---:|")
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        reach = [next((i + 1 for i, a in enumerate(r["curve"]) if a >= 0.6), None) for r in runs]
        shown = "never" if None in reach else f"{statistics.mean(e for e in reach if e is not None):.1f}"
        per_seed = ", ".join(f"{r['accuracy']:.3f}" for r in runs)
        print(f"| {METHODS[method]} | {statistics.mean(r['accuracy'] for r in runs):.3f} | {per_seed} | {shown} | "
              f"{statistics.mean(r['seconds'] for r in runs):.0f} |")
    print(f"\nMachine: {summary_line(machine)}")
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": machine, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
