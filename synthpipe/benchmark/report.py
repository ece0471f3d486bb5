"""Benchmark output: a markdown report, CSV and JSON files, PNG plots.

Files written by :func:`write_outputs` into the output directory:

``results.json`` — everything, with these stable top-level keys:

* ``version`` (int, 1), ``created`` (ISO time), ``command``, ``elapsed_s``;
* ``machine`` — :func:`synthpipe.benchmark.machine.describe`: ``cpu_model``,
  ``logical_cores``, ``physical_cores``, ``usable_cores``, ``cgroup_cpu_limit``,
  ``memory_gb``, ``load_average``, ``torch``, ``python``, ``platform``, ``hostname``,
  ``device``, ``device_names``, ``gpus``, ``ranks``, ``threads_per_rank``,
  ``oversubscribed``;
* ``config`` — the :class:`BenchConfig` (workloads, steps, sweep, variants, ...);
* ``warnings`` — list of strings (e.g. oversubscription);
* ``throughput`` — one row per method (:data:`THROUGHPUT_KEYS`, below): ``samples_per_s``
  is the median of ``repeats`` interleaved rounds (the other fields come from that
  round); ``speedup`` is the median over rounds of the ratio to the mean of the
  single-device backprop runs just before and just after it in its round
  (``speedup_by_round``; the baseline runs again after every ``baseline_every`` jobs,
  and its own ``samples_per_s_by_round`` lists every baseline run); ``per_rank`` holds
  :data:`RANK_KEYS` for each rank; ``losses`` are the timed steps' training losses and
  ``param_checksum`` is ``[sum |p|, sum p^2]`` of all
  parameters after them (exact methods match ``single``: every stage trained); rows of
  ``family`` ``"ceiling"`` (method ``<variant>-alone``, schedule ``"alone"``) time the
  synthetic-gradient variant's stages run alone on every rank at once, with no
  transfers: the speedup a perfect transport and schedule would reach on this machine;
* ``sweep`` — ``microbatches``, ``schedules``, ``best_microbatches`` and
  ``best_samples_per_s`` per torch schedule;
* ``transfer`` — ping-pong ``[{bytes, one_way_s}]``;
* ``profile`` — the simulator's input (also ``profile.json``; see
  :func:`synthpipe.benchmark.bench.build_profile`);
* ``validation`` — simulator vs measurement per 2-rank run: ``name``, ``schedule``,
  ``microbatches``, ``measured_step_s``, ``predicted_step_s``, ``error``,
  ``within_15pct``, ``predicted_bubble``;
* ``simulation`` — predicted ``devices``, ``method``, ``microbatches``, ``step_s``,
  ``bubble``, ``speedup``, ``samples_per_s``;
* ``convergence`` — one row per method (:data:`CONVERGENCE_KEYS`), with ``curve``: a list
  of ``{time, epoch, steps, accuracy, loss}`` (time = training seconds so far), and the
  time-to-target ratios ``speedup_vs_single`` / ``speedup_vs_torch``;
* ``conv_target`` — the target accuracy of those rows (single-device backprop's final
  accuracy minus the margin, unless one was given);
* ``timelines`` — per method, per rank: ``{rank, origin, segments: [[start_s, end_s,
  kind, step], ...]}`` (also ``timeline.json``).

``throughput.csv``, ``convergence.csv``, ``validation.csv``, ``simulation.csv`` — the
same rows flattened (per-rank values as ``<key>_r<rank>`` columns; no curves).
``profile.json`` — input for ``synthpipe simulate --profile``. ``report.md`` — the
markdown printed on stdout. Plots: ``accuracy_vs_time.png`` (test accuracy against
training wall-clock, every method), ``accuracy_vs_steps.png`` (against training steps),
``timeline.png`` (per-rank compute / communication / waiting over a few steps of each
method), ``scaling.png`` (simulated speedup, 2..16 devices).
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from typing import Any, Iterable, Sequence

from .machine import summary_line

__all__ = ["THROUGHPUT_KEYS", "RANK_KEYS", "CONVERGENCE_KEYS", "KIND_COLORS", "to_json", "write_json",
           "machine_columns", "write_csv", "markdown", "rank_key", "headline", "simulation_markdown",
           "convergence_markdown", "plot_accuracy", "timeline_methods", "plot_timeline", "plot_scaling",
           "OUTPUT_FILES", "write_outputs"]

THROUGHPUT_KEYS = (
    "method", "label", "family", "schedule", "microbatches", "stages_per_rank", "ranks", "threads", "device",
    "batch", "steps", "wall_s", "step_s", "samples_per_s", "speedup", "oversubscribed", "best_in_sweep",
    "repeats", "samples_per_s_runs", "samples_per_s_by_round", "speedup_by_round", "system_cpu_percent",
    "other_cpu_cores", "steal_percent", "gpu_util_percent",
    "gpu_mem_peak_mb", "max_inflight", "synthesizer", "conditional", "per_rank", "losses", "param_checksum",
    "error",
)
RANK_KEYS = (
    "rank", "forward_s", "backward_s", "update_s", "synth_s", "send_s", "recv_s", "wait_s", "other_s",
    "busy_fraction", "comm_fraction", "wait_fraction", "other_fraction", "cpu_util_percent",
    "peak_rss_mb", "rss_sampled_peak_mb", "peak_cuda_mb", "threads", "device",
)
CONVERGENCE_KEYS = (
    "method", "label", "family", "schedule", "microbatches", "ranks", "epochs", "steps", "train_time_s",
    "samples_per_s", "final_accuracy", "best_accuracy", "final_loss", "target_accuracy", "time_to_target_s",
    "epochs_to_target", "steps_to_target", "speedup_vs_single", "speedup_vs_torch", "curve", "peak_rss_mb", "error",
)

KIND_COLORS = {"forward": "#4C72B0", "backward": "#DD8452", "update": "#8C613C", "synth": "#8172B3",
               "send": "#55A868", "recv": "#64B5CD", "wait": "#C44E52"}


# -- helpers --------------------------------------------------------------------------------
def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def to_json(data: Any) -> str:
    """``data`` as the JSON the files hold (non-finite floats as ``null``)."""
    return json.dumps(_clean(data), indent=1)


def write_json(path: str, data: Any) -> None:
    with open(path, "w") as f:
        f.write(to_json(data))


def _fmt(v: Any, digits: int = 1, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if pct:
        return f"{100 * v:.0f}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ranks(values: Iterable[Any], pct: bool = False, digits: int = 0) -> str:
    return " / ".join(_fmt(v, digits, pct) for v in values)


def _flatten(row: dict[str, Any], skip: Sequence[str] = ("curve", "losses", "error_detail")) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k in skip:
            continue
        if k == "per_rank":
            for rr in v:
                for kk, vv in rr.items():
                    if kk != "rank":
                        out[f"{kk}_r{rr['rank']}"] = vv
        elif isinstance(v, (list, tuple)):
            out[k] = ";".join(_fmt(x, 6) if isinstance(x, float) else str(x) for x in v)
        elif isinstance(v, dict):
            out[k] = json.dumps(_clean(v))
        else:
            out[k] = v
    return out


def machine_columns(machine: dict[str, Any] | None) -> dict[str, Any]:
    """The machine, as CSV columns repeated on every row."""
    if not machine:
        return {}
    return {"machine_cpu": machine.get("cpu_model"), "machine_usable_cores": machine.get("usable_cores"),
            "machine_device": ";".join(machine.get("device_names") or []),
            "threads_per_rank": machine.get("threads_per_rank"), "torch_version": machine.get("torch"),
            "load_average": ";".join(str(v) for v in machine.get("load_average") or [])}


def write_csv(path: str, rows: Sequence[dict[str, Any]], machine: dict[str, Any] | None = None) -> None:
    extra = machine_columns(machine)
    flat = [{**_flatten(r), **extra} for r in rows]
    keys: list[str] = []
    for r in flat:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in flat:
            writer.writerow({k: r.get(k) for k in keys})


# -- markdown ---------------------------------------------------------------------------------
def markdown(results: dict[str, Any]) -> str:
    """The report as markdown (what ``synthpipe bench`` prints)."""
    m = results["machine"]
    cfg = results["config"]
    lines = ["# synthpipe bench", "", f"**Machine:** {summary_line(m)}", ""]
    if m.get("oversubscribed"):
        lines += ["**Warning:** ranks x threads exceeds the usable cores; rows marked `*` are not a fair "
                  "comparison.", ""]
    for w in results.get("warnings", []):
        lines.append(f"> {w}")
    rows = results.get("throughput") or []
    if rows:
        w = cfg["workload"]
        lines += [
            "## Throughput", "",
            f"Workload: {w['model']}(in={w['in_features']}, hidden={w['hidden']}, depth={w['depth']}), "
            f"batch {w['batch']}, {w['optimizer']} lr {w['lr']}; {cfg['steps']} timed steps after "
            f"{cfg['warmup']} warm-up, "
            f"median of {cfg['repeats']} round(s); {cfg['threads']} thread(s) per rank and for the baseline. "
            f"torch.distributed.pipelining micro-batch sweep: m in {{{', '.join(map(str, cfg['microbatches']))}}} "
            f"for {', '.join(cfg['schedules'])}; the best m per schedule is marked **best**.", "",
            "| method | ranks | m | samples/s | speedup | busy % (per rank) | comm % | wait % | CPU % (per rank) "
            "| peak RSS MB | notes |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r.get("error"):
                lines.append(f"| {r['method']} | {r['ranks']} | {r.get('microbatches', '')} | failed "
                             f"| | | | | | | {r['error']} |")
                continue
            pr = r["per_rank"]
            notes = []
            if r.get("best_in_sweep"):
                notes.append("**best**")
            if r["family"] == "ceiling":
                notes.append("ceiling: the stages alone, no transfers")
            if r.get("oversubscribed"):
                notes.append("* oversubscribed")
            if r.get("other_cpu_cores") is not None and r["other_cpu_cores"] > 0.25:
                notes.append(f"other load {r['other_cpu_cores']:.1f} cores")
            if r.get("steal_percent") is not None and r["steal_percent"] > 2:
                notes.append(f"VM steal {r['steal_percent']:.0f}%")
            if r.get("samples_per_s_spread") is not None:
                notes.append(f"spread {100 * r['samples_per_s_spread']:.0f}%")
            name = r["method"] + (" *" if r.get("oversubscribed") else "")
            lines.append(
                f"| {name} | {r['ranks']} | "
                f"{r['microbatches'] if r['family'] == 'torch.distributed.pipelining' else ''} | "
                f"{_fmt(r['samples_per_s'], 0)} | {_fmt(r.get('speedup'), 2)} | "
                f"{_ranks((x['busy_fraction'] for x in pr), pct=True)} | "
                f"{_ranks((x['comm_fraction'] for x in pr), pct=True)} | "
                f"{_ranks((x['wait_fraction'] for x in pr), pct=True)} | "
                f"{_ranks(x['cpu_util_percent'] for x in pr)} | "
                f"{_ranks(x['peak_rss_mb'] for x in pr)} | {', '.join(notes)} |")
        lines += ["", "Per-rank profile (milliseconds per step; other = Python glue and untimed idle):", "",
                  "| method | rank | forward | backward | update | synth | send | recv | wait | other | step |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.get("error") or (r["family"] == "torch.distributed.pipelining" and not r.get("best_in_sweep")):
                continue
            for x in r["per_rank"]:
                vals = [x[k] * 1e3 for k in ("forward_s", "backward_s", "update_s", "synth_s", "send_s", "recv_s",
                                             "wait_s", "other_s")]
                lines.append(f"| {r['method']} | {x['rank']} | " + " | ".join(f"{v:.1f}" for v in vals)
                             + f" | {r['step_s'] * 1e3:.1f} |")
        lines += ["", headline(results)]
    val = results.get("validation") or []
    if val:
        lines += ["", "## Simulator check (measured 2-rank runs)", "",
                  "Each run predicted from its own per-rank forward/backward/update/synthesizer/communication "
                  "times and the measured transfer time; the model supplies the schedule's dependencies and "
                  "bubbles.", "",
                  "| run | schedule | m | measured ms/step | predicted ms/step | error | within 15% |",
                  "|---|---|---|---|---|---|---|"]
        for v in val:
            lines.append(f"| {v['name']} | {v['schedule']} | {v['microbatches']} | {v['measured_step_s'] * 1e3:.1f} | "
                         f"{v['predicted_step_s'] * 1e3:.1f} | {100 * v['error']:+.1f}% | "
                         f"{'yes' if v['within_15pct'] else 'no'} |")
    sim = results.get("simulation") or []
    if sim:
        lines += ["", "## Simulated scaling (balanced stages from the single-device profile)", "",
                  "Predicted speedup over single-device backprop (idle share of the devices; best micro-batch "
                  "count for gpipe/1f1b/zb): the single-device work split into N equal stages, each boundary "
                  "keeping the measured synthesizer, message and transfer costs.", "",
                  simulation_markdown(sim)]
    conv = results.get("convergence") or []
    if conv:
        lines += ["", "## Time to accuracy", "", *convergence_markdown(results)]
    lines += ["", f"_{results.get('created', '')}; {results.get('elapsed_s', 0):.0f} s in total._", ""]
    return "\n".join(lines)


def convergence_markdown(results: dict[str, Any]) -> list[str]:
    """The time-to-accuracy section's lines: the workload and target, then one row per method."""
    cfg = results.get("config", {})
    cw = cfg.get("conv_workload", {})
    conv = results.get("convergence") or []
    target = results.get("conv_target")
    if target is None:
        target = cfg.get("conv_target")
    how = ("given" if cfg.get("conv_target") is not None
           else f"single-device backprop's final accuracy minus {100 * cfg.get('conv_margin', 0.01):.0f} point")
    lines = [f"{cw.get('model')}(in={cw.get('in_features')}, hidden={cw.get('hidden')}, depth={cw.get('depth')}) on "
             f"{cw.get('data')} ({cw.get('num_samples')} samples), batch {cw.get('batch')}, {cw.get('optimizer')} "
             f"lr {cw.get('lr')}, {cfg.get('conv_epochs')} epochs each, evaluated {cfg.get('conv_evals', 1)}x per "
             f"epoch; time = training wall-clock (evaluation excluded); seed {cw.get('seed', 0)}.",
             "",
             f"**Target: {_fmt(None if target is None else 100 * target, 1)}% test accuracy** ({how}). "
             f"x single / x torch: time to target of single-device backprop / of the best torch schedule, "
             f"divided by the row's (above 1: sooner), measured in this run on the machine above.",
             "",
             "| method | ranks | time to target (s) | x single | x torch | epochs to target | steps to target | "
             "final acc. | best acc. | samples/s | peak RSS per rank (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in conv:
        if r.get("error"):
            lines.append(f"| {r['method']} | {r['ranks']} | failed: {r['error']} | | | | | | | | |")
            continue
        rss = " / ".join(f"{v:.0f}" for v in r.get("peak_rss_mb") or [] if v is not None)
        lines.append(f"| {r['method']} | {r['ranks']} | {_fmt(r.get('time_to_target_s'), 1)} | "
                     f"{_fmt(r.get('speedup_vs_single'), 2)} | {_fmt(r.get('speedup_vs_torch'), 2)} | "
                     f"{_fmt(r.get('epochs_to_target'))} | {_fmt(r.get('steps_to_target'))} | "
                     f"{100 * r['final_accuracy']:.1f}% | {100 * r['best_accuracy']:.1f}% | "
                     f"{_fmt(r.get('samples_per_s'), 0)} | {rss} |")
    return lines


def rank_key(row: dict[str, Any]) -> tuple[bool, float, float]:
    """Sort key of a throughput row: speedup first (where measured), then samples/s."""
    return row.get("speedup") is not None, row.get("speedup") or 0.0, row.get("samples_per_s") or 0.0


def _vs(row: dict[str, Any], ref: dict[str, Any]) -> float:
    """``row`` against ``ref``: the median over rounds of the ratio of their speedups in that
    round (each already taken against the baseline runs around it, so a machine whose speed
    drifts within a round does not bias it), else of their samples/s in that round, else the
    ratio of the medians."""
    import statistics
    for key in ("speedup_by_round", "samples_per_s_by_round"):
        mine, theirs = row.get(key) or [], ref.get(key) or []
        ratios = [a / b for a, b in zip(mine, theirs, strict=False) if a and b]
        if ratios and len(mine) == len(theirs):
            return statistics.median(ratios)
    return row["samples_per_s"] / ref["samples_per_s"]


def headline(results: dict[str, Any]) -> str:
    """synthpipe rows against single-device backprop and the best torch schedule of the same run.

    The best torch schedule is the row marked best in its sweep with the highest speedup,
    and every figure is the table's own (same-round ratios), so the headline and the table
    agree even when the machine's speed drifts during the run.
    """
    rows = results.get("throughput") or []
    parts = []
    by_name = {r["method"]: r for r in rows}
    marked = [r for r in rows if r.get("best_in_sweep") and not r.get("error") and r.get("samples_per_s")]
    top = max(marked, key=rank_key) if marked else None
    for r in rows:
        if r["family"] != "synthpipe" or r.get("error") or not r.get("samples_per_s"):
            continue
        text = f"**{r['method']}** {r['speedup']:.2f}x single" if r.get("speedup") else f"**{r['method']}**"
        alone = by_name.get(r["method"] + "-alone")
        if r.get("speedup") and alone and not alone.get("error") and alone.get("speedup"):
            text += (f" ({_vs(r, alone):.0%} of its no-transfer ceiling, "
                     f"{alone['speedup']:.2f}x)")
        if top is not None:
            text += f", {_vs(r, top):.2f}x the best torch schedule"
        parts.append(text)
    line = "Headline (same run): " + "; ".join(parts)
    if top is not None and top.get("speedup"):
        line += (f"; the best torch schedule ({top['schedule']}, m={top['microbatches']}) is "
                 f"{top['speedup']:.2f}x single.")
    return line


def simulation_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Predicted speedup (bubble, best m) per method and device count."""
    devices = sorted({r["devices"] for r in rows})
    methods: list[str] = []
    for r in rows:
        if r["method"] not in methods and r["method"] != "single":
            methods.append(r["method"])
    head = "| method | " + " | ".join(f"{n} devices" for n in devices) + " |"
    out = [head, "|---|" + "---|" * len(devices)]
    for meth in methods:
        cells = []
        for n in devices:
            found = next((x for x in rows if x["devices"] == n and x["method"] == meth), None)
            if found is None:
                cells.append("–")
                continue
            extra = f", m={found['microbatches']}" if meth in ("gpipe", "1f1b", "zb") else ""
            cells.append(f"{found['speedup']:.2f}x (bubble {100 * found['bubble']:.0f}%{extra})")
        out.append(f"| {meth} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# -- plots ----------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _caption(fig: Any, machine: dict[str, Any] | None) -> None:
    if machine:
        fig.text(0.01, 0.005, summary_line(machine), fontsize=6, color="#555555", ha="left", va="bottom")


def _save(plt: Any, fig: Any, path: str, machine: dict[str, Any] | None,
          rect: tuple[float, float, float, float] = (0, 0.03, 1, 1), dpi: int = 120) -> None:
    """Lay out, caption with the machine, write and close a figure."""
    fig.tight_layout(rect=rect)
    _caption(fig, machine)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_accuracy(conv: Sequence[dict[str, Any]], target: float | None, path: str,
                  machine: dict[str, Any] | None = None, x: str = "time") -> None:
    """Test accuracy of every method against training wall-clock (``x="time"``) or steps (``x="steps"``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in conv:
        if r.get("error"):
            continue
        xs = [p[x] for p in r["curve"]]
        ys = [100 * p["accuracy"] for p in r["curve"]]
        ax.plot(xs, ys, marker="o", markersize=3, label=r["method"])
    if target is not None:
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {100 * target:.1f}%")
    ax.set_xlabel("training wall-clock (s)" if x == "time" else "training steps")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy against " + ("wall-clock time" if x == "time" else "steps"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path, machine)


def timeline_methods(results: dict[str, Any]) -> list[str]:
    """Methods shown in the timeline plot: single, the best torch schedules, synthpipe."""
    rows = [r for r in results.get("throughput", []) if not r.get("error")]
    names = [r["method"] for r in rows
             if r["family"] != "torch.distributed.pipelining" or r.get("best_in_sweep")]
    return [n for n in names if results.get("timelines", {}).get(n)]


def plot_timeline(results: dict[str, Any], path: str, steps: float = 3.0) -> None:
    """Per-rank compute / communication / waiting over ``steps`` steps from the middle of each run."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    names = timeline_methods(results)
    rows = {r["method"]: r for r in results.get("throughput", [])}
    if not names:
        return
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 1.0 + 0.9 * sum(
        len(results["timelines"][n]) for n in names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        ranks = results["timelines"][name]
        row = rows[name]
        origin = min(r["origin"] for r in ranks if r.get("origin") is not None)
        span = steps * row["step_s"]
        start = origin + max(0.0, min(0.4 * row["wall_s"], row["wall_s"] - span))
        for i, rk in enumerate(ranks):
            off = (rk.get("origin") or origin) - start
            bars: dict[str, list[tuple[float, float]]] = {}
            for s, e, kind, _ in rk["segments"]:
                a, b = s + off, e + off
                if b < 0 or a > span:
                    continue
                bars.setdefault(kind, []).append((max(a, 0) * 1e3, (min(b, span) - max(a, 0)) * 1e3))
            for kind, segs in bars.items():
                ax.broken_barh(segs, (i - 0.4, 0.8), color=KIND_COLORS.get(kind, "#999999"))
        ax.set_yticks(range(len(ranks)))
        ax.set_yticklabels([f"rank {r['rank']}" for r in ranks])
        ax.set_xlim(0, span * 1e3)
        ax.invert_yaxis()
        ax.set_title(f"{name}: {row['samples_per_s']:.0f} samples/s", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("milliseconds (white = untimed: Python glue or idle)")
    handles = [Patch(color=c, label=k) for k, c in KIND_COLORS.items()]
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=7)
    _save(plt, fig, path, results.get("machine"), rect=(0, 0.02, 1, 0.96), dpi=110)


def plot_scaling(sim: Sequence[dict[str, Any]], path: str, machine: dict[str, Any] | None = None) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    methods: list[str] = []
    for r in sim:
        if r["method"] not in methods and r["method"] != "single":
            methods.append(r["method"])
    for meth in methods:
        pts = sorted((r["devices"], r["speedup"]) for r in sim if r["method"] == meth)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=meth)
    devs = sorted({r["devices"] for r in sim})
    ax.plot(devs, devs, color="grey", linestyle=":", label="ideal")
    ax.set_xscale("log", base=2)
    ax.set_xticks(devs)
    ax.set_xticklabels([str(d) for d in devs])
    ax.set_xlabel("devices")
    ax.set_ylabel("predicted speedup vs single device")
    ax.set_title("Simulated scaling (profile measured on this machine)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path, machine)


# -- all files ------------------------------------------------------------------------------
OUTPUT_FILES = ("throughput.csv", "convergence.csv", "validation.csv", "simulation.csv", "profile.json",
                "timeline.json", "accuracy_vs_time.png", "accuracy_vs_steps.png", "timeline.png",
                "scaling.png", "report.md", "results.json")


def write_outputs(results: dict[str, Any], directory: str, plots: bool = True) -> dict[str, str]:
    """Write every output file; returns ``{name: path}`` (also stored as ``results["files"]``).

    The files are written into a temporary directory inside ``directory`` and moved in
    only when all of them are written: a failure on the way (a full disk, a plot that
    raises) leaves an earlier run's files as they were. Files of :data:`OUTPUT_FILES`
    that this run does not produce (a plot after ``plots=False``, ``convergence.csv``
    after a throughput-only run) are removed, so the directory never mixes two runs.
    """
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".writing-", dir=directory)  # same file system: os.replace is atomic
    files: dict[str, str] = {}

    def path(name: str) -> str:
        files[name] = os.path.join(directory, name)
        return os.path.join(staging, name)

    try:
        machine = results.get("machine")
        if results.get("throughput"):
            write_csv(path("throughput.csv"), results["throughput"], machine)
        if results.get("convergence"):
            write_csv(path("convergence.csv"), results["convergence"], machine)
        if results.get("validation"):
            write_csv(path("validation.csv"), results["validation"], machine)
        if results.get("simulation"):
            write_csv(path("simulation.csv"), results["simulation"], machine)
        if results.get("profile"):
            write_json(path("profile.json"), results["profile"])
        if results.get("timelines"):
            write_json(path("timeline.json"), results["timelines"])
        if plots:
            if results.get("convergence"):
                target = results.get("conv_target", results["config"].get("conv_target"))
                plot_accuracy(results["convergence"], target, path("accuracy_vs_time.png"), machine)
                plot_accuracy(results["convergence"], target, path("accuracy_vs_steps.png"), machine, x="steps")
            if results.get("timelines"):
                plot_timeline(results, path("timeline.png"))
            if results.get("simulation"):
                plot_scaling(results["simulation"], path("scaling.png"), machine)
        with open(path("report.md"), "w") as f:
            f.write(markdown(results))
        path("results.json")
        results["files"] = dict(files)
        write_json(os.path.join(staging, "results.json"), results)
        for name in OUTPUT_FILES:
            if name in files:
                os.replace(os.path.join(staging, name), files[name])
            elif os.path.isfile(os.path.join(directory, name)):
                os.remove(os.path.join(directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return results["files"]
