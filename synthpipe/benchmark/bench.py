"""The benchmark run: plan the jobs, run them on a rank pool, turn results into rows.

:func:`run_benchmark` does everything ``synthpipe bench`` does except printing and
writing files (:mod:`synthpipe.benchmark.report`):

1. describe the machine, warn when ``ranks x threads`` exceeds the cores;
2. measure the one-way transfer time of boundary-sized messages (ping-pong);
3. *throughput* on the speed workload (a deep MLP, synthetic data): single-device
   backprop, every torch.distributed.pipelining schedule at every micro-batch count of
   the sweep, synthpipe ``backprop`` mode, and each synthetic-gradient variant (DNI,
   cDNI, ...) with, for each, its ceiling (the same stages run alone on every rank at
   once, with no transfers), in ``repeats`` interleaved rounds (the median round is reported). The
   baseline runs again after every ``baseline_every`` jobs of a round, and each job's
   speedup is against the baseline runs just before and after it: on a shared host the
   machine's speed drifts within a round, and a ratio taken minutes apart measures the
   drift as much as the method;
4. the simulator's *profile* from those measurements, its check against every measured
   2-rank run, and its prediction for 2..16 devices;
5. *time to accuracy* on MNIST-1D with the wide BN-MLP (``wide_mlp``): single-device
   backprop, torch's gpipe and 1f1b (at their best micro-batch count), synthpipe
   backprop and every gradient source of ``conv_sources`` (cDNI, delayed, delayed with
   weight prediction, local, interlocking) trained for the same number of epochs, the
   test accuracy ``conv_evals`` times per epoch against training wall-clock and steps;
   the target is single-device backprop's final accuracy minus ``conv_margin`` (1 point)
   unless ``conv_target`` is given, and each row's time to it is also given as a ratio
   to single-device backprop's and to the best torch schedule's, measured in the same run.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import statistics
import sys
import time
from typing import Any, Callable

from . import simulator
from .config import BenchConfig
from .job import JobSpec
from .launcher import JobError, RankPool
from .machine import check_fairness, describe
from .methods import job_function
from .monitor import Monitor
from .pipelining import MULTI_STAGE, valid_microbatches
from .pipelining import SCHEDULES as PP_SCHEDULES
from .profiles import PROFILE_VERSION
from .report import rank_key

__all__ = ["RESULTS_VERSION", "SECTION_KINDS", "unusable_schedules", "throughput_jobs", "converge_jobs",
           "with_baseline_runs", "bracketed_speedups", "throughput_row", "error_row", "baseline_drift_warning",
           "best_of_sweep", "build_profile", "converge_row", "set_target", "run_benchmark"]

RESULTS_VERSION = 1
SECTION_KINDS = ("forward", "backward", "update", "synth", "send", "recv", "wait")


def unusable_schedules(cfg: BenchConfig) -> list[str]:
    """One message per torch schedule that none of ``cfg.microbatches`` can run (it gets no row)."""
    return [f"torch schedule {sched} is skipped: it takes none of the micro-batch counts "
            f"{', '.join(map(str, cfg.microbatches))} on {cfg.ranks} ranks with batch {cfg.workload.batch}"
            + (f" (it needs at least {2 * cfg.ranks})" if sched == "zbv" else "")
            for sched in cfg.schedules
            if not any(valid_microbatches(sched, cfg.ranks, m) and cfg.workload.batch % m == 0
                       for m in cfg.microbatches)]


def throughput_jobs(cfg: BenchConfig) -> list[JobSpec]:
    """Single, torch schedules x micro-batch sweep, synthpipe backprop, synthetic variants
    (each followed by its no-transfer ceiling, ``<variant>-alone``, when ``cfg.ceiling``)."""
    w = cfg.workload
    common: dict[str, Any] = dict(workload=w, steps=cfg.steps, warmup=cfg.warmup, device=cfg.device,
                                  timeline=cfg.timeline)
    sweep = sorted({m for m in (1, 2, 4, 8, 16, 32, 64) if m <= w.batch} | set(cfg.microbatches))
    jobs = [JobSpec("single", "single", ranks=1, chunk_sweep=sweep, **common)]
    for sched in cfg.schedules:
        if sched not in PP_SCHEDULES:
            raise ValueError(f"unknown torch schedule {sched!r}; choose from {PP_SCHEDULES}")
        for m in cfg.microbatches:
            if not valid_microbatches(sched, cfg.ranks, m) or w.batch % m:
                continue
            jobs.append(JobSpec(f"{sched}-m{m}", "pipelining", ranks=cfg.ranks, schedule=sched, microbatches=m,
                                stages_per_rank=2 if sched in MULTI_STAGE else 1, **common))
    if cfg.backprop:
        jobs.append(JobSpec("backprop", "synthpipe", ranks=cfg.ranks, gradients="backprop",
                            balance=cfg.balance, **common))
    for v in cfg.variants:
        jobs.append(JobSpec(v.name, "synthpipe", ranks=cfg.ranks, gradients="synthetic", synth=v.synth,
                            synth_rank=v.rank, conditional=v.mode == "cdni", max_inflight=cfg.max_inflight,
                            balance=cfg.balance, **common))
        if cfg.ceiling:
            jobs.append(dataclasses.replace(jobs[-1], name=f"{v.name}-alone", method="alone"))
    return jobs + data_parallel_jobs(cfg, jobs, common)


def data_parallel_jobs(cfg: BenchConfig, jobs: list[JobSpec], common: dict[str, Any]) -> list[JobSpec]:
    """With ``cfg.stages`` < ``cfg.ranks``: every synthpipe job again as ``dp`` pipelines of
    ``stages`` stages (``<name>-dp<dp>xpp<stages>``), and DDP on all the ranks, at the same
    global batch."""
    if not cfg.stages or cfg.stages >= cfg.ranks:
        return []
    dp = cfg.ranks // cfg.stages
    extra = [dataclasses.replace(j, name=f"{j.name}-dp{dp}xpp{cfg.stages}", stages=cfg.stages, balance=None)
             for j in jobs if j.method == "synthpipe"]
    return extra + [JobSpec("ddp", "ddp", ranks=cfg.ranks, **common)]


def converge_jobs(cfg: BenchConfig, best_m: dict[str, int]) -> list[JobSpec]:
    """The convergence runs: the torch schedules at their best micro-batch count."""
    w = cfg.conv_workload
    common: dict[str, Any] = dict(workload=w, mode="converge", epochs=cfg.conv_epochs, device=cfg.device,
                                  timeline=False, evals_per_epoch=cfg.conv_evals)
    jobs = [JobSpec("single", "single", ranks=1, **common)]
    for sched in ("gpipe", "1f1b"):
        if sched in cfg.schedules:
            m = best_m.get(sched, 4)
            while m > 1 and (w.batch % m or w.batch // m < 2):  # BatchNorm: >= 2 rows per micro-batch
                m //= 2
            jobs.append(JobSpec(f"{sched}-m{m}", "pipelining", ranks=cfg.ranks, schedule=sched, microbatches=m,
                                **common))
    if cfg.backprop:
        jobs.append(JobSpec("backprop", "synthpipe", ranks=cfg.ranks, gradients="backprop", **common))
    for src in cfg.conv_sources:
        v = src.variant
        if v is not None:
            jobs.append(JobSpec(src.name, "synthpipe", ranks=cfg.ranks, gradients="synthetic", synth=v.synth,
                                synth_rank=v.rank, conditional=v.mode == "cdni", max_inflight=cfg.max_inflight,
                                **common))
        elif src.gradients == "corrected":  # (the conditional linear synthesizer, cDNI's default)
            jobs.append(JobSpec(src.name, "synthpipe", ranks=cfg.ranks, gradients="corrected", synth="linear",
                                conditional=True, staleness=src.staleness, max_inflight=cfg.max_inflight, **common))
        else:
            jobs.append(JobSpec(src.name, "synthpipe", ranks=cfg.ranks, gradients=src.gradients,
                                staleness=src.staleness, aux_head=src.aux_head, max_inflight=cfg.max_inflight,
                                **common))
    if cfg.stages and cfg.stages < cfg.ranks:
        dp = cfg.ranks // cfg.stages
        jobs += [dataclasses.replace(j, name=f"{j.name}-dp{dp}xpp{cfg.stages}", stages=cfg.stages)
                 for j in jobs if j.method == "synthpipe"]
    return jobs


def with_baseline_runs(jobs: list[JobSpec], every: int) -> list[JobSpec]:
    """One round's run order: the baseline (``jobs[0]``) first, again after every ``every``
    other jobs and after the last one (``every <= 0``: only first)."""
    base, others = jobs[0], jobs[1:]
    if every <= 0 or not others:
        return list(jobs)
    order = [base]
    for i, job in enumerate(others, 1):
        order.append(job)
        if i % every == 0 or i == len(others):
            order.append(base)
    return order


def bracketed_speedups(sequence: list[tuple[str, float | None]], baseline: str = "single") -> list[float | None]:
    """Per entry of one round's ``(name, samples_per_s)`` run order: its samples/s over the
    mean of the nearest successful baseline runs before and after it (one side when only
    one exists); ``None`` for the baseline itself and for failed entries."""
    out: list[float | None] = []
    for i, (name, value) in enumerate(sequence):
        if name == baseline or not value:
            out.append(None)
            continue
        before = next((v for n, v in reversed(sequence[:i]) if n == baseline and v), None)
        after = next((v for n, v in sequence[i + 1:] if n == baseline and v), None)
        refs = [v for v in (before, after) if v]
        out.append(value / statistics.fmean(refs) if refs else None)
    return out


# -- rows --------------------------------------------------------------------------------
def _schedule_of(spec: JobSpec) -> str:
    if spec.method == "single":
        return "single"
    if spec.method == "pipelining":
        return spec.schedule
    if spec.method == "alone":
        return "alone"
    if spec.method == "ddp":
        return "ddp"
    return {"backprop": "backprop", "synthetic": "dni"}.get(spec.gradients, spec.gradients)


def throughput_row(spec: JobSpec, results: list[dict[str, Any]], usage: dict[str, Any],
                   oversubscribed: bool) -> dict[str, Any]:
    """One measured job as a flat, documented row (see report.py for the keys)."""
    wall = max(r["wall"] for r in results)
    steps = results[0]["steps"]
    samples = results[0]["samples"]
    ranks = []
    for r in results:
        t = r.get("timers", {})
        secs = t.get("seconds", {})
        per_step = {f"{k}_s": secs.get(k, 0.0) / max(steps, 1) for k in SECTION_KINDS}
        measured = sum(secs.get(k, 0.0) for k in SECTION_KINDS)
        per_step["other_s"] = max(0.0, r["wall"] - measured) / max(steps, 1)
        ranks.append({
            "rank": r["rank"], **per_step,
            "busy_fraction": t.get("busy_fraction"), "comm_fraction": t.get("comm_fraction"),
            "wait_fraction": t.get("wait_fraction"), "other_fraction": t.get("other_fraction"),
            "peak_rss_mb": r["memory"]["rss_mb"], "peak_cuda_mb": r["memory"]["cuda_mb"],
            "threads": r["threads"], "device": r["device"],
        })
    cpu = usage.get("cpu_percent") or []
    for i, rr in enumerate(ranks):
        rr["cpu_util_percent"] = cpu[i] if i < len(cpu) else None
        sampled = usage.get("rss_peak_mb") or []
        rr["rss_sampled_peak_mb"] = sampled[i] if i < len(sampled) else None
    return {
        "method": spec.name, "label": spec.label(), "family": spec.family, "schedule": _schedule_of(spec),
        "microbatches": spec.microbatches if spec.method == "pipelining" else 1,
        "stages_per_rank": spec.stages_per_rank if spec.method == "pipelining" else 1,
        "ranks": spec.ranks, "dp": spec.dp, "threads": results[0]["threads"], "device": spec.device,
        "batch": spec.workload.batch, "steps": steps, "wall_s": wall, "step_s": wall / max(steps, 1),
        "samples_per_s": samples / wall if wall > 0 else math.nan,
        "speedup": None, "oversubscribed": oversubscribed,
        "system_cpu_percent": usage.get("system_cpu_percent"), "other_cpu_cores": usage.get("other_cpu_cores"),
        "steal_percent": usage.get("steal_percent"),
        "gpu_util_percent": usage.get("gpu_util_percent") or [],
        "gpu_mem_peak_mb": usage.get("gpu_mem_peak_mb") or [],
        "chunks": results[0].get("chunks"),
        "param_checksum": [sum(r["param_checksum"][i] for r in results) for i in range(2)]
        if all(r.get("param_checksum") for r in results) else None,
        "per_rank": ranks, "losses": next((r["losses"] for r in reversed(results) if r.get("losses")), []),
        "max_inflight": spec.max_inflight if spec.method == "synthpipe" else None,
        "synthesizer": (spec.synth + (f"-r{spec.synth_rank}" if spec.synth == "lowrank" else "")
                        if spec.method == "synthpipe" and spec.gradients == "synthetic" else None),
        "conditional": spec.conditional if spec.method == "synthpipe" and spec.gradients == "synthetic" else None,
        "error": None,
    }


def error_row(spec: JobSpec, message: str) -> dict[str, Any]:
    return {"method": spec.name, "label": spec.label(), "family": spec.family, "schedule": _schedule_of(spec),
            "microbatches": spec.microbatches if spec.method == "pipelining" else 1, "ranks": spec.ranks,
            "samples_per_s": None, "speedup": None, "per_rank": [], "error": message.strip().splitlines()[-1][:300],
            "error_detail": message[-4000:]}


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r.get("error") is None]
    if not ok:
        return runs[-1]
    ok.sort(key=lambda r: r["samples_per_s"])
    chosen = dict(ok[(len(ok) - 1) // 2])
    chosen["repeats"] = len(ok)
    chosen["samples_per_s_runs"] = [r["samples_per_s"] for r in runs if r.get("error") is None]
    chosen["samples_per_s_by_round"] = [r.get("samples_per_s") if r.get("error") is None else None for r in runs]
    if len(ok) > 1:
        vals = chosen["samples_per_s_runs"]
        chosen["samples_per_s_spread"] = (max(vals) - min(vals)) / statistics.median(vals)
    return chosen


def baseline_drift_warning(rows: list[dict[str, Any]], limit: float = 0.10) -> str | None:
    """A warning when the baseline's own speed moved by more than ``limit`` within the run.

    The baseline runs the same job every time, so its spread measures the machine, not a
    method: on a shared host other tenants can slow a core without any hypervisor steal.
    """
    base = next((r for r in rows if r.get("family") == "baseline" and r.get("error") is None), None)
    spread = base.get("samples_per_s_spread") if base else None
    if base is None or spread is None or spread <= limit:
        return None
    return (f"the single-device baseline's own speed varied by {100 * spread:.0f}% during this run "
            f"({len(base['samples_per_s_runs'])} runs): the machine's speed drifted (other tenants of a shared "
            f"host?). Speedups are taken against the baseline runs next to each method, but expect noise "
            f"of that order; rerun when the machine is quiet for firmer numbers")


def best_of_sweep(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The fastest row of each torch schedule: by its speedup (the median over rounds of its
    ratio to the baseline runs around it, which a drifting machine does not bias), else by
    samples/s. The same figure the table shows, so the marked row is the one that reads best."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["family"] != "torch.distributed.pipelining" or r.get("error") or not r.get("samples_per_s"):
            continue
        s = r["schedule"]
        if s not in best or rank_key(r) > rank_key(best[s]):
            best[s] = r
    return best


# -- profile for the simulator -------------------------------------------------------------
def build_profile(cfg: BenchConfig, machine: dict[str, Any], rows: list[dict[str, Any]],
                  transfers: list[dict[str, Any]]) -> dict[str, Any]:
    """The simulator's input (``profile.json``): measured per-stage times and transfers.

    Keys: ``version``, ``machine``, ``workload``, ``single`` (``step_s``, ``forward_s``,
    ``backward_s``, ``update_s``, ``other_s`` of the whole model), ``boundary_bytes``
    (one activation message at the full batch), ``transfer`` (ping-pong ``bytes`` /
    ``one_way_s``), ``synth_s`` (per variant: synthesizer seconds per step per boundary),
    ``message_s`` (CPU seconds per synthpipe message), ``pp_message_s`` (CPU seconds per
    posted torch P2P operation), ``op_overhead_s`` (torch schedule glue per micro-batch
    operation), ``microbatch`` (whole-model ``forward_s`` / ``backward_s`` of one
    micro-batch of ``batch / m`` rows, per ``m``, timed in the single-device process),
    ``step_overhead_s`` (synthpipe's per-rank glue per step),
    ``weight_fraction`` (weight-gradient share of backward, zero bubble), ``max_inflight``,
    and ``runs`` (each measured run: ``name``, ``schedule``, ``ranks``, ``microbatches``,
    ``max_inflight``, ``measured_step_s``, ``stages`` with per-rank ``forward_s``,
    ``backward_s``, ``update_s``, ``synth_s``, ``comm_s``, ``other_s``).
    """
    w = cfg.workload
    # (data-parallel rows are not pipelines of ranks-many stages: the schedule model does not take them)
    ok = [r for r in rows if r.get("error") is None and r.get("per_rank") and r.get("dp", 1) == 1
          and r["family"] != "data parallel"]
    single = next((r for r in ok if r["schedule"] == "single"), None)
    profile: dict[str, Any] = {
        "version": PROFILE_VERSION, "machine": machine, "workload": dataclasses.asdict(w),
        "boundary_bytes": w.batch * w.hidden * 4, "transfer": transfers, "max_inflight": cfg.max_inflight,
        "weight_fraction": 0.5, "synth_s": {}, "runs": [],
    }
    if single is not None:
        s = single["per_rank"][0]
        profile["single"] = {"step_s": single["step_s"], "forward_s": s["forward_s"], "backward_s": s["backward_s"],
                             "update_s": s["update_s"], "other_s": s["other_s"]}
    synth_rows = [r for r in ok if r["schedule"] == "dni"]
    for r in synth_rows:
        vals = [p["synth_s"] for p in r["per_rank"][:-1]]
        profile["synth_s"][r["method"]] = sum(vals) / len(vals) if vals else 0.0
    if synth_rows:
        # per message: the send (and polled receive) CPU time of all ranks / messages per step
        profile["message_s"] = statistics.median(
            sum(x["send_s"] + x["recv_s"] for x in r["per_rank"]) / max(2 * (len(r["per_rank"]) - 1), 1)
            for r in synth_rows)
        profile["step_overhead_s"] = statistics.median(x["other_s"] for r in synth_rows for x in r["per_rank"])
    pp_rows = [r for r in ok if r["family"] == "torch.distributed.pipelining" and r["schedule"] in ("gpipe", "1f1b")]
    if pp_rows:
        # CPU time of posting one P2P operation, and the schedule's Python glue per micro-batch operation
        profile["pp_message_s"] = statistics.median(x["send_s"] / (2 * r["microbatches"])
                                                     for r in pp_rows for x in r["per_rank"])
        profile["op_overhead_s"] = statistics.median(x["other_s"] / (2 * r["microbatches"])
                                                      for r in pp_rows for x in r["per_rank"])
    if single is not None and single.get("chunks"):
        profile["microbatch"] = single["chunks"]
    for r in ok:
        if (r["ranks"] < 2 and r["schedule"] != "single") or r["family"] == "ceiling":
            continue
        profile["runs"].append({
            "name": r["method"], "schedule": r["schedule"], "ranks": r["ranks"], "microbatches": r["microbatches"],
            "max_inflight": r.get("max_inflight"), "measured_step_s": r["step_s"],
            "stages": [{"forward_s": x["forward_s"], "backward_s": x["backward_s"], "update_s": x["update_s"],
                        "synth_s": x["synth_s"], "comm_s": x["send_s"] + x["recv_s"], "other_s": x["other_s"]}
                       for x in r["per_rank"]],
        })
    return profile


# -- convergence ----------------------------------------------------------------------------
def converge_row(spec: JobSpec, results: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """One time-to-accuracy row; :func:`set_target` fills the target columns again once the
    target is known (the default target comes from single-device backprop's own row)."""
    curve = results[0]["curve"]
    hit = next((p for p in curve if p["accuracy"] >= target), None)
    total = results[0]["wall"]
    return {
        "method": spec.name, "label": spec.label(), "family": spec.family, "schedule": _schedule_of(spec),
        "microbatches": spec.microbatches if spec.method == "pipelining" else 1, "ranks": spec.ranks,
        "epochs": spec.epochs, "steps": results[0]["steps"], "train_time_s": total,
        "samples_per_s": results[0]["samples"] / total if total > 0 else None,
        "final_accuracy": curve[-1]["accuracy"], "best_accuracy": max(p["accuracy"] for p in curve),
        "final_loss": curve[-1]["loss"], "target_accuracy": target,
        "time_to_target_s": hit["time"] if hit else None, "epochs_to_target": hit["epoch"] if hit else None,
        "steps_to_target": hit["steps"] if hit else None, "speedup_vs_single": None, "speedup_vs_torch": None,
        "curve": curve, "peak_rss_mb": [r["memory"]["rss_mb"] for r in results], "error": None,
    }


def set_target(rows: list[dict[str, Any]], target: float | None, margin: float) -> float | None:
    """Fill every row's time / epochs / steps to the target and its time-to-target ratios.

    ``target`` ``None``: single-device backprop's final accuracy minus ``margin`` (``None``
    comes back when that row failed). ``speedup_vs_single`` is single's time to target over
    the row's; ``speedup_vs_torch`` the best (shortest) torch.distributed.pipelining time to
    target over the row's; ``None`` where either never reached it.
    """
    ok = [r for r in rows if not r.get("error")]
    single = next((r for r in ok if r["schedule"] == "single"), None)
    if target is None:
        if single is None:
            return None
        target = single["final_accuracy"] - margin
    for r in ok:
        # (a hair below: the target is often an accuracy itself, final minus 0.01, and float rounding
        # must not decide whether a run that ends exactly on it reached it)
        hit = next((p for p in r["curve"] if p["accuracy"] >= target - 1e-9), None)
        r["target_accuracy"] = target
        r["time_to_target_s"] = hit["time"] if hit else None
        r["epochs_to_target"] = hit["epoch"] if hit else None
        r["steps_to_target"] = hit["steps"] if hit else None
    torch_times = [r["time_to_target_s"] for r in ok
                   if r["family"] == "torch.distributed.pipelining" and r["time_to_target_s"]]
    best_torch = min(torch_times) if torch_times else None
    base = single["time_to_target_s"] if single else None
    for r in ok:
        t = r["time_to_target_s"]
        r["speedup_vs_single"] = base / t if base and t else None
        r["speedup_vs_torch"] = best_torch / t if best_torch and t else None
    return target


# -- the run ---------------------------------------------------------------------------------
def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(msg, file=sys.stderr, flush=True)


def run_benchmark(cfg: BenchConfig, verbose: bool = True,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run everything ``cfg`` asks for; returns the results dict (see report.py).

    The steps: the machine and its warnings, the transfer time of boundary-sized messages,
    the throughput rounds, the simulator's profile and prediction, the convergence runs.

    Raises :class:`~.config.BenchConfigError` (from :meth:`BenchConfig.validate`) before starting
    any process when ``cfg`` cannot run.
    """
    log = progress or (lambda m: _log(m, verbose))
    # Bad values fail here, before any process starts. The output directory is the
    # caller's business: this function writes nothing (see report.write_outputs).
    cfg.validate(check_output=False)
    started = time.time()
    results = _new_results(cfg, log)
    runner = _JobRunner(cfg, log)
    try:
        _measure_transfer(cfg, runner, results)
        best_m: dict[str, int] = {}
        if cfg.throughput:
            best_m = _measure_throughput(cfg, runner, results, log)
            _simulate(cfg, results)
        if cfg.converge:
            _measure_convergence(cfg, runner, results, best_m, log)
    finally:
        runner.close()
    results["elapsed_s"] = time.time() - started
    return results


def _new_results(cfg: BenchConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """The results dict before any job ran: the machine, the config and the warnings so far."""
    machine = describe(cfg.ranks, cfg.threads, cfg.device)
    warnings_out: list[str] = []
    message = check_fairness(cfg.ranks, cfg.threads, cfg.device)
    if message:
        warnings_out.append(message)
        log(f"warning: {message}")
    if cfg.throughput:
        for message in unusable_schedules(cfg):
            warnings_out.append(message)
            log(f"warning: {message}")
    return {
        "version": RESULTS_VERSION, "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "machine": machine, "config": cfg.as_dict(), "warnings": warnings_out,
        "throughput": [], "sweep": {}, "transfer": [], "profile": None, "validation": [], "simulation": [],
        "convergence": [], "conv_target": None, "timelines": {},
    }


class _JobRunner:
    """The rank processes and their CPU monitor, shared by every job of a run."""

    def __init__(self, cfg: BenchConfig, log: Callable[[str], None]) -> None:
        self.timeout = cfg.timeout
        self.log = log
        self.pool = RankPool(max(cfg.ranks, 2), cfg.threads, pin=cfg.pin)
        self.monitor = Monitor(self.pool.pids).start()

    def run(self, spec: JobSpec) -> tuple[list[dict[str, Any]] | None, dict[str, Any], str | None]:
        """``(per-rank results, CPU usage of the timed window, None)``, or ``(None, {}, error)``."""
        t0 = time.time()
        try:
            res = self.pool.run(job_function(spec), spec, spec.ranks, timeout=self.timeout)
        except JobError as e:
            self.monitor.set_pids(self.pool.pids)
            return None, {}, str(e)
        usage = self.monitor.window(min(r["t_start"] for r in res), max(r["t_end"] for r in res),
                                    self.pool.pids[:spec.ranks])
        self.log(f"  {spec.name:<22} {time.time() - t0:6.1f} s")
        return res, usage, None

    def close(self) -> None:
        self.monitor.stop()
        self.pool.close()


def _measure_transfer(cfg: BenchConfig, runner: _JobRunner, results: dict[str, Any]) -> None:
    """Step 1: the one-way transfer time of boundary-sized messages (for the simulator)."""
    w = cfg.workload
    bb = w.batch * w.hidden * 4
    ping = JobSpec("pingpong", "pingpong", w, ranks=2, device=cfg.device,
                   sizes=sorted({1024, bb // 8, bb // 4, bb // 2, bb}))
    res, _, err = runner.run(ping)
    if res is not None:
        results["transfer"] = res[0]["transfers"]
    elif err:
        results["warnings"].append(f"transfer measurement failed: {err.splitlines()[-1]}")


def _measure_throughput(cfg: BenchConfig, runner: _JobRunner, results: dict[str, Any],
                        log: Callable[[str], None]) -> dict[str, int]:
    """Step 2: ``cfg.repeats`` rounds of every throughput job; fills ``throughput``, ``timelines``
    and ``sweep``. Returns the best micro-batch count of each torch schedule."""
    jobs = throughput_jobs(cfg)
    runs: dict[str, list[dict[str, Any]]] = {j.name: [] for j in jobs}
    for rep in range(cfg.repeats):
        log(f"throughput, round {rep + 1}/{cfg.repeats}: {cfg.workload.describe()}")
        _throughput_round(cfg, runner, results["machine"], jobs, runs, log)
    rows, timelines = _median_rows(jobs, runs)
    drift = baseline_drift_warning(rows)
    if drift:
        results["warnings"].append(drift)
        log(f"warning: {drift}")
    best = best_of_sweep(rows)
    best_m = {s: r["microbatches"] for s, r in best.items()}
    for r in rows:
        r["best_in_sweep"] = r["family"] == "torch.distributed.pipelining" and best.get(r["schedule"]) is r
    results["throughput"] = rows
    results["timelines"] = timelines
    results["sweep"] = {"microbatches": cfg.microbatches, "schedules": cfg.schedules,
                        "best_microbatches": best_m,
                        "best_samples_per_s": {s: r["samples_per_s"] for s, r in best.items()}}
    return best_m


def _throughput_round(cfg: BenchConfig, runner: _JobRunner, machine: dict[str, Any], jobs: list[JobSpec],
                      runs: dict[str, list[dict[str, Any]]], log: Callable[[str], None]) -> None:
    """One round: every job once (with baseline runs between), each row's speedup over the
    baseline runs around it."""
    over = bool(machine["oversubscribed"])
    order: list[tuple[str, dict[str, Any]]] = []
    for spec in with_baseline_runs(jobs, cfg.baseline_every):
        res, usage, err = runner.run(spec)
        if res is None:
            log(f"  {spec.name}: FAILED: {err.strip().splitlines()[-1] if err else ''}")
            runs[spec.name].append(error_row(spec, err or "failed"))
            order.append((spec.name, runs[spec.name][-1]))
            continue
        row = throughput_row(spec, res, usage, over and spec.device == "cpu" and spec.ranks > 1)
        if spec.device == "cpu" and spec.ranks * cfg.threads > machine["usable_cores"]:
            row["oversubscribed"] = True
        row["_timeline"] = [{"rank": r["rank"], "origin": r.get("timeline_origin"),
                             "segments": r.get("timeline", [])} for r in res]
        runs[spec.name].append(row)
        order.append((spec.name, row))
    ratios = bracketed_speedups([(name, row.get("samples_per_s")) for name, row in order], jobs[0].name)
    for (name, row), ratio in zip(order, ratios, strict=True):
        row["speedup_bracketed"] = 1.0 if name == jobs[0].name else ratio


def _median_rows(jobs: list[JobSpec], runs: dict[str, list[dict[str, Any]]]
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each job's median round (and its timeline), with the median of its per-round speedups."""
    rows: list[dict[str, Any]] = []
    timelines: dict[str, Any] = {}
    for spec in jobs:
        chosen = _median_run(runs[spec.name])
        timelines[spec.name] = chosen.pop("_timeline", None)
        for r in runs[spec.name]:
            r.pop("_timeline", None)
        rows.append(chosen)
    for r in rows:
        if r.get("samples_per_s"):
            # the median over rounds of the ratio to the baseline runs around it
            ratios = [x["speedup_bracketed"] for x in runs[r["method"]] if x.get("speedup_bracketed")]
            r["speedup_by_round"] = ratios
            r["speedup"] = statistics.median(ratios) if ratios else None
        r.pop("speedup_bracketed", None)
    return rows, timelines


def _simulate(cfg: BenchConfig, results: dict[str, Any]) -> None:
    """Step 3: the simulator's profile, its check against the measured runs, its prediction."""
    profile = build_profile(cfg, results["machine"], results["throughput"], results["transfer"])
    results["profile"] = profile
    if "single" in profile:
        results["validation"] = simulator.validate(profile)
        results["simulation"] = simulator.predict_table(profile, cfg.devices)


def _measure_convergence(cfg: BenchConfig, runner: _JobRunner, results: dict[str, Any], best_m: dict[str, int],
                         log: Callable[[str], None]) -> None:
    """Step 4: time to accuracy of every method (torch schedules at their best micro-batch count)."""
    log(f"convergence: {cfg.conv_workload.describe()}, {cfg.conv_epochs} epochs")
    for spec in converge_jobs(cfg, best_m):
        res, _, err = runner.run(spec)
        if res is None:
            log(f"  {spec.name}: FAILED: {err.strip().splitlines()[-1] if err else ''}")
            results["convergence"].append(error_row(spec, err or "failed"))
            continue
        results["convergence"].append(converge_row(spec, res, cfg.conv_target or 1.0))
    results["conv_target"] = set_target(results["convergence"], cfg.conv_target, cfg.conv_margin)
