"""``synthpipe bench`` and ``synthpipe simulate``: argument parsers and entry points.

The ``synthpipe`` command wires these in as sub-commands::

    add_bench_arguments(subparsers.add_parser("bench"))       -> run_bench(args)
    add_simulate_arguments(subparsers.add_parser("simulate")) -> run_simulate(args)

The scripts under ``benchmarks/`` call the same functions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .config import QUICK_CONV
from .profiles import MAX_DEVICES, MAX_MICROBATCHES
from .workload import Workload

__all__ = ["BENCH_OPTIONS", "add_bench_arguments", "config_from_args", "run_bench", "add_simulate_arguments",
           "run_simulate", "main"]


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers such as 2,4,8; got {text!r}") from None


def _strs(text: str) -> list[str]:
    return [v for v in text.replace(" ", "").split(",") if v]


def _error(command: str, message: str) -> int:
    """One line on stderr, exit code 2: the input is wrong (as ``synthpipe train`` reports it)."""
    print(f"synthpipe {command}: error: {message}", file=sys.stderr, flush=True)
    return 2


# BenchConfig fields -> the options that set them, for BenchConfig.validate's messages.
BENCH_OPTIONS = {
    "output": "--output", "ranks": "--ranks", "stages": "--stages", "threads": "--threads",
    "device": "--device", "steps": "--steps",
    "warmup": "--warmup", "repeats": "--repeats", "microbatches": "--microbatches", "schedules": "--schedules",
    "variants": "--variants", "max_inflight": "--max-inflight", "balance": "--balance",
    "baseline_every": "--baseline-every", "conv_epochs": "--conv-epochs", "conv_target": "--conv-target",
    "devices": "--devices", "timeout": "--timeout",
    "throughput=False": "--no-throughput", "converge=False": "--no-converge",
    "workload.in_features": "--in-features", "workload.hidden": "--hidden", "workload.depth": "--depth",
    "workload.batch": "--batch", "workload.lr": "--lr",
    "conv_workload.hidden": "--conv-hidden", "conv_workload.depth": "--conv-depth",
    "conv_workload.batch": "--conv-batch", "conv_workload.num_samples": "--conv-samples",
    "conv_workload.lr": "--conv-lr", "conv_margin": "--conv-margin", "conv_evals": "--conv-evals",
    "conv_sources": "--conv-sources",
}


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``synthpipe bench`` (defaults: the full run; ``--quick`` shrinks it)."""
    parser.description = (parser.description or "") + (
        "Benchmark synthpipe (backprop, DNI, cDNI) against single-device backprop and "
        "torch.distributed.pipelining on the same model, data, batch and ranks; write a "
        "markdown table, CSV/JSON and plots, and check the schedule simulator.")
    g = parser.add_argument_group("run")
    g.add_argument("--quick", action="store_true",
                   help="short run (a few minutes on 2 cores): 12 timed steps, 1 round, m in {2,4}, a smaller "
                        "wide_mlp for the time-to-accuracy runs")
    g.add_argument("--output", "-o", default="bench-results", help="directory for CSV/JSON/PNG (default: %(default)s)")
    g.add_argument("--ranks", type=int, default=2, help="processes (= pipeline stages) per method (default: 2)")
    g.add_argument("--stages", type=int, default=None,
                   help="also run synthpipe as ranks/stages pipelines of this many stages (data parallel x "
                        "pipeline parallel) and DDP on all the ranks, at the same global batch")
    g.add_argument("--threads", type=int, default=1,
                   help="torch threads of every rank and of the baseline (default: 1)")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="rank r runs on cuda:r with --device cuda")
    g.add_argument("--repeats", type=int, default=None,
                   help="interleaved rounds; the median is reported (default 3, quick 1)")
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
    c = parser.add_argument_group("time to accuracy (wide BN-MLP on MNIST-1D)")
    c.add_argument("--conv-model", default="wide_mlp", choices=["wide_mlp", "paper_mlp"],
                   help="model (default: wide_mlp)")
    c.add_argument("--conv-epochs", type=int, default=None,
                   help=f"epochs per method (default 5, quick {QUICK_CONV['epochs']})")
    c.add_argument("--conv-target", type=float, default=None,
                   help="target test accuracy (default: single-device backprop's final accuracy minus --conv-margin)")
    c.add_argument("--conv-margin", type=float, default=0.01,
                   help="points below single-device backprop's final accuracy the target lies (default: 0.01)")
    c.add_argument("--conv-sources", type=_strs, default=None,
                   help="gradient sources to run: cdni, dni, cdni:lowrank:R, delayed, delayed:lr, delayed:predict, "
                        "local, local:mlp, interlocking (default: cdni,delayed,delayed:predict,local,interlocking)")
    c.add_argument("--conv-evals", type=int, default=2, help="test evaluations per epoch (default: 2)")
    c.add_argument("--conv-hidden", type=int, default=None,
                   help=f"width (default 1024, quick {QUICK_CONV['hidden']})")
    c.add_argument("--conv-depth", type=int, default=None,
                   help=f"hidden blocks (default 7, quick {QUICK_CONV['depth']})")
    c.add_argument("--conv-batch", type=int, default=256)
    c.add_argument("--conv-samples", type=int, default=None,
                   help=f"MNIST-1D samples, train + test (default 20000, quick {QUICK_CONV['samples']})")
    c.add_argument("--conv-lr", type=float, default=1e-3)
    c.add_argument("--conv-seed", type=int, default=0,
                   help="seed of the model initialisation, the data and its shuffling (default: 0)")
    s = parser.add_argument_group("simulator")
    s.add_argument("--devices", type=_ints, default=[2, 4, 8, 16],
                   help=f"device counts to predict, 1 to {MAX_DEVICES} each (default: 2,4,8,16)")
    return parser


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`BenchConfig` of the parsed options, validated.

    Raises :class:`synthpipe.benchmark.config.BenchConfigError` naming the option and the
    bad value (before anything runs).
    """
    from .config import BenchConfig, BenchConfigError, Source, Variant, quick_config

    cfg = quick_config() if args.quick else BenchConfig()
    cfg.output = args.output
    cfg.ranks, cfg.threads, cfg.device = args.ranks, args.threads, args.device
    cfg.stages = args.stages
    cfg.workload = Workload(model=args.model, in_features=args.in_features, hidden=args.hidden, depth=args.depth,
                            batch=args.batch, lr=args.lr, optimizer=args.optimizer,
                            num_samples=max(args.batch * 16, 4096))
    cw = cfg.conv_workload
    cfg.conv_workload = Workload(model=args.conv_model, in_features=40,
                                 hidden=cw.hidden if args.conv_hidden is None else args.conv_hidden,
                                 depth=cw.depth if args.conv_depth is None else args.conv_depth,
                                 batch=args.conv_batch, data="mnist1d",
                                 num_samples=cw.num_samples if args.conv_samples is None else args.conv_samples,
                                 lr=args.conv_lr, optimizer=args.optimizer, seed=args.conv_seed)
    if args.conv_sources is not None:
        try:
            cfg.conv_sources = [Source.parse(v) for v in args.conv_sources]
        except ValueError as e:
            raise BenchConfigError("conv_sources", f"--conv-sources: {e}") from None
    for name in ("steps", "warmup", "repeats", "microbatches", "schedules", "conv_epochs"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    if args.variants is not None:
        try:
            cfg.variants = [Variant.parse(v) for v in args.variants]
        except ValueError as e:
            raise BenchConfigError("variants", f"--variants: {e}") from None
    cfg.backprop = args.backprop
    cfg.ceiling = args.ceiling
    cfg.max_inflight = args.max_inflight
    cfg.balance = args.balance
    cfg.throughput, cfg.converge = args.throughput, args.converge
    cfg.conv_target, cfg.conv_margin, cfg.conv_evals = args.conv_target, args.conv_margin, args.conv_evals
    cfg.devices = args.devices
    cfg.pin, cfg.timeout, cfg.plots = args.pin, args.timeout, args.plots
    cfg.baseline_every = args.baseline_every
    return cfg.validate(BENCH_OPTIONS)


def _completed(results: dict[str, Any]) -> list[str]:
    return [r["method"] for r in results.get("throughput", []) + results.get("convergence", []) if not r.get("error")]


def _failed(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results.get("throughput", []) + results.get("convergence", []) if r.get("error")]


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark; print the markdown report (or JSON).

    Exit codes: 0 success; 1 a method failed (the results are written, failed rows
    marked) or none completed (nothing is written, so ``--output`` keeps any earlier
    results); 2 bad options (one line on stderr, nothing run); 130 interrupted (nothing
    written).
    """
    from .bench import run_benchmark
    from .config import BenchConfigError
    from .report import markdown, to_json, write_outputs

    try:
        cfg = config_from_args(args)
    except BenchConfigError as e:
        return _error("bench", str(e))
    earlier = os.path.exists(os.path.join(cfg.output, "results.json"))
    kept = f"wrote nothing, so {cfg.output} keeps its earlier results" if earlier else f"wrote nothing to {cfg.output}"
    try:
        results = run_benchmark(cfg)
    except KeyboardInterrupt:
        print(f"synthpipe bench: interrupted; {kept}", file=sys.stderr, flush=True)
        return 130
    if not _completed(results):
        # Every method failed: there is nothing to compare, and writing would replace a
        # good earlier run's files with a table of failures. Show the failures instead.
        sys.stdout.write((to_json(results) if getattr(args, "json", False) else markdown(results)) + "\n")
        failed = _failed(results)
        by_error: dict[str, list[str]] = {}
        for r in failed:
            by_error.setdefault(r["error"], []).append(r["method"])
        shown = "; ".join(f"{', '.join(methods)}: {error}" for error, methods in by_error.items())
        print(f"synthpipe bench: error: no method completed ({shown}); {kept}", file=sys.stderr)
        detail = (failed[0].get("error_detail") or "").strip() if failed else ""
        if detail and detail != failed[0]["error"]:  # the traceback, when there is more than its last line
            print(f"first failure ({failed[0]['method']}):\n{detail}", file=sys.stderr)
        return 1
    files = write_outputs(results, cfg.output, plots=cfg.plots)
    if getattr(args, "json", False):
        with open(files["results.json"]) as f:
            sys.stdout.write(f.read() + "\n")
    else:
        sys.stdout.write(markdown(results) + "\n")
        sys.stdout.write(f"Files: {', '.join(sorted(files.values()))}\n")
    failed_methods = [r["method"] for r in _failed(results)]
    if failed_methods:
        print(f"synthpipe bench: failed methods: {', '.join(failed_methods)} (details in results.json)",
              file=sys.stderr)
        return 1
    return 0


def add_simulate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``synthpipe simulate``."""
    parser.description = (parser.description or "") + (
        "Predict step time, bubble and speedup of single-device, naive model parallel, GPipe, "
        "1F1B, zero-bubble and synthpipe DNI schedules on N devices from a profile that "
        "`synthpipe bench` saved (profile.json).")
    parser.add_argument("--profile", required=True, help="profile.json written by synthpipe bench")
    parser.add_argument("--devices", type=_ints, default=[2, 4, 8, 16],
                        help=f"device counts, 1 to {MAX_DEVICES} each (default: 2,4,8,16)")
    parser.add_argument("--microbatches", type=_ints, default=None,
                        help="micro-batch counts to try for gpipe/1f1b/zb; each must divide the profile's batch "
                             f"and be at most {MAX_MICROBATCHES} (default: 1..64, powers of 2)")
    parser.add_argument("--validate", action="store_true", help="also compare with the profile's measured runs")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of markdown")
    parser.add_argument("--unlock", action="store_true",
                        help="also predict what forward unlocking (dni-inputs) buys: fill time and the slowdown "
                             "from a straggling rank, against backprop, 1f1b and dni")
    dp = parser.add_argument_group("data parallel x pipeline parallel")
    dp.add_argument("--layouts", action="store_true",
                    help="also predict every dp x pp layout of each device count (same global batch), with "
                         "the gradient averaging costed by a ring all-reduce")
    dp.add_argument("--bandwidth", type=float, default=10.0,
                    help="ring all-reduce link bandwidth in GB/s (default: %(default)s)")
    dp.add_argument("--latency-us", type=float, default=20.0,
                    help="ring all-reduce latency per step in microseconds (default: %(default)s)")
    dp.add_argument("--param-bytes", type=float, default=None,
                    help="gradient bytes of the whole model (default: the profile's param_bytes, else counted "
                         "from its workload's model)")
    return parser


def _param_bytes(profile: dict[str, Any]) -> float:
    """The model's gradient bytes: the profile's ``param_bytes``, or counted from its workload."""
    if profile.get("param_bytes"):
        return float(profile["param_bytes"])
    from .workload import Workload, build_model

    fields = set(Workload.__dataclass_fields__)
    model = build_model(Workload(**{k: v for k, v in profile.get("workload", {}).items() if k in fields}))
    return float(sum(p.numel() * p.element_size() for p in model.parameters()))


def run_simulate(args: argparse.Namespace) -> int:
    """Print the predicted table for ``--devices`` from ``--profile``.

    Exit codes: 0 success; 2 bad options or an unusable profile (one line on stderr
    naming the option, or the file and the key).
    """
    from . import profiles, simulator
    from .report import simulation_markdown

    try:
        devices = profiles.check_devices(args.devices, "--devices")
        profile = profiles.load_profile(args.profile)
        batch = int(profile.get("workload", {}).get("batch", 256))
        microbatches = (None if args.microbatches is None
                        else profiles.check_microbatches(args.microbatches, batch, "--microbatches"))
    except profiles.ProfileError as e:
        return _error("simulate", f"--profile {e}")
    except ValueError as e:
        return _error("simulate", str(e))
    if args.bandwidth <= 0 or args.latency_us < 0:
        return _error("simulate", f"--bandwidth must be > 0 and --latency-us >= 0; got {args.bandwidth} and "
                                  f"{args.latency_us}")
    rows = simulator.predict_table(profile, devices, microbatches)
    val = simulator.validate(profile) if args.validate else []
    layout_rows: list[dict[str, Any]] = []
    ring = simulator.RingAllReduce(args.bandwidth * 1e9, args.latency_us * 1e-6)
    if args.layouts:
        param_bytes = args.param_bytes if args.param_bytes is not None else _param_bytes(profile)
        layout_rows = simulator.predict_layouts(profile, devices, ring, param_bytes)
    unlock_rows = simulator.unlock_table(profile, devices) if args.unlock else []
    if args.json:
        out: dict[str, Any] = {"simulation": rows, "validation": val}
        if args.unlock:
            out["unlock"] = unlock_rows
        if args.layouts:
            out.update(layouts=layout_rows, allreduce={"model": ring.describe(), "param_bytes": param_bytes})
        json.dump(out, sys.stdout, indent=1)
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
    if layout_rows:
        print(f"\nData parallel x pipeline parallel at the same global batch ({param_bytes / 2**20:.1f} MiB of "
              f"gradients; {ring.describe()}):\n")
        print("| devices | layout | method | step ms | all-reduce ms per stage | samples/s | speedup |\n"
              "|---|---|---|---|---|---|---|")
        for r in layout_rows:
            print(f"| {r['devices']} | {r['layout']} | {r['method']} | {r['step_s'] * 1e3:.1f} | "
                  f"{r['allreduce_s'] * 1e3:.2f} | {r['samples_per_s']:.0f} | {r['speedup']:.2f} |")
    if unlock_rows:
        print("\nForward unlocking: steady step time, when every rank has made its first and 8th update, and "
              "the step time with rank 1 slower (persistent: every step; intermittent: every 8th; rotating: "
              "every rank every 8th, each in its own steps) over the step time without:\n")
        print(simulator.unlock_markdown(unlock_rows))
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

