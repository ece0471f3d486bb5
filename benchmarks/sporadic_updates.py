#!/usr/bin/env python
"""Sporadic, asynchronous updates (``p_update``) on MNIST-1D: DNI and cDNI keep learning.

The DNI paper's experiment: every layer of an MLP is decoupled by a synthetic gradient
and, at each step, each layer does its backward and update only with probability
``p_update``, independently of the others (a stand-in for straggling or intermittent
devices). Here: the paper's MLP (``models.paper_mlp``, 3 hidden layers of 256 with
BatchNorm), split into 4 stages, one per layer (a synthesizer at each of the 3
boundaries), trained by the single-process reference trainer for the same number of
steps at every ``p_update``; test accuracy after each epoch. ``p_update=1`` is the plain
run; backprop at ``p_update=1`` is the baseline. One process, one torch thread::

    python benchmarks/sporadic_updates.py              # ~6 minutes on one busy core
    python benchmarks/sporadic_updates.py --quick      # ~1 minute

Prints a markdown table and writes the plot to ``docs/images/sporadic_updates.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn

import synthpipe as sp
from synthpipe import data, models
from synthpipe.benchmark.machine import describe, summary_line

METHODS = {"dni": "DNI", "cdni": "cDNI"}


def run(method: str, p_update: float, args, train, test) -> dict:
    torch.manual_seed(args.seed)
    model = models.paper_mlp(depth=3, hidden=args.hidden)
    options: dict = {"progress": False}
    if method == "backprop":
        options["gradients"] = "backprop"
    else:
        options.update(gradients="synthetic", p_update=p_update, p_update_seed=args.seed,
                       synthesizer=sp.Synthesizer("linear", conditional=method == "cdni", num_classes=10))
    trainer = sp.Trainer(sp.split(model, balance=[3, 3, 3, 1]), nn.CrossEntropyLoss(),
                         lambda p: torch.optim.Adam(p, lr=args.lr), **options)
    curve = []
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        trainer.fit(data.loader(train, args.batch, shuffle=True, seed=args.seed), epochs=epoch + 1)
        curve.append(trainer.evaluate(data.loader(test, 500))["accuracy"])
    seconds = time.perf_counter() - t0
    trainer.close()
    return {"method": method, "p_update": p_update, "curve": curve, "accuracy": curve[-1], "seconds": seconds,
            "steps": trainer.step}


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    base = next((r for r in results if r["method"] == "backprop"), None)
    for ax, method in zip(axes, METHODS, strict=True):
        for r in (r for r in results if r["method"] == method):
            ax.plot(range(1, len(r["curve"]) + 1), r["curve"], marker="o", markersize=3,
                    label=f"p_update = {r['p_update']:g}")
        if base is not None:
            ax.plot(range(1, len(base["curve"]) + 1), base["curve"], color="gray", linestyle=":", label="backprop")
        ax.axhline(0.1, color="black", linewidth=0.5)
        ax.set_title(f"{METHODS[method]}, 4 decoupled stages, MNIST-1D")
        ax.set_xlabel("epoch (same steps for every p_update)")
        ax.legend()
    axes[0].set_ylabel("test accuracy")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--p-update", default="1,0.5,0.2,0.05", help="comma list of probabilities")
    p.add_argument("--methods", default="dni,cdni")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--num-samples", type=int, default=10000, help="MNIST-1D examples (80%% train)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="short runs (a smoke test of the script)")
    p.add_argument("--plot", default=os.path.join("docs", "images", "sporadic_updates.png"))
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.num_samples = 2, 2000
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    probabilities = [float(v) for v in args.p_update.split(",")]
    torch.set_num_threads(args.threads)
    machine = describe(threads=args.threads)
    train, test = data.mnist1d(num_samples=args.num_samples)
    results = [run("backprop", 1.0, args, train, test)]
    for method in methods:
        for prob in probabilities:
            results.append(run(method, prob, args, train, test))
            r = results[-1]
            print(f"# {method} p_update={prob:g}: {r['accuracy']:.3f} ({r['seconds']:.0f} s)", file=sys.stderr)
    print(f"Test accuracy on MNIST-1D ({len(test)} test examples) after {args.epochs} epochs "
          f"({results[0]['steps']} steps, batch {args.batch}), every stage updated with probability p_update "
          f"per step; chance is 0.10; backprop (every step): {results[0]['accuracy']:.3f}.\n")
    print("| p_update | " + " | ".join(METHODS[m] for m in methods) + " |")
    print("|---:|" + "---:|" * len(methods))
    for prob in probabilities:
        row = [next(r["accuracy"] for r in results if r["method"] == m and r["p_update"] == prob) for m in methods]
        print(f"| {prob:g} | " + " | ".join(f"{a:.3f}" for a in row) + " |")
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
