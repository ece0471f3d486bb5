#!/usr/bin/env python
"""Per step at 2, 3 and 4 stages: every gradient source against backprop, same steps.

The single-process reference trainer (``sp.Trainer`` without torchrun: the multi-process
engine's update rule, which a fixed-delay multi-process run equals) trains each workload
for the same number of steps with every gradient source, at every stage count
(``sp.split(model, n_stages=n)``) and seed; the figure is the final test accuracy.

Workloads:

* ``wide``: ``models.wide_mlp(hidden=512, depth=4)`` on 20,000 MNIST-1D samples (80%
  train), batch 256, fused Adam 1e-3, 5 epochs.
* ``paper``: the DNI paper's MLP, ``models.paper_mlp()``, on 5,000 MNIST-1D samples,
  batch 128, fused Adam 1e-3, 8 epochs.

Sources: ``backprop``; ``cdni`` (``gradients="synthetic"``, a conditional linear
synthesizer with its softmax-classifier term, the project's defaults otherwise: ``delay``
2 modelled in one process, ``replay`` 2); ``cdni:plain`` (``classifier=False``: the linear
map alone, the default before); ``cdni:critic`` (``critic=256``: the input gradient of a
ReLU critic with 256 units added, off by default); ``cdni:replay1`` (each target regressed
on once, as in the DNI paper);
``cdni:warmup`` (the first 60 steps wait for the true gradient, as backprop: not
update-unlocked during them, so not counted as cDNI for the marks);
``delayed`` (``delay`` 1, PipeDream's schedule), ``delayed:predict`` (weight
prediction, the default look-ahead of 3 x the stage's staleness) and ``delayed:predict1``
(``predict_ahead=1``: exactly the staleness ahead, as SpecTrain); ``corrected`` (cDNI's
synthesizer stepped on now, its error against the true gradient added when that arrives),
``corrected:replay1`` (each true target regressed on once) and ``corrected:predict``
(with ``delayed``'s weight prediction); ``local:linear``,
``local:mlp``, ``interlocking:linear`` and ``interlocking:mlp`` (the auxiliary head's
kind; the MLP head has 128 hidden units, as in ``synthpipe train``). The seed seeds
torch (model and head initialisation) and the batch order; the data are generated once
per workload (``--data-seed``), the same for every seed, so that a seed's difference to
backprop is a paired comparison.

Prints, per workload and stage count, a markdown table: each source's mean final
accuracy over the seeds, its min-max, its mean difference to backprop with the same
seed, and two marks: is the best update-unlocked source within 1 point of backprop, is
cDNI within 2 points. One process, one torch thread::

    python benchmarks/per_step.py                      # the full grid (~35 minutes on one core)
    python benchmarks/per_step.py --quick              # a smoke test (seconds)
    python benchmarks/per_step.py --workloads paper --stages 4 --sources backprop,delayed,delayed:predict
    python benchmarks/per_step.py --json per_step.json --resume   # keep going after an interruption
    python benchmarks/per_step.py --cut params         # the parameter balance child by child

``sp.split(model, n_stages=n)`` balances the parameters between whole layers (a Linear
with its BatchNorm and ReLU), so on these models every cut falls after a ReLU
(``--cut layers``, the default); ``--cut params`` balances child by child, as
``sp.split`` did before, which can cut between a Linear and its BatchNorm.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn

import synthpipe as sp
from synthpipe import data, models
from synthpipe.benchmark.machine import describe, summary_line
from synthpipe.benchmark.workload import optimizer_factory
from synthpipe.stages.balance import param_costs, partition

NUM_CLASSES = 10
MLP_HEAD_HIDDEN = 128  # synthpipe train's --aux-head mlp
CDNI_WARMUP = 60  # steps on the true gradient first (waiting for it), for the cdni:warmup row


@dataclasses.dataclass
class PerStepWorkload:
    """One workload of the grid.

    Attributes:
        name: its key on the command line.
        title: how the tables name it.
        model: builds the (seeded) unsplit model.
        num_samples: MNIST-1D samples, train + test (80% train).
        batch: batch size.
        epochs: epochs of the training split (the step budget, the same for every source).
        lr: Adam's learning rate for every stage (and every auxiliary head).
    """

    name: str
    title: str
    model: Callable[[], nn.Module]
    num_samples: int
    batch: int
    epochs: int
    lr: float = 1e-3


WORKLOADS = {
    "wide": PerStepWorkload("wide", "wide_mlp(hidden=512, depth=4), 20,000 MNIST-1D samples, batch 256",
                            lambda: models.wide_mlp(hidden=512, depth=4), 20000, 256, 5),
    "paper": PerStepWorkload("paper", "paper_mlp() (the DNI paper's MLP), 5,000 MNIST-1D samples, batch 128",
                             lambda: models.paper_mlp(), 5000, 128, 8),
}

# name -> (what the tables call it, Trainer options)
SOURCES: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
    "backprop": ("backprop", lambda: {"gradients": "backprop"}),
    "cdni": ("cDNI (`synthetic`, linear + classifier term)", lambda: {
        "gradients": "synthetic",
        "synthesizer": sp.Synthesizer("linear", conditional=True, num_classes=NUM_CLASSES)}),
    "cdni:plain": ("cDNI, `classifier=False` (the linear map alone)", lambda: {
        "gradients": "synthetic",
        "synthesizer": sp.Synthesizer("linear", conditional=True, num_classes=NUM_CLASSES, classifier=False)}),
    "cdni:critic": ("cDNI, `critic=256` (plus a ReLU critic's input gradient)", lambda: {
        "gradients": "synthetic",
        "synthesizer": sp.Synthesizer("linear", conditional=True, num_classes=NUM_CLASSES, critic=256)}),
    "cdni:replay1": ("cDNI, `replay=1` (each target once)", lambda: {
        "gradients": "synthetic",
        "synthesizer": sp.Synthesizer("linear", conditional=True, num_classes=NUM_CLASSES, replay=1)}),
    "cdni:warmup": (f"cDNI, `warmup_steps={CDNI_WARMUP}` (locked)", lambda: {
        "gradients": "synthetic", "warmup_steps": CDNI_WARMUP,
        "synthesizer": sp.Synthesizer("linear", conditional=True, num_classes=NUM_CLASSES)}),
    "delayed": ("`delayed`", lambda: {"gradients": "delayed"}),
    "delayed:predict": ("`delayed`, `staleness=\"predict\"`", lambda: {"gradients": "delayed",
                                                                       "staleness": "predict"}),
    "delayed:predict1": ("`delayed`, `staleness=\"predict\"`, `predict_ahead=1`", lambda: {
        "gradients": "delayed", "staleness": "predict", "predict_ahead": 1.0}),
    "corrected": ("`corrected` (cDNI now, the true gradient's correction when it arrives)", lambda: {
        "gradients": "corrected",
        "synthesizer": sp.Synthesizer("linear", conditional=True, num_classes=NUM_CLASSES)}),
    "corrected:replay1": ("`corrected`, `replay=1` (each true target once)", lambda: {
        "gradients": "corrected",
        "synthesizer": sp.Synthesizer("linear", conditional=True, num_classes=NUM_CLASSES, replay=1)}),
    "corrected:predict": ("`corrected`, `staleness=\"predict\"`", lambda: {
        "gradients": "corrected", "staleness": "predict",
        "synthesizer": sp.Synthesizer("linear", conditional=True, num_classes=NUM_CLASSES)}),
    "local:linear": ("`local`, linear heads", lambda: {
        "gradients": "local", "aux_head": sp.AuxHead("linear", num_classes=NUM_CLASSES)}),
    "local:mlp": ("`local`, MLP heads", lambda: {
        "gradients": "local", "aux_head": sp.AuxHead("mlp", num_classes=NUM_CLASSES, hidden=MLP_HEAD_HIDDEN)}),
    "interlocking:linear": ("`interlocking`, linear heads", lambda: {
        "gradients": "interlocking", "aux_head": sp.AuxHead("linear", num_classes=NUM_CLASSES)}),
    "interlocking:mlp": ("`interlocking`, MLP heads", lambda: {
        "gradients": "interlocking",
        "aux_head": sp.AuxHead("mlp", num_classes=NUM_CLASSES, hidden=MLP_HEAD_HIDDEN)}),
}
BASELINE = "backprop"
CDNI = "cdni"
PARTLY_LOCKED = {"cdni:warmup"}  # waits for the true gradient in some steps: not a candidate for "best"
EPS = 1e-9


CUTS = ("layers", "params")


def split(model: nn.Module, n_stages: int, cut: str) -> list[nn.Module]:
    """``sp.split(model, n_stages=n)`` (``cut="layers"``: balanced by parameters between whole
    layers) or balanced child by child (``"params"``, which may cut between a Linear and
    its BatchNorm)."""
    if cut == "params":
        return sp.split(model, balance=partition(param_costs(model), n_stages))
    return sp.split(model, n_stages=n_stages)


def run_one(w: PerStepWorkload, source: str, n_stages: int, seed: int, train: Any, test: Any,
            cut: str = "layers") -> dict[str, Any]:
    """Train ``w`` split into ``n_stages`` with ``source`` from ``seed``; the final test accuracy."""
    torch.manual_seed(seed)
    model = w.model()
    options = SOURCES[source][1]()
    trainer = sp.Trainer(split(model, n_stages, cut), nn.CrossEntropyLoss(),
                         optimizer_factory("adam-fused", w.lr), device="cpu", progress=False, **options)
    try:
        t0 = time.perf_counter()
        trainer.fit(data.loader(train, w.batch, shuffle=True, seed=seed), epochs=w.epochs)
        seconds = time.perf_counter() - t0
        m = trainer.evaluate(data.loader(test, 1000))
        steps = trainer.step
    finally:
        trainer.close()
    return {"workload": w.name, "source": source, "stages": n_stages, "seed": seed, "cut": cut,
            "accuracy": m["accuracy"], "loss": m["loss"], "steps": steps, "seconds": seconds}


def summarize(results: list[dict[str, Any]], workload: str, n_stages: int, sources: list[str]
              ) -> list[dict[str, Any]]:
    """One row per source of (``workload``, ``n_stages``): accuracies in percent, differences in points."""
    cell = [r for r in results if r["workload"] == workload and r["stages"] == n_stages]
    base = {r["seed"]: r["accuracy"] for r in cell if r["source"] == BASELINE}
    rows = []
    for source in sources:
        runs = sorted((r for r in cell if r["source"] == source), key=lambda r: r["seed"])
        if not runs:
            continue
        acc = [100 * r["accuracy"] for r in runs]
        diffs = [100 * (r["accuracy"] - base[r["seed"]]) for r in runs if r["seed"] in base]
        rows.append({"source": source, "seeds": [r["seed"] for r in runs], "steps": sorted({r["steps"] for r in runs}),
                     "mean": statistics.fmean(acc), "min": min(acc), "max": max(acc),
                     "diffs": diffs, "mean_diff": statistics.fmean(diffs) if diffs else None,
                     "seconds": statistics.fmean(r["seconds"] for r in runs)})
    return rows


def marks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The best update-unlocked source (by mean difference to backprop) and the two marks
    (a difference of exactly -1 or -2 points counts as within: accuracies are whole counts
    of test samples, so ties happen; ``EPS`` absorbs the rounding of the percentages)."""
    others = [r for r in rows if r["source"] != BASELINE and r["source"] not in PARTLY_LOCKED
              and r["mean_diff"] is not None]
    best = max(others, key=lambda r: r["mean_diff"], default=None)
    cdni = next((r for r in others if r["source"] == CDNI), None)
    return {"best": best["source"] if best else None,
            "best_diff": best["mean_diff"] if best else None,
            "best_within_1": best["mean_diff"] >= -1.0 - EPS if best else None,
            "cdni_diff": cdni["mean_diff"] if cdni else None,
            "cdni_within_2": cdni["mean_diff"] >= -2.0 - EPS if cdni else None}


def _yes(flag: bool | None) -> str:
    return "n/a" if flag is None else ("yes" if flag else "**no**")


def table(results: list[dict[str, Any]], w: PerStepWorkload, n_stages: int, sources: list[str]) -> str:
    rows = summarize(results, w.name, n_stages, sources)
    if not rows:
        return ""
    steps = sorted({s for r in rows for s in r["steps"]})
    seeds = sorted({s for r in rows for s in r["seeds"]})
    mk = marks(rows)
    out = [f"**{w.title}, {n_stages} stages**: {w.epochs} epochs = {'/'.join(map(str, steps))} steps for every "
           f"source; seeds {', '.join(map(str, seeds))}.", "",
           "| source | final acc. % (mean) | min-max | vs backprop, same seed (points, mean) | per seed | "
           "s per run |", "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        diff = "–" if r["source"] == BASELINE else (f"{r['mean_diff']:+.1f}" if r["mean_diff"] is not None else "n/a")
        per_seed = "–" if r["source"] == BASELINE else " / ".join(f"{d:+.1f}" for d in r["diffs"])
        out.append(f"| {SOURCES[r['source']][0]} | {r['mean']:.1f} | {r['min']:.1f}-{r['max']:.1f} | {diff} | "
                   f"{per_seed} | {r['seconds']:.0f} |")
    if mk["best"] is not None:
        out += ["", f"Best source: {SOURCES[mk['best']][0]} ({mk['best_diff']:+.1f}); within 1 point of backprop: "
                    f"{_yes(mk['best_within_1'])}. cDNI within 2 points: "
                    + (f"{_yes(mk['cdni_within_2'])} ({mk['cdni_diff']:+.1f})." if mk["cdni_diff"] is not None
                       else "n/a.")]
    return "\n".join(out)


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="wide,paper", help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--stages", default="2,3,4", help="comma list of stage counts")
    p.add_argument("--sources", default=",".join(SOURCES), help=f"comma list of {', '.join(SOURCES)}")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (torch and the batch order)")
    p.add_argument("--data-seed", type=int, default=0, help="the MNIST-1D generator's seed (every seed's data)")
    p.add_argument("--cut", choices=CUTS, default="layers",
                   help="where stages are cut: sp.split's balance between whole layers (default), or the "
                        "parameter balance child by child")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help="tiny: 1,000 samples, 1 epoch, 2 stages, seed 0 (a smoke test of the script)")
    p.add_argument("--json", default=None, help="write the results here (after every run)")
    p.add_argument("--resume", action="store_true", help="skip the runs already in --json")
    args = p.parse_args(argv)
    names = _csv(args.workloads)
    sources = _csv(args.sources)
    for kind, given, known in (("workload", names, WORKLOADS), ("source", sources, SOURCES)):
        unknown = [v for v in given if v not in known]
        if unknown:
            p.error(f"unknown {kind}(s) {unknown}; choose from {list(known)}")
    if BASELINE not in sources:
        sources.insert(0, BASELINE)  # every difference is to backprop with the same seed
    try:
        stage_counts = [int(v) for v in _csv(args.stages)]
        seeds = [int(v) for v in _csv(args.seeds)]
    except ValueError as e:
        p.error(f"--stages and --seeds take comma lists of whole numbers: {e}")
    if any(n < 2 for n in stage_counts):
        p.error(f"--stages must be at least 2 (a boundary to decouple), got {stage_counts}")
    if args.resume and not args.json:
        p.error("--resume reads the results of --json; give --json FILE")
    workloads = [WORKLOADS[n] for n in names]
    if args.quick:
        workloads = [dataclasses.replace(w, num_samples=1000, epochs=1) for w in workloads]
        stage_counts, seeds = stage_counts[:1], seeds[:1]
    torch.set_num_threads(args.threads)
    machine = describe(threads=args.threads)
    results: list[dict[str, Any]] = []
    if args.resume and os.path.exists(args.json):
        with open(args.json) as f:
            saved = json.load(f)
        for key in ("quick", "data_seed"):  # (other sizes or data: their runs are not these)
            if saved["args"].get(key) != getattr(args, key):
                p.error(f"--resume: {args.json} was written with {key}={saved['args'].get(key)!r}, "
                        f"this run has {key}={getattr(args, key)!r}")
        results = saved["results"]
    done = {(r["workload"], r["source"], r["stages"], r["seed"], r.get("cut", "layers")) for r in results}

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "machine": machine, "results": results}, f, indent=1)

    for w in workloads:
        train, test = data.mnist1d(num_samples=w.num_samples, seed=args.data_seed)
        for n in stage_counts:
            for source in sources:
                for seed in seeds:
                    if (w.name, source, n, seed, args.cut) in done:
                        continue
                    r = run_one(w, source, n, seed, train, test, args.cut)
                    results.append(r)
                    save()
                    print(f"# {w.name} {n} stages {source} seed {seed}: {100 * r['accuracy']:.1f}% "
                          f"({r['steps']} steps, {r['seconds']:.0f} s)", file=sys.stderr, flush=True)
    print("Final test accuracy after the same steps as backprop, single-process reference trainer, fused Adam "
          f"{workloads[0].lr:g}, MNIST-1D data seed {args.data_seed}, stages cut by {args.cut}.\n")
    shown = [r for r in results if r.get("cut", "layers") == args.cut]
    for w in workloads:
        for n in stage_counts:
            text = table(shown, w, n, sources)
            if text:
                print(text + "\n")
    print(f"Machine: {summary_line(machine)}")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
