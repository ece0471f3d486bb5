"""Benchmark harness: speedup, utilisation and time to accuracy; a schedule simulator.

Sits beside ``synthpipe.launch`` and uses the public engine API (the engine never
imports it). ``synthpipe bench`` / ``synthpipe simulate`` and the scripts under
``benchmarks/`` all go through :mod:`synthpipe.benchmark.cli`.

Modules: :mod:`.machine` (machine description, fairness check), :mod:`.monitor`
(CPU/GPU utilisation sampler, peak memory), :mod:`.launcher` (pool of rank processes),
:mod:`.workload` (shared model and data), :mod:`.methods` (single-device backprop and
synthpipe jobs), :mod:`.pipelining` (torch.distributed.pipelining baselines),
:mod:`.simulator` (discrete-event schedule model), :mod:`.config` (what a run is told, and
its checks), :mod:`.bench` (the run),
:mod:`.report` (markdown, CSV, JSON, plots), :mod:`.cli`.
"""
from .cli import add_bench_arguments, add_simulate_arguments, run_bench, run_simulate

__all__ = ["add_bench_arguments", "add_simulate_arguments", "run_bench", "run_simulate"]
