"""``synthpipe bench`` and ``synthpipe simulate``: argument parsers and entry points.

The ``synthpipe`` command wires these in as sub-commands::

    add_bench_arguments(subparsers.add_parser("bench"))       -> run_bench(args)
    add_simulate_arguments(subparsers.add_parser("simulate")) -> run_simulate(args)

The scripts under ``benchmarks/`` call the same functions.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .workload import Workload


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.replace(" ", "").split(",") if v]


def _strs(text: str) -> list[str]:
    return [v for v in text.replace(" ", "").split(",") if v]


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``synthpipe bench`` (defaults: the full run; ``--quick`` shrinks it)."""
    parser.description = (parser.description or "") + (
        "Benchmark synthpipe (backprop, DNI, cDNI) against single-device backprop and "
        "torch.distributed.pipelining on the same model, data, batch and ranks; write a "
        "markdown table, CSV/JSON and plots, and check the schedule simulator.")
    g = parser.add_argument_group("run")
    g.add_argument("--quick", action="store_true",
                   help="short run (~1-2 min on 2 cores): 12 timed steps, 1 round, m in {2,4}, 8 epochs")
    g.add_argument("--output", "-o", default="bench-results", help="directory for CSV/JSON/PNG (default: %(default)s)")
    g.add_argument("--ranks", type=int, default=2, help="processes (= pipeline stages) per method (default: 2)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch threads of every rank and of the baseline (default: 1)")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="rank r runs on cuda:r with --device cuda")
    g.add_argument("--repeats", type=int, default=None, help="interleaved rounds; the median is reported (default 3, quick 1)")
    g.add_argument("--baseline-every", type=int, default=4,
                   help="run single-device backprop again after every N jobs of a round; each speedup is "
                        "against the baseline runs around it (default 4; 0: once per round)")
    g.add_argument("--pin", action="store_true", help="pin each rank to its own cores (sched_setaffinity)")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds before a job counts as hung (default: 600)")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    g.add_argument("--no-throughput", dest="throughput", action="store_false", help="skip the throughput runs")
    g.add_argument("--no-converge", dest="converge", action="store_false", help="skip the time-to-accuracy runs")
    g.add_argument("--json", action="store_true", help="print results.json instead of the markdown")
    t = parser.add_argument_group("throughput workload (deep MLP on synthetic data)")
    t.add_argument("--model", default="deep_mlp", choices=["deep_mlp", "paper_mlp"])
    t.add_argument("--in-features", type=int, default=1024)
    t.add_argument("--hidden", type=int, default=1024)
    t.add_argument("--depth", type=int, default=8)
    t.add_argument("--batch", type=int, default=256, help="global batch (default: 256)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--optimizer", default="adam-fused", choices=["adam-fused", "adam", "sgd"],
                   help="the optimizer of every method and synthesizer, both workloads (default: %(default)s)")
    t.add_argument("--steps", type=int, default=None, help="timed steps per method (default 30, quick 12)")
    t.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5, quick 2)")
    t.add_argument("--microbatches", type=_ints, default=None,
                   help="torch micro-batch sweep, e.g. 2,4,8 (default 2,4,8; quick 2,4)")
    t.add_argument("--schedules", type=_strs, default=None,
                   help="torch schedules: gpipe,1f1b,interleaved1f1b,izb,zbv "
                        "(default gpipe,1f1b,interleaved1f1b,zbv; quick gpipe,1f1b,zbv)")
    t.add_argument("--variants", type=_strs, default=None,
                   help="synthetic-gradient rows as mode[:kind[:rank]], e.g. dni,cdni,cdni:lowrank:32 (the default)")
    t.add_argument("--no-backprop", dest="backprop", action="store_false", help="skip synthpipe backprop mode")
    t.add_argument("--no-ceiling", dest="ceiling", action="store_false",
                   help="skip the <variant>-alone rows (each variant's stages run alone, no transfers)")
    t.add_argument("--max-inflight", type=int, default=4, help="synthpipe max_inflight (default: 4)")
    t.add_argument("--balance", type=_ints, default=None, help="children per stage for synthpipe, e.g. 8,9")
    c = parser.add_argument_group("time to accuracy (paper MLP on MNIST-1D)")
    c.add_argument("--conv-epochs", type=int, default=None, help="epochs per method (default 30, quick 8)")
    c.add_argument("--conv-target", type=float, default=0.6, help="target test accuracy (default: 0.6)")
    c.add_argument("--conv-hidden", type=int, default=256)
    c.add_argument("--conv-depth", type=int, default=3)
    c.add_argument("--conv-batch", type=int, default=128)
    c.add_argument("--conv-samples", type=int, default=5000, help="MNIST-1D samples, train + test")
    c.add_argument("--conv-lr", type=float, default=1e-3)
    s = parser.add_argument_group("simulator")
    s.add_argument("--devices", type=_ints, default=[2, 4, 8, 16], help="device counts to predict (default: 2,4,8,16)")
    return parser


def config_from_args(args: argparse.Namespace) -> Any:
    from .bench import BenchConfig, Variant, quick_config

    cfg = quick_config() if args.quick else BenchConfig()
    cfg.output = args.output
    cfg.ranks, cfg.threads, cfg.device = args.ranks, args.threads, args.device
    cfg.workload = Workload(model=args.model, in_features=args.in_features, hidden=args.hidden, depth=args.depth,
                            batch=args.batch, lr=args.lr, optimizer=args.optimizer,
                            num_samples=max(args.batch * 16, 4096))
    cfg.conv_workload = Workload(model="paper_mlp", in_features=40, hidden=args.conv_hidden, depth=args.conv_depth,
                                 batch=args.conv_batch, data="mnist1d", num_samples=args.conv_samples, lr=args.conv_lr,
                                 optimizer=args.optimizer)
    for name in ("steps", "warmup", "repeats", "microbatches", "schedules", "conv_epochs"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    if args.variants is not None:
        cfg.variants = [Variant.parse(v) for v in args.variants]
    cfg.backprop = args.backprop
    cfg.ceiling = args.ceiling
    cfg.max_inflight = args.max_inflight
    cfg.balance = args.balance
    cfg.throughput, cfg.converge = args.throughput, args.converge
    cfg.conv_target = args.conv_target
    cfg.devices = args.devices
    cfg.pin, cfg.timeout, cfg.plots = args.pin, args.timeout, args.plots
    cfg.baseline_every = args.baseline_every
    if cfg.ranks < 2:
        raise SystemExit("synthpipe bench: --ranks must be at least 2")
    return cfg


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark; print the markdown report (or JSON); 0 on success, 1 if a method failed."""
    from .bench import run_benchmark
    from .report import markdown, write_outputs

    cfg = config_from_args(args)
    results = run_benchmark(cfg)
    files = write_outputs(results, cfg.output, plots=cfg.plots)
    if getattr(args, "json", False):
        with open(files["results.json"]) as f:
            sys.stdout.write(f.read() + "\n")
    else:
        sys.stdout.write(markdown(results) + "\n")
        sys.stdout.write(f"Files: {', '.join(sorted(files.values()))}\n")
    failed = [r["method"] for r in results.get("throughput", []) + results.get("convergence", []) if r.get("error")]
    if failed:
        print(f"synthpipe bench: failed methods: {', '.join(failed)} (details in results.json)", file=sys.stderr)
        return 1
    return 0


def add_simulate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``synthpipe simulate``."""
    parser.description = (parser.description or "") + (
        "Predict step time, bubble and speedup of single-device, naive model parallel, GPipe, "
        "1F1B, zero-bubble and synthpipe DNI schedules on N devices from a profile that "
        "`synthpipe bench` saved (profile.json).")
    parser.add_argument("--profile", required=True, help="profile.json written by synthpipe bench")
    parser.add_argument("--devices", type=_ints, default=[2, 4, 8, 16], help="device counts (default: 2,4,8,16)")
    parser.add_argument("--microbatches", type=_ints, default=None,
                        help="micro-batch counts to try for gpipe/1f1b/zb (default: 1..64, powers of 2)")
    parser.add_argument("--validate", action="store_true", help="also compare with the profile's measured runs")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of markdown")
    return parser


def run_simulate(args: argparse.Namespace) -> int:
    """Print the predicted table for ``--devices`` from ``--profile``."""
    from . import simulator
    from .report import simulation_markdown

    try:
        profile = simulator.load_profile(args.profile)
    except (OSError, ValueError) as e:
        print(f"synthpipe simulate: {e}", file=sys.stderr)
        return 2
    if "single" not in profile:
        print(f"synthpipe simulate: {args.profile} has no single-device measurement", file=sys.stderr)
        return 2
    rows = simulator.predict_table(profile, args.devices, args.microbatches)
    val = simulator.validate(profile) if args.validate else []
    if args.json:
        json.dump({"simulation": rows, "validation": val}, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    machine = profile.get("machine", {})
    w = profile.get("workload", {})
    print(f"# synthpipe simulate\n\nProfile: {args.profile} ({w.get('model')}, batch {w.get('batch')}; measured on "
          f"{', '.join(machine.get('device_names') or [])}, {machine.get('ranks')} ranks x "
          f"{machine.get('threads_per_rank')} threads, torch {machine.get('torch')})\n")
    print("Predicted speedup over one device (bubble; best micro-batch count for gpipe/1f1b/zb):\n")
    print(simulation_markdown(rows))
    print("\n| devices | method | m | step ms | bubble | speedup | samples/s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['devices']} | {r['method']} | {r['microbatches']} | {r['step_s'] * 1e3:.1f} | "
              f"{100 * r['bubble']:.0f}% | {r['speedup']:.2f} | {r['samples_per_s']:.0f} |")
    if val:
        print("\n| run | schedule | m | measured ms | predicted ms | error |\n|---|---|---|---|---|---|")
        for v in val:
            print(f"| {v['name']} | {v['schedule']} | {v['microbatches']} | {v['measured_step_s'] * 1e3:.1f} | "
                  f"{v['predicted_step_s'] * 1e3:.1f} | {100 * v['error']:+.1f}% |")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m synthpipe.benchmark bench|simulate ...`` (the same as ``synthpipe bench``)."""
    parser = argparse.ArgumentParser(prog="synthpipe-benchmark")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_arguments(sub.add_parser("bench"))
    add_simulate_arguments(sub.add_parser("simulate"))
    args = parser.parse_args(argv)
    return run_bench(args) if args.command == "bench" else run_simulate(args)

