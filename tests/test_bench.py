"""The benchmark harness: section timers, machine description, and a tiny end-to-end run.

No timing thresholds: the machine running the tests may be busy. The end-to-end run
checks that every documented output exists and has its keys.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time

import pytest

from synthpipe.engine.metrics import KINDS, NULL_TIMERS, Timers


# -- timers ------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_timers_count_nested_sections_exclusively() -> None:
    clock = FakeClock()
    tm = Timers(clock=clock)
    with tm.section("forward", step=0):
        clock.t += 1.0
        with tm.section("wait", step=0):
            clock.t += 2.0
        clock.t += 0.5
    clock.t += 10.0  # outside any section: "other"
    with tm.section("synth", step=1):
        clock.t += 0.25
    totals = tm.totals()
    assert totals["forward"] == pytest.approx(1.5)
    assert totals["wait"] == pytest.approx(2.0)
    assert totals["synth"] == pytest.approx(0.25)
    assert tm.counts()["forward"] == 1 and tm.counts()["wait"] == 1
    segs = tm.timeline()
    assert [(s, e, k, st) for s, e, k, st in segs] == [
        (0.0, 1.0, "forward", 0), (1.0, 3.0, "wait", 0), (3.0, 3.5, "forward", 0), (13.5, 13.75, "synth", 1)]
    summary = tm.summary(wall=13.75)
    assert summary["busy_fraction"] == pytest.approx(1.75 / 13.75)
    assert summary["wait_fraction"] == pytest.approx(2.0 / 13.75)
    assert summary["other_fraction"] == pytest.approx(10.0 / 13.75)
    assert set(KINDS) <= set(summary["seconds"])


def test_timers_keep_a_bounded_timeline_but_full_totals() -> None:
    clock = FakeClock()
    tm = Timers(capacity=5, clock=clock)
    for i in range(20):
        with tm.section("backward", i):
            clock.t += 1.0
    assert len(tm.timeline()) == 5
    assert tm.timeline()[0][3] == 15
    assert tm.totals()["backward"] == pytest.approx(20.0)
    tm.reset()
    assert tm.totals()["backward"] == 0.0 and tm.timeline() == []


def test_null_timers_do_nothing() -> None:
    with NULL_TIMERS.section("forward"):
        pass
    assert not NULL_TIMERS.enabled


# -- machine and monitor -------------------------------------------------------------------------
def test_machine_description_and_fairness() -> None:
    from synthpipe.benchmark.machine import describe, oversubscribed, summary_line

    m = describe(ranks=2, threads=1)
    for key in ("cpu_model", "logical_cores", "usable_cores", "torch", "python", "device_names",
                "ranks", "threads_per_rank", "oversubscribed", "load_average"):
        assert key in m
    assert oversubscribed(4, 1, cores=2) and not oversubscribed(2, 1, cores=2)
    assert oversubscribed(2, 2, cores=8, limit=2.0)
    assert "threads" in summary_line(m)


def test_monitor_samples_this_process() -> None:
    from synthpipe.benchmark.monitor import Monitor, peak_memory, reset_peak_memory

    with Monitor([os.getpid()], interval=0.05) as mon:
        t0 = time.time()
        end = time.perf_counter() + 0.4
        while time.perf_counter() < end:
            sum(range(1000))
        t1 = time.time()
    usage = mon.window(t0, t1, [os.getpid()])
    assert usage["samples"] >= 2
    assert usage["cpu_percent"][0] is not None and usage["cpu_percent"][0] > 0
    assert usage["rss_peak_mb"][0] > 0
    reset_peak_memory()
    assert peak_memory()["rss_mb"] > 0


def test_variants_parse() -> None:
    from synthpipe.benchmark.config import Variant

    assert Variant.parse("cdni").name == "cdni"
    assert Variant.parse("dni:linear").name == "dni"
    v = Variant.parse("cdni:lowrank:16")
    assert (v.mode, v.synth, v.rank, v.name) == ("cdni", "lowrank", 16, "cdni-lowrank16")
    with pytest.raises(ValueError):
        Variant.parse("xdni")


def test_baseline_runs_again_after_every_n_jobs() -> None:
    from synthpipe.benchmark.bench import with_baseline_runs
    from synthpipe.benchmark.job import JobSpec
    from synthpipe.benchmark.workload import Workload

    w = Workload()
    jobs = [JobSpec("single", "single", w)] + [JobSpec(f"j{i}", "synthpipe", w, ranks=2) for i in range(5)]
    names = [j.name for j in with_baseline_runs(jobs, 2)]
    assert names == ["single", "j0", "j1", "single", "j2", "j3", "single", "j4", "single"]
    assert [j.name for j in with_baseline_runs(jobs, 0)] == [j.name for j in jobs]
    assert [j.name for j in with_baseline_runs(jobs[:1], 2)] == ["single"]


def test_speedups_are_against_the_baseline_runs_around_each_job() -> None:
    from synthpipe.benchmark.bench import bracketed_speedups

    # the machine slows down during the round: 100 -> 50 samples/s for the baseline
    order = [("single", 100.0), ("a", 150.0), ("single", 50.0), ("b", 75.0), ("c", None), ("d", 60.0)]
    ratios = bracketed_speedups(order)
    assert ratios[0] is None and ratios[2] is None and ratios[4] is None  # baselines and a failed job
    assert ratios[1] == pytest.approx(150.0 / 75.0)  # mean of 100 before and 50 after
    assert ratios[3] == pytest.approx(75.0 / 50.0)  # only a baseline before it
    assert ratios[5] == pytest.approx(60.0 / 50.0)
    assert bracketed_speedups([("a", 1.0)]) == [None]  # no baseline at all


def test_a_drifting_baseline_is_reported_as_machine_noise() -> None:
    from synthpipe.benchmark.bench import _median_run, baseline_drift_warning

    def rows(values):
        runs = [{"method": "single", "family": "baseline", "samples_per_s": v, "error": None} for v in values]
        return [_median_run(runs), {"method": "cdni", "family": "synthpipe", "samples_per_s": 3000.0, "error": None}]

    message = baseline_drift_warning(rows([1900.0, 1400.0, 1880.0, 1900.0]))
    assert message is not None and "varied by 26%" in message and "(4 runs)" in message
    assert baseline_drift_warning(rows([1900.0, 1850.0, 1880.0])) is None  # 3%: quiet enough
    assert baseline_drift_warning(rows([1900.0])) is None  # one run: no spread to judge
    assert baseline_drift_warning([]) is None


def test_the_best_torch_schedule_and_the_headline_use_the_drift_corrected_speedups() -> None:
    from synthpipe.benchmark.bench import best_of_sweep
    from synthpipe.benchmark.report import headline

    def row(method, family, schedule, m, raw, speedups):
        return {"method": method, "family": family, "schedule": schedule, "microbatches": m, "error": None,
                "samples_per_s": raw[1], "samples_per_s_by_round": raw, "speedup": sorted(speedups)[1],
                "speedup_by_round": speedups}
    # gpipe ran while the machine was fast (more samples/s), interleaved while it was slow:
    # against the baseline runs around each, interleaved is the faster schedule
    rows = [row("single", "baseline", "single", 0, [1000.0, 1000.0, 1000.0], [1.0, 1.0, 1.0]),
            row("gpipe-m2", "torch.distributed.pipelining", "gpipe", 2, [1000.0, 1000.0, 1000.0], [0.80, 0.80, 0.80]),
            row("gpipe-m4", "torch.distributed.pipelining", "gpipe", 4, [900.0, 900.0, 900.0], [0.85, 0.85, 0.85]),
            row("interleaved1f1b-m2", "torch.distributed.pipelining", "interleaved1f1b", 2,
                [700.0, 700.0, 700.0], [0.90, 0.92, 0.94]),
            row("cdni", "synthpipe", "dni", 0, [1400.0, 1400.0, 1400.0], [1.60, 1.62, 1.64])]
    best = best_of_sweep(rows)
    assert best["gpipe"]["method"] == "gpipe-m4"  # 0.85x beats 0.80x although it has fewer samples/s
    for r in rows:
        r["best_in_sweep"] = best.get(r["schedule"]) is r
    line = headline({"throughput": rows})
    assert "the best torch schedule (interleaved1f1b, m=2) is 0.92x single" in line
    assert "**cdni** 1.62x single, 1.76x the best torch schedule" in line  # 1.62 / 0.92 by round


# -- bad input: refused before any job, earlier results kept -------------------------------------
@pytest.fixture
def no_jobs(monkeypatch):
    """Fail the test if the benchmark starts its rank processes."""
    from synthpipe.benchmark import bench

    def refuse(*args, **kwargs):
        raise AssertionError("a benchmark job was started")
    monkeypatch.setattr(bench, "RankPool", refuse)


@pytest.mark.parametrize("argv,message", [
    (["--batch", "0"], "--batch must be an integer >= 1; got 0"),
    (["--threads", "0"], "--threads must be an integer >= 1; got 0"),
    (["--ranks", "0"], "--ranks must be an integer >= 2; got 0"),
    (["--ranks", "-3"], "--ranks must be an integer >= 2; got -3"),
    (["--steps", "0"], "--steps must be an integer >= 1; got 0"),
    (["--warmup", "-1"], "--warmup must be an integer >= 1; got -1"),
    (["--repeats", "0"], "--repeats must be an integer >= 1; got 0"),
    (["--conv-epochs", "0"], "--conv-epochs must be an integer >= 1; got 0"),
    (["--max-inflight", "0"], "--max-inflight must be an integer >= 1; got 0"),
    (["--baseline-every", "-1"], "--baseline-every must be an integer >= 0; got -1"),
    (["--microbatches", "0"], "--microbatches: every entry must be an integer >= 1; got 0"),
    (["--microbatches", "2,3"], "--microbatches: 3 does not divide --batch 256"),
    (["--microbatches", "2,2"], "--microbatches lists 2 more than once"),
    (["--microbatches", ""], "--microbatches is empty"),
    (["--variants", "cdni:nokind"], "--variants: variant 'cdni:nokind': unknown synthesizer kind 'nokind'"),
    (["--variants", "xdni"], "--variants: variant 'xdni': the mode must be dni or cdni"),
    (["--variants", "cdni:lowrank:x"], "the rank must be an integer; got 'x'"),
    (["--variants", "cdni:lowrank:0"], "the low-rank synthesizer's rank must be an integer >= 1; got 0"),
    (["--variants", "dni,dni"], "--variants lists dni more than once"),
    (["--schedules", "gpipe,pipedream"], "--schedules: unknown torch schedule pipedream"),
    (["--balance", "8,8"], "--balance 8,8 sums to 16, but deep_mlp with --depth 8 has 17 children"),
    (["--balance", "5,6,6"], "--balance 5,6,6 has 3 entries; --ranks is 2"),
    (["--balance", "0,17"], "--balance: every entry must be an integer >= 1; got 0"),
    (["--conv-target", "0"], "--conv-target must be an accuracy in (0, 1]; got 0.0"),
    (["--conv-target", "1.5"], "--conv-target must be an accuracy in (0, 1]; got 1.5"),
    (["--timeout", "0"], "--timeout must be a finite number > 0; got 0.0"),
    (["--timeout", "nan"], "--timeout must be a finite number > 0; got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0; got inf"),
    (["--conv-lr", "-0.1"], "--conv-lr must be a finite number > 0; got -0.1"),
    (["--depth", "0"], "--depth must be an integer >= 1; got 0"),
    (["--depth", "1"], "--depth 1 gives deep_mlp 3 layers (children), too few for 2 stages per rank"),
    (["--conv-depth", "0"], "--conv-depth must be an integer >= 1; got 0"),
    (["--hidden", "0"], "--hidden must be an integer >= 1; got 0"),
    (["--conv-batch", "1"], "--conv-batch must be >= 2"),
    (["--conv-samples", "100"], "--conv-samples 100 gives 80 training examples (80%), fewer than one batch"),
    (["--devices", "0"], "--devices: device counts must be whole numbers from 1 to 256; got 0"),
    (["--devices", "1000"], "--devices: device counts must be whole numbers from 1 to 256; got 1000"),
    (["--devices", ""], "--devices must list at least one device count"),
    (["--no-throughput", "--no-converge"], "nothing to run: --no-throughput and --no-converge"),
])
def test_bench_refuses_bad_options_before_any_job(tmp_path, capsys, no_jobs, argv, message) -> None:
    from synthpipe.launch.cli import main

    out = tmp_path / "out"
    assert main(["bench", "--output", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("synthpipe bench: error: ") and message in err, err
    assert err.count("\n") == 1  # one line, no traceback
    assert not out.exists()


def test_bench_refuses_cuda_without_a_gpu_per_rank(tmp_path, capsys, no_jobs, monkeypatch) -> None:
    import torch

    from synthpipe.benchmark.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--output", str(tmp_path), "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["bench", "--output", str(tmp_path), "--device", "cuda", "--ranks", "2"]) == 2
    assert "--ranks is 2 and only 1 GPU(s) are visible" in capsys.readouterr().err


def test_bench_refuses_an_output_it_could_not_write(tmp_path, capsys, no_jobs) -> None:
    from synthpipe.benchmark.cli import main

    afile = tmp_path / "results.txt"
    afile.write_text("not a directory")
    assert main(["bench", "--output", str(afile)]) == 2
    assert f"--output {afile} is a file" in capsys.readouterr().err
    assert main(["bench", "--output", str(afile / "sub")]) == 2
    assert f"cannot be created: {afile} is a file" in capsys.readouterr().err
    assert afile.read_text() == "not a directory"


def test_bench_config_validate_guards_the_python_api(tmp_path, no_jobs) -> None:
    from synthpipe.benchmark.bench import run_benchmark
    from synthpipe.benchmark.config import BenchConfig, BenchConfigError, Variant, model_children, quick_config
    from synthpipe.benchmark.workload import Workload, build_model

    with pytest.raises(BenchConfigError, match=r"^steps must be an integer >= 1; got 0$") as e:
        run_benchmark(BenchConfig(steps=0))  # before any process starts (no_jobs)
    assert e.value.field == "steps" and isinstance(e.value, ValueError)
    with pytest.raises(BenchConfigError, match="workload.batch must be an integer >= 1; got 0"):
        BenchConfig(workload=Workload(batch=0)).validate()
    with pytest.raises(BenchConfigError, match="balance 4,4 has 2 entries; ranks is 3"):
        BenchConfig(ranks=3, balance=[4, 4], output=str(tmp_path)).validate()
    with pytest.raises(BenchConfigError, match="variants must be a list of Variant"):
        BenchConfig(variants=["cdni"]).validate()
    with pytest.raises(BenchConfigError, match="timeout must be a finite number > 0; got True"):
        BenchConfig(timeout=True).validate()
    with pytest.raises(ValueError, match="unknown synthesizer kind 'conv'"):
        Variant("cdni", "conv")
    with pytest.raises(TypeError, match="unknown field 'stepz'"):
        quick_config(stepz=3)
    assert BenchConfig(output=str(tmp_path / "new" / "dir")).validate().ranks == 2  # creatable: fine
    assert not (tmp_path / "new").exists()
    for w in (Workload(depth=3, in_features=8, hidden=8), Workload(model="paper_mlp", depth=2, in_features=8)):
        assert model_children(w) == len(build_model(w))


def _fake_results(cfg, ok: list[str], failed: list[str]) -> dict:
    """What run_benchmark returns for a --no-throughput run whose methods ``ok`` completed."""
    from synthpipe.benchmark.machine import describe

    def row(name, error=None):
        curve = [{"time": 0.0, "epoch": 0, "steps": 0, "accuracy": 0.1, "loss": 2.3},
                 {"time": 1.0, "epoch": 1, "steps": 10, "accuracy": 0.7, "loss": 1.0}]
        if error:
            return {"method": name, "label": name, "family": "synthpipe", "schedule": "dni", "microbatches": 1,
                    "ranks": 2, "samples_per_s": None, "speedup": None, "per_rank": [], "error": error,
                    "error_detail": f"Traceback ...\n{error}"}
        return {"method": name, "label": name, "family": "baseline", "schedule": "single", "microbatches": 1,
                "ranks": 1, "epochs": 1, "steps": 10, "train_time_s": 1.0, "samples_per_s": 1000.0,
                "final_accuracy": 0.7, "best_accuracy": 0.7, "final_loss": 1.0, "target_accuracy": 0.6,
                "time_to_target_s": 1.0, "epochs_to_target": 1, "curve": curve, "peak_rss_mb": [1.0], "error": None}

    return {"version": 1, "created": "now", "command": "test", "machine": describe(cfg.ranks, cfg.threads),
            "config": cfg.as_dict(), "warnings": [], "throughput": [], "sweep": {}, "transfer": [],
            "profile": None, "validation": [], "simulation": [], "timelines": {}, "elapsed_s": 1.0,
            "convergence": [row(n) for n in ok] + [row(n, "RuntimeError: boom") for n in failed]}


def _earlier_run(out) -> dict:
    out.mkdir()
    files = {"results.json": b'{"earlier": true}', "profile.json": b'{"version": 1}', "throughput.csv": b"method\n",
             "scaling.png": b"\x89PNG earlier", "report.md": b"# earlier"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    return files


def _contents(out) -> dict:
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_a_run_where_every_method_failed_keeps_the_earlier_results(tmp_path, capsys, monkeypatch) -> None:
    from synthpipe.benchmark import bench
    from synthpipe.benchmark.cli import main

    out = tmp_path / "out"
    earlier = _earlier_run(out)
    monkeypatch.setattr(bench, "run_benchmark", lambda cfg: _fake_results(cfg, [], ["single", "cdni"]))
    assert main(["bench", "--output", str(out), "--no-throughput"]) == 1
    captured = capsys.readouterr()
    assert "| cdni | 2 | failed: RuntimeError: boom |" in captured.out  # the failures are still shown
    assert (f"synthpipe bench: error: no method completed (single, cdni: RuntimeError: boom); wrote nothing, "
            f"so {out} keeps its earlier results") in captured.err
    assert _contents(out) == earlier  # nothing replaced, nothing added
    assert main(["bench", "--output", str(tmp_path / "fresh"), "--no-throughput", "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["convergence"][0]["error"] == "RuntimeError: boom"
    assert f"wrote nothing to {tmp_path / 'fresh'}" in captured.err
    assert not (tmp_path / "fresh").exists()


def test_an_interrupted_run_writes_nothing(tmp_path, capsys, monkeypatch) -> None:
    from synthpipe.benchmark import bench
    from synthpipe.benchmark.cli import main

    def interrupted(cfg):
        raise KeyboardInterrupt
    out = tmp_path / "out"
    earlier = _earlier_run(out)
    monkeypatch.setattr(bench, "run_benchmark", interrupted)
    assert main(["bench", "--output", str(out), "--no-throughput"]) == 130
    assert "interrupted; wrote nothing, so" in capsys.readouterr().err
    assert _contents(out) == earlier


def test_a_partly_failed_run_writes_one_consistent_set_with_the_failures_marked(tmp_path, capsys,
                                                                               monkeypatch) -> None:
    from synthpipe.benchmark import bench
    from synthpipe.benchmark.cli import main

    out = tmp_path / "out"
    _earlier_run(out)
    monkeypatch.setattr(bench, "run_benchmark", lambda cfg: _fake_results(cfg, ["single"], ["cdni"]))
    assert main(["bench", "--output", str(out), "--no-throughput", "--no-plots"]) == 1
    assert "synthpipe bench: failed methods: cdni (details in results.json)" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["error"]) for r in results["convergence"]] == [("single", None),
                                                                           ("cdni", "RuntimeError: boom")]
    # the earlier run's files that this run does not write are gone: no mixing of two runs
    assert sorted(p.name for p in out.iterdir()) == ["convergence.csv", "report.md", "results.json"]


def test_outputs_are_moved_in_only_once_all_are_written(tmp_path, monkeypatch) -> None:
    from synthpipe.benchmark import report
    from synthpipe.benchmark.config import BenchConfig

    out = tmp_path / "out"
    earlier = _earlier_run(out)

    def broken_plot(*args, **kwargs):
        raise RuntimeError("plotting failed")
    monkeypatch.setattr(report, "plot_accuracy", broken_plot)
    results = _fake_results(BenchConfig(converge=True), ["single"], [])
    with pytest.raises(RuntimeError, match="plotting failed"):
        report.write_outputs(results, str(out), plots=True)
    assert _contents(out) == earlier  # and no staging directory left behind


# -- end to end ----------------------------------------------------------------------------------
@pytest.mark.timeout(150)
def test_tiny_bench_writes_every_output(tmp_path, capsys) -> None:
    from synthpipe.benchmark import add_bench_arguments, run_bench
    from synthpipe.benchmark.report import CONVERGENCE_KEYS, RANK_KEYS, THROUGHPUT_KEYS

    out = tmp_path / "bench"
    parser = add_bench_arguments(argparse.ArgumentParser())
    args = parser.parse_args([
        "--quick", "--output", str(out), "--in-features", "64", "--hidden", "64", "--depth", "4",
        "--batch", "32", "--steps", "3", "--warmup", "1", "--microbatches", "2,4",
        "--schedules", "gpipe,1f1b,zbv", "--variants", "dni,cdni:lowrank:8",
        "--conv-epochs", "2", "--conv-samples", "600", "--conv-hidden", "32", "--conv-depth", "2",
        "--conv-batch", "64", "--conv-sources", "cdni:lowrank:8,delayed:predict,interlocking", "--conv-evals", "2",
        "--devices", "2,4", "--timeout", "120"])
    assert run_bench(args) == 0
    stdout = capsys.readouterr().out
    assert "## Throughput" in stdout and "## Time to accuracy" in stdout and "## Simulator check" in stdout

    for name in ("results.json", "throughput.csv", "convergence.csv", "validation.csv", "simulation.csv",
                 "profile.json", "timeline.json", "report.md", "accuracy_vs_time.png", "accuracy_vs_steps.png",
                 "timeline.png", "scaling.png"):
        path = out / name
        assert path.exists() and path.stat().st_size > 0, name
    for png in ("accuracy_vs_time.png", "accuracy_vs_steps.png", "timeline.png", "scaling.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((out / "results.json").read_text())
    for key in ("version", "created", "machine", "config", "warnings", "throughput", "sweep", "transfer",
                "profile", "validation", "simulation", "convergence", "timelines", "files", "elapsed_s"):
        assert key in results, key
    assert results["machine"]["threads_per_rank"] == 1 and results["machine"]["torch"]
    names = [r["method"] for r in results["throughput"]]
    assert names == ["single", "gpipe-m2", "gpipe-m4", "1f1b-m2", "1f1b-m4", "zbv-m4", "backprop",
                     "dni", "dni-alone", "cdni-lowrank8", "cdni-lowrank8-alone"]
    for row in results["throughput"]:
        assert row["error"] is None, row.get("error_detail")
        assert set(THROUGHPUT_KEYS) <= set(row), set(THROUGHPUT_KEYS) - set(row)
        assert row["samples_per_s"] > 0 and row["speedup"] > 0
        assert len(row["per_rank"]) == row["ranks"]
        for rank in row["per_rank"]:
            assert set(RANK_KEYS) <= set(rank), set(RANK_KEYS) - set(rank)
            assert 0 <= rank["busy_fraction"] <= 1.0 + 1e-6
    single = results["throughput"][0]
    assert single["speedup"] == pytest.approx(1.0)
    assert len(single["samples_per_s_by_round"]) == 4  # first, after 4 and 8 jobs, after the last (10 jobs)
    assert all(len(r["speedup_by_round"]) == 1 for r in results["throughput"][1:])
    # every exact method trains the same model on the same batches: the same losses (up to
    # float summation order over micro-batches, which Adam amplifies a little)
    by = {r["method"]: r for r in results["throughput"]}
    assert len(single["losses"]) == 3
    for name in ("gpipe-m2", "gpipe-m4", "1f1b-m2", "1f1b-m4", "zbv-m4", "backprop"):
        assert by[name]["losses"] == pytest.approx(single["losses"], rel=2e-3), name
        # ... and end with the same parameters: every stage of every rank trained
        assert by[name]["param_checksum"] == pytest.approx(single["param_checksum"], rel=1e-5), name
    assert by["dni"]["param_checksum"] != pytest.approx(single["param_checksum"], rel=1e-5)
    # the ceilings: each variant's stages alone on both ranks, computing but never communicating
    for name in ("dni-alone", "cdni-lowrank8-alone"):
        row = by[name]
        assert row["family"] == "ceiling" and row["schedule"] == "alone" and row["ranks"] == 2
        r0, r1 = row["per_rank"]
        for rank in (r0, r1):
            assert rank["forward_s"] > 0 and rank["backward_s"] > 0 and rank["update_s"] > 0
            assert rank["send_s"] == rank["recv_s"] == rank["wait_s"] == 0
        assert r0["synth_s"] > 0 and r1["synth_s"] == 0  # the synthesizer lives in front of the boundary
    assert "(ceiling)" in by["dni-alone"]["label"] and "DNI (linear)" in by["dni-alone"]["label"]
    assert "of its no-transfer ceiling" in stdout
    assert not {v["name"] for v in results["validation"]} & {"dni-alone", "cdni-lowrank8-alone"}
    assert results["sweep"]["best_microbatches"].keys() == {"gpipe", "1f1b", "zbv"}
    assert sum(r["best_in_sweep"] for r in results["throughput"]) == 3
    assert {v["name"] for v in results["validation"]} >= {"single", "gpipe-m2", "1f1b-m4", "backprop", "dni"}
    assert {r["devices"] for r in results["simulation"]} == {2, 4}
    for row in results["convergence"]:
        assert row["error"] is None, row.get("error_detail")
        assert set(CONVERGENCE_KEYS) <= set(row)
        # 2 epochs, 2 evaluations each (480 training examples: 7 batches of 64, in parts of 3 and 4)
        assert [p["epoch"] for p in row["curve"]] == [0, 0.5, 1.0, 1.5, 2.0] and row["curve"][0]["time"] == 0.0
        assert [p["steps"] for p in row["curve"]] == [0, 3, 7, 10, 14]
        assert 0.0 <= row["final_accuracy"] <= 1.0
        assert len(row["peak_rss_mb"]) == row["ranks"]
    by_conv = {r["method"]: r for r in results["convergence"]}
    assert set(by_conv) == {
        "single", "backprop", "cdni-lowrank8", "delayed-predict", "interlocking"} | {
        f"{s}-m{results['sweep']['best_microbatches'][s]}" for s in ("gpipe", "1f1b")}
    single_conv = by_conv["single"]
    target = single_conv["final_accuracy"] - 0.01  # the default target: backprop's final minus 1 point
    assert results["conv_target"] == pytest.approx(target)
    assert all(r["target_accuracy"] == pytest.approx(target) for r in results["convergence"])
    assert single_conv["time_to_target_s"] is not None  # its own final accuracy is above its target
    # (a ratio needs a time above 0: a tiny model may sit at its target before the first step)
    assert single_conv["speedup_vs_single"] == (pytest.approx(1.0) if single_conv["time_to_target_s"] else None)
    assert by_conv["delayed-predict"]["label"] == "synthpipe delayed gradients (staleness=predict)"
    assert f"**Target: {100 * target:.1f}% test accuracy**" in stdout
    assert set(results["timelines"]["dni"][0]) == {"rank", "origin", "segments"}
    assert results["timelines"]["dni"][1]["segments"], "rank 1 recorded no sections"

    with open(out / "throughput.csv") as f:
        header = next(csv.reader(f))
    for col in ("method", "samples_per_s", "speedup", "busy_fraction_r0", "wait_fraction_r1", "peak_rss_mb_r1"):
        assert col in header
    profile = json.loads((out / "profile.json").read_text())
    for key in ("version", "single", "transfer", "synth_s", "message_s", "pp_message_s", "op_overhead_s",
                "microbatch", "runs"):
        assert key in profile, key


def test_a_torch_schedule_no_micro_batch_count_can_run_is_named_in_a_warning():
    from synthpipe.benchmark.bench import throughput_jobs, unusable_schedules
    from synthpipe.benchmark.config import quick_config

    cfg = quick_config(ranks=4)  # quick sweeps m in {2, 4}; ZB-V needs m >= 2 x ranks = 8
    assert unusable_schedules(cfg) == ["torch schedule zbv is skipped: it takes none of the micro-batch counts "
                                       "2, 4 on 4 ranks with batch 256 (it needs at least 8)"]
    assert not any(j.name.startswith("zbv") for j in throughput_jobs(cfg))  # (the warning says why no row)
    assert unusable_schedules(quick_config()) == []  # 2 ranks: zbv runs at m=4


def test_stages_below_ranks_adds_dp_x_pp_synthpipe_jobs_and_ddp_at_the_same_global_batch(tmp_path):
    import torch

    from synthpipe.benchmark.bench import throughput_jobs
    from synthpipe.benchmark.config import BenchConfig, BenchConfigError
    from synthpipe.benchmark.methods import replica_batches

    cfg = BenchConfig(ranks=4, stages=2, output=str(tmp_path)).validate()
    jobs = {j.name: j for j in throughput_jobs(cfg)}
    assert jobs["cdni-dp2xpp2"].stages == 2 and jobs["cdni-dp2xpp2"].dp == 2 and jobs["cdni-dp2xpp2"].ranks == 4
    assert jobs["backprop-dp2xpp2"].dp == 2 and jobs["cdni"].dp == 1 and jobs["cdni"].ranks == 4
    assert jobs["ddp"].method == "ddp" and jobs["ddp"].dp == 4
    assert all(j.workload.batch == cfg.workload.batch for j in jobs.values())  # one global batch for all
    with pytest.raises(BenchConfigError, match="4 is not a multiple of --stages 3"):
        BenchConfig(ranks=4, stages=3, output=str(tmp_path)).validate({"ranks": "--ranks", "stages": "--stages"})
    x, y = torch.arange(8.0)[:, None], torch.arange(8)
    shares = replica_batches([(x, y)], 2)
    assert [s[1].tolist() for s in shares] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # pipeline d takes chunk d


def test_time_to_accuracy_sources_parse_by_name_and_refuse_unknown_ones() -> None:
    from synthpipe.benchmark.config import Source

    assert Source.parse("delayed:predict") == Source("delayed", staleness="predict")
    assert Source.parse("delayed:predict").name == "delayed-predict"
    assert Source.parse("local:mlp").name == "local-mlp" and Source.parse("interlocking").aux_head == "linear"
    cdni = Source.parse("cdni:lowrank:8")
    assert cdni.gradients == "synthetic" and cdni.variant is not None and cdni.name == "cdni-lowrank8"
    assert Source.parse("corrected:predict") == Source("corrected", staleness="predict")
    from synthpipe.benchmark.bench import converge_jobs
    from synthpipe.benchmark.config import BenchConfig
    jobs = {j.name: j for j in converge_jobs(BenchConfig(conv_sources=[Source.parse("corrected")]), {})}
    corrected = jobs["corrected"]  # steps on a conditional linear synthesizer, as the cDNI default does
    assert (corrected.gradients, corrected.synth, corrected.conditional) == ("corrected", "linear", True)
    assert "corrected synthetic gradients" in corrected.label()
    for bad, message in (("delayed:nesterov", "staleness correction is one of lr, predict"),
                         ("corrected:nesterov", "corrected's staleness correction is one of lr, predict"),
                         ("local:conv", "the auxiliary head is one of linear, mlp"),
                         ("pipedream", "unknown gradient source 'pipedream'")):
        with pytest.raises(ValueError, match=message):
            Source.parse(bad)


def test_epoch_parts_split_an_epoch_in_order_without_losing_a_batch() -> None:
    from synthpipe.benchmark.job import epoch_parts

    batches = list(range(7))
    assert epoch_parts(batches, 2) == [[0, 1, 2], [3, 4, 5, 6]]
    assert epoch_parts(batches, 1) == [batches]
    assert epoch_parts(batches[:2], 5) == [[0], [1]]  # never an empty part


def test_the_target_is_backprop_s_final_accuracy_minus_the_margin_and_ratios_are_to_the_same_run() -> None:
    from synthpipe.benchmark.bench import set_target

    def row(name, family, schedule, points):
        curve = [{"time": t, "epoch": i, "steps": 10 * i, "accuracy": a} for i, (t, a) in enumerate(points)]
        return {"method": name, "family": family, "schedule": schedule, "final_accuracy": curve[-1]["accuracy"],
                "curve": curve, "error": None}

    rows = [row("single", "baseline", "single", [(0, 0.1), (10, 0.70), (20, 0.80)]),
            row("1f1b-m4", "torch.distributed.pipelining", "1f1b", [(0, 0.1), (8, 0.70), (16, 0.80)]),
            row("gpipe-m4", "torch.distributed.pipelining", "gpipe", [(0, 0.1), (9, 0.72), (18, 0.795)]),
            row("delayed-predict", "synthpipe", "delayed", [(0, 0.1), (5, 0.79), (10, 0.81)]),
            row("cdni", "synthpipe", "dni", [(0, 0.1), (5, 0.5), (10, 0.6)]),
            {"method": "local", "error": "RuntimeError: boom"}]
    assert set_target(rows, None, 0.01) == pytest.approx(0.79)
    by = {r["method"]: r for r in rows}
    assert by["single"]["time_to_target_s"] == 20 and by["single"]["speedup_vs_single"] == 1.0
    assert by["gpipe-m4"]["time_to_target_s"] == 18  # 0.795 >= 0.79; the best torch schedule: 16 s (1f1b)
    assert by["delayed-predict"]["time_to_target_s"] == 5 and by["delayed-predict"]["steps_to_target"] == 10
    assert by["delayed-predict"]["speedup_vs_single"] == pytest.approx(4.0)
    assert by["delayed-predict"]["speedup_vs_torch"] == pytest.approx(16 / 5)
    assert by["cdni"]["time_to_target_s"] is None and by["cdni"]["speedup_vs_single"] is None
    assert "time_to_target_s" not in by["local"]  # a failed row is left as it is
    assert set_target(rows, 0.6, 0.01) == 0.6 and by["cdni"]["epochs_to_target"] == 2  # a given target wins
    assert set_target(rows[1:], None, 0.01) is None  # no single-device row: no default target


@pytest.mark.timeout(240)
def test_the_forward_unlocking_benchmark_measures_every_row(tmp_path) -> None:
    """benchmarks/forward_unlock.py --quick on 3 gloo ranks: every method and stall scenario, each figure taken."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parent.parent / "benchmarks" / "forward_unlock.py"
    out = tmp_path / "unlock.json"
    done = subprocess.run([sys.executable, str(script), "--quick", "--json", str(out)], capture_output=True,
                          text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| cDNI + synthetic inputs |" in done.stdout
    rows = json.loads(out.read_text())
    scenarios = ("none", "intermittent", "persistent")
    assert sorted(rows) == sorted(f"{m}/{s}" for m in ("cdni", "inputs") for s in scenarios)
    for row in rows.values():
        assert set(row) == {"fill_ms", "latency_ms", "step_ms"} and all(v > 0 for v in row.values()), row


# -- benchmarks/per_step.py ------------------------------------------------------------------
def _per_step_script():
    import importlib.util
    import sys

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "per_step.py")
    spec = importlib.util.spec_from_file_location("per_step", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["per_step"] = module  # (its dataclass looks its module up there)
    spec.loader.exec_module(module)
    return module


def test_per_step_differences_are_paired_by_seed_and_marks_use_the_best_source() -> None:
    ps = _per_step_script()

    def r(source, seed, acc, stages=2):
        return {"workload": "paper", "source": source, "stages": stages, "seed": seed, "accuracy": acc,
                "steps": 10, "seconds": 1.0}

    results = [r("backprop", 0, 0.60), r("backprop", 1, 0.70), r("cdni", 0, 0.57), r("cdni", 1, 0.69),
               r("delayed", 0, 0.605), r("delayed", 1, 0.69), r("backprop", 0, 0.1, stages=3)]
    rows = {row["source"]: row for row in ps.summarize(results, "paper", 2, ["backprop", "cdni", "delayed"])}
    assert rows["backprop"]["mean"] == pytest.approx(65.0) and rows["backprop"]["mean_diff"] == pytest.approx(0.0)
    assert rows["cdni"]["diffs"] == pytest.approx([-3.0, -1.0]) and rows["cdni"]["mean_diff"] == pytest.approx(-2.0)
    assert (rows["delayed"]["min"], rows["delayed"]["max"]) == pytest.approx((60.5, 69.0))
    mk = ps.marks(list(rows.values()))
    assert mk["best"] == "delayed" and mk["best_diff"] == pytest.approx(-0.25) and mk["best_within_1"]
    assert mk["cdni_within_2"] and ps.marks([rows["backprop"], dict(rows["cdni"], mean_diff=-2.01)])[
        "cdni_within_2"] is False
    warm = dict(rows["cdni"], source="cdni:warmup", mean_diff=+1.0)  # locked in its first steps: never "best"
    assert ps.marks([*rows.values(), warm])["best"] == "delayed"


def test_per_step_quick_runs_every_source_for_backprop_s_steps(tmp_path, capsys) -> None:
    ps = _per_step_script()
    out = tmp_path / "per_step.json"
    assert ps.main(["--quick", "--workloads", "paper", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert sorted(r["source"] for r in results) == sorted(ps.SOURCES)
    assert {(r["stages"], r["seed"], r["steps"]) for r in results} == {(2, 0, 7)}  # 800 training samples, batch 128
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in results)
    text = capsys.readouterr().out
    assert "paper_mlp() (the DNI paper's MLP)" in text and "cDNI within 2 points:" in text


def test_per_step_cuts_whole_layers_by_default_and_child_by_child_on_request() -> None:
    import torch.nn as nn

    from synthpipe import models

    ps = _per_step_script()
    for n in (2, 3, 4):
        stages = ps.split(models.wide_mlp(hidden=64, depth=4), n, "layers")
        assert len(stages) == n
        assert all(isinstance(list(s.children())[-1], nn.ReLU) for s in stages[:-1])
    paper = ps.split(models.paper_mlp(), 4, "params")  # (the child-by-child balance cuts before a BatchNorm)
    assert any(isinstance(list(s.children())[0], nn.BatchNorm1d) for s in paper[1:])


@pytest.mark.timeout(180)
def test_the_transformer_benchmark_s_quick_run_reports_every_source_and_the_wall_clock_race() -> None:
    """``benchmarks/transformer.py --quick``: a row per method with a finite loss, then the 2-rank race."""
    import math
    import re
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "transformer.py")
    done = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    sys.path.insert(0, os.path.dirname(script))
    try:
        from transformer import SOURCES  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| (.+?) \| (\d+\.\d+) \| \d", done.stdout, re.M)}
    expected = ["backprop", "stage 0 frozen", *[label for label, _, _ in SOURCES]]
    assert [k for k in rows if k in expected] == expected, done.stdout
    assert all(math.isfinite(rows[k]) and 0 < rows[k] < 10 for k in expected)
    assert "| backprop, 1 process x 1 thread |" in done.stdout and ", 2 ranks x 1 thread |" in done.stdout
