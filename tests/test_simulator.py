"""The discrete-event schedule simulator on cases that can be computed by hand."""
from __future__ import annotations

import json
import math
import re

import pytest

from synthpipe.benchmark import profiles
from synthpipe.benchmark import simulator as sim
from synthpipe.benchmark.cli import add_simulate_arguments, run_simulate
from synthpipe.benchmark.simulator import StageCost, Transfer, simulate


def equal(p: int, f: float = 1.0, b: float = 2.0, **kw: float) -> list[StageCost]:
    return [StageCost(forward=f, backward=b, **kw) for _ in range(p)]


@pytest.mark.parametrize("p,m", [(2, 1), (2, 4), (3, 5), (4, 8), (8, 16)])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_flushed_pipelines_have_the_textbook_bubble(schedule: str, p: int, m: int) -> None:
    pred = simulate(schedule, equal(p), microbatches=m)
    # (m + p - 1) slots of one micro-batch's forward + backward
    assert pred.step_s == pytest.approx((m + p - 1) * 3.0 / m)
    assert pred.bubble == pytest.approx((p - 1) / (m + p - 1))
    assert pred.busy_s == pytest.approx([3.0] * p)


def test_transfer_adds_two_latencies_per_boundary_to_gpipe() -> None:
    p, m, t = 3, 4, 0.1
    pred = simulate("gpipe", equal(p), microbatches=m, transfer=t)
    assert pred.step_s == pytest.approx((m + p - 1) * 3.0 / m + 2 * (p - 1) * t)


def test_transfer_may_depend_on_the_micro_batch_count() -> None:
    pred = simulate("gpipe", equal(2), microbatches=4, transfer=lambda m: 0.4 / m)
    assert pred.step_s == pytest.approx(5 * 3.0 / 4 + 2 * 0.1)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_dni_speedup_equals_devices_for_balanced_free_stages(n: int) -> None:
    single = simulate("single", equal(n, f=1.0 / n, b=2.0 / n)).step_s
    dni = simulate("dni", equal(n, f=1.0 / n, b=2.0 / n))
    assert single == pytest.approx(3.0)
    assert single / dni.step_s == pytest.approx(n)
    assert dni.bubble == pytest.approx(0.0, abs=1e-9)


def test_dni_throughput_is_set_by_the_slowest_stage() -> None:
    stages = [StageCost(1.0, 1.0, update=0.5, synth=0.7, comm=0.1, other=0.2),
              StageCost(1.5, 2.0, update=0.5, comm=0.1),
              StageCost(0.5, 0.5)]
    pred = simulate("dni", stages, transfer=0.05)
    assert pred.step_s == pytest.approx(max(s.total for s in stages))
    assert pred.busy_s == pytest.approx([s.total for s in stages])


def test_dni_max_inflight_one_waits_for_every_target() -> None:
    # rank 0: F=1, backward=1; rank 1: F=1, backward=1; no synthesizer, no latency.
    # With one target in flight rank 0 must wait for rank 1's backward of the same step:
    # the step is F0 + F1 + B1 = 3 instead of max(F+B) = 2.
    assert simulate("dni", equal(2, 1.0, 1.0), max_inflight=1).step_s == pytest.approx(3.0)
    assert simulate("dni", equal(2, 1.0, 1.0), max_inflight=4).step_s == pytest.approx(2.0)


def test_backprop_is_sequential_with_transfers() -> None:
    p, t = 3, 0.25
    stages = equal(p, 1.0, 2.0, update=0.5)
    pred = simulate("backprop", stages, transfer=t)
    # forwards down, backwards up; each rank sends its gradient before updating, so only
    # rank 0's update (the last op before the next forward) is on the critical path
    assert pred.step_s == pytest.approx(p * 3.0 + 0.5 + 2 * (p - 1) * t)
    assert simulate("single", stages).step_s == pytest.approx(p * 3.5)


def test_zero_bubble_fills_the_bubble_with_weight_gradients() -> None:
    for p, m in [(2, 4), (4, 4), (4, 8)]:
        zb = simulate("zb", equal(p), microbatches=m)
        one = simulate("1f1b", equal(p), microbatches=m)
        assert zb.step_s < one.step_s
        assert zb.bubble < one.bubble
        assert zb.step_s >= 3.0 - 1e-9  # never faster than the work of one device
    # Without a weight-gradient part there is nothing to defer: zero bubble = 1F1B
    flat = [StageCost(1.0, 2.0, weight_fraction=0.0) for _ in range(4)]
    assert simulate("zb", flat, microbatches=8).step_s == pytest.approx(simulate("1f1b", flat, microbatches=8).step_s)


def test_updates_sit_at_the_flush() -> None:
    p, m = 2, 4
    pred = simulate("1f1b", equal(p, update=0.5), microbatches=m)
    assert pred.step_s == pytest.approx((m + p - 1) * 3.0 / m + 0.5)


def test_unknown_schedule_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown schedule"):
        simulate("interleaved", equal(2))


def test_transfer_fit_recovers_a_line() -> None:
    tr = Transfer.fit([(0, 1e-4), (1e6, 1e-4 + 1e-3), (2e6, 1e-4 + 2e-3)])
    assert tr.latency == pytest.approx(1e-4)
    assert tr(5e5) == pytest.approx(1e-4 + 5e-4)
    assert Transfer.fit([]).latency == 0.0
    assert Transfer.fit([(100, 0.01)])(1e9) == pytest.approx(0.01)


def profile(**overrides: object) -> dict:
    p = {
        "version": profiles.PROFILE_VERSION, "workload": {"batch": 256, "model": "deep_mlp"},
        "machine": {"device_names": ["cpu"], "ranks": 2, "threads_per_rank": 1, "torch": "x"},
        "single": {"step_s": 3.0, "forward_s": 1.0, "backward_s": 2.0, "update_s": 0.0, "other_s": 0.0},
        "boundary_bytes": 1 << 20, "transfer": [], "synth_s": {"cdni": 0.0}, "message_s": 0.0,
        "pp_message_s": 0.0, "op_overhead_s": 0.0, "step_overhead_s": 0.0, "max_inflight": 4, "runs": [],
    }
    p.update(overrides)
    return p


def test_predicted_table_from_a_free_profile() -> None:
    rows = sim.predict_table(profile(), devices=[2, 4, 8, 16])
    for n in (2, 4, 8, 16):
        by = {r["method"]: r for r in rows if r["devices"] == n}
        assert by["single"]["speedup"] == pytest.approx(1.0)
        assert by["cdni"]["speedup"] == pytest.approx(n)
        assert by["backprop"]["speedup"] == pytest.approx(1.0)
        # the largest micro-batch count wins when micro-batches cost nothing extra
        assert by["gpipe"]["microbatches"] == 64
        assert by["gpipe"]["bubble"] == pytest.approx((n - 1) / (64 + n - 1))
        assert by["zb"]["speedup"] >= by["1f1b"]["speedup"] - 1e-9


def test_synthesizer_cost_caps_dni_scaling() -> None:
    rows = sim.predict_table(profile(synth_s={"cdni": 0.5}), devices=[2, 16])
    by = {(r["devices"], r["method"]): r for r in rows}
    assert by[(2, "cdni")]["step_s"] == pytest.approx(1.5 + 0.5)
    assert by[(16, "cdni")]["step_s"] == pytest.approx(3.0 / 16 + 0.5)


def test_micro_batch_costs_come_from_the_measured_chunks() -> None:
    p = profile(microbatch=[{"m": 2, "forward_s": 0.6, "backward_s": 1.2},
                            {"m": 4, "forward_s": 0.35, "backward_s": 0.7}])
    assert sim.model_chunk(p, 2) == (0.6, 1.2)
    f8, b8 = sim.model_chunk(p, 8)  # fitted a + c/m through m = 1, 2, 4
    assert 0.125 < f8 < 0.35 and 0.25 < b8 < 0.7
    stages = sim.scaled_stages(p, 2, "gpipe", microbatches=4)
    assert stages[0].forward == pytest.approx(4 * 0.35 / 2)
    assert stages[0].backward == pytest.approx(4 * 0.7 / 2)


def test_validation_compares_runs_with_their_prediction() -> None:
    run = {"name": "cdni", "schedule": "dni", "ranks": 2, "microbatches": 1, "max_inflight": 4,
           "measured_step_s": 2.2,
           "stages": [{"forward_s": 1.0, "backward_s": 1.0, "synth_s": 0.2}, {"forward_s": 1.0, "backward_s": 1.0}]}
    gp = {"name": "gpipe-m4", "schedule": "gpipe", "ranks": 2, "microbatches": 4, "measured_step_s": 10.0,
          "stages": [{"forward_s": 1.0, "backward_s": 2.0}, {"forward_s": 1.0, "backward_s": 2.0}]}
    zbv = dict(gp, name="zbv-m4", schedule="zbv")
    rows = sim.validate(profile(runs=[run, gp, zbv]))
    assert [r["name"] for r in rows] == ["cdni", "gpipe-m4"]  # ZB-V is not modelled
    assert rows[0]["predicted_step_s"] == pytest.approx(2.2)
    assert rows[0]["error"] == pytest.approx(0.0) and rows[0]["within_15pct"]
    assert rows[1]["predicted_step_s"] == pytest.approx(3.75)
    assert not rows[1]["within_15pct"]


def test_simulate_command_prints_the_table(tmp_path, capsys) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile()))
    import argparse
    parser = add_simulate_arguments(argparse.ArgumentParser())
    assert run_simulate(parser.parse_args(["--profile", str(path), "--devices", "2,4"])) == 0
    out = capsys.readouterr().out
    assert "| cdni | 2.00x" in out and "4 devices" in out
    assert run_simulate(parser.parse_args(["--profile", str(path), "--devices", "2", "--json"])) == 0
    rows = json.loads(capsys.readouterr().out)["simulation"]
    assert {r["method"] for r in rows} >= {"single", "backprop", "gpipe", "1f1b", "zb", "cdni"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 99}))
    assert run_simulate(parser.parse_args(["--profile", str(bad)])) == 2


def test_engine_scales_to_sixteen_devices_quickly() -> None:
    import time
    t0 = time.perf_counter()
    pred = simulate("zb", equal(16, 1 / 16, 2 / 16), microbatches=32)
    assert time.perf_counter() - t0 < 10
    assert not math.isnan(pred.step_s)


# -- bad input: one line naming the option, or the file and the key; exit code 2 ----------------
def _write(tmp_path, name: str, data: object) -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


_MISSING = object()


def _with(key: str, value: object, **where: object) -> dict:
    """profile(**where) with ``key`` (dotted) set to ``value``, or removed for _MISSING."""
    p = profile(**where)
    target = p
    *parents, last = key.split(".")
    for k in parents:
        target = target[k]
    if value is _MISSING:
        del target[last]
    else:
        target[last] = value
    return p


@pytest.mark.parametrize("data,message", [
    ("{oops", ": not valid JSON (Expecting property name enclosed in double quotes at line 1, column 2)"),
    ([1, 2], ": the file must be a JSON object; got list"),
    ({"version": 1, "profile": {}, "throughput": []}, ": this is a results.json; pass the profile.json next to it"),
    (_with("version", _MISSING), ": missing key 'version'"),
    (_with("version", 99), ": profile version 99; this simulator reads version 1"),
    (_with("single", _MISSING), ": missing key 'single': no single-device measurement"),
    (_with("single.update_s", _MISSING), ": missing key 'single.update_s'"),
    (_with("single.forward_s", -1.0), ": 'single.forward_s' must be a finite number >= 0; got -1.0"),
    (_with("single.backward_s", "2"), ": 'single.backward_s' must be a finite number >= 0; got '2'"),
    (_with("single", {"forward_s": 0, "backward_s": 0, "update_s": 0}), ": 'single' has a step time of 0"),
    (_with("message_s", None), ": 'message_s' must be a finite number >= 0; got None"),
    (_with("workload.batch", 0), ": 'workload.batch' must be a whole number >= 1; got 0"),
    (_with("synth_s", {"cdni": -0.5}), ": 'synth_s.cdni' must be a finite number >= 0; got -0.5"),
    (_with("transfer", [{"bytes": 10}]), ": missing key 'transfer[0].one_way_s'"),
    (_with("weight_fraction", 2.0), ": 'weight_fraction' must be in [0, 1]; got 2.0"),
    (_with("runs", [{"name": "a", "schedule": "gpipe", "measured_step_s": 1.0, "stages": []}]),
     ": 'runs[0].stages' is empty"),
    (_with("runs", {"a": 1}), ": 'runs' must be a JSON list; got dict"),
])
def test_unusable_profiles_are_refused_naming_the_file_and_the_key(tmp_path, capsys, data, message) -> None:
    from synthpipe.launch.cli import main

    path = _write(tmp_path, "profile.json", data)
    with pytest.raises(profiles.ProfileError, match="^" + re.escape(path + message)):
        profiles.load_profile(path)
    assert main(["simulate", "--profile", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"synthpipe simulate: error: --profile {path}{message}") and err.count("\n") == 1, err


def test_nan_times_in_a_profile_are_refused(tmp_path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile()).replace('"forward_s": 1.0', '"forward_s": NaN'))
    with pytest.raises(profiles.ProfileError, match="'single.forward_s' must be a finite number >= 0; got nan"):
        profiles.load_profile(str(path))


@pytest.mark.parametrize("argv,message", [
    (["--profile", "{dir}/missing.json"], "--profile {dir}/missing.json: no such file"),
    (["--profile", "{dir}"], "--profile {dir} is a directory; pass the profile.json in it"),
    (["--profile", "{good}", "--devices", "0"], "--devices: device counts must be whole numbers from 1 to 256; got 0"),
    (["--profile", "{good}", "--devices", "-2"], "--devices: device counts must be whole numbers from 1 to 256; "
                                                 "got -2"),
    (["--profile", "{good}", "--devices", "1000"], "from 1 to 256; got 1000"),
    (["--profile", "{good}", "--devices", ""], "--devices must list at least one device count"),
    (["--profile", "{good}", "--devices", "2,x"], "argument --devices: expected comma-separated whole numbers"),
    (["--profile", "{good}", "--microbatches", "0"], "--microbatches: micro-batch counts must be whole numbers"),
    (["--profile", "{good}", "--microbatches", "3"], "--microbatches: 3 does not divide the profile's batch of 256"),
    (["--profile", "{good}", "--microbatches", ""], "--microbatches must list at least one micro-batch count"),
])
def test_simulate_refuses_bad_options_in_one_line(tmp_path, capsys, argv, message) -> None:
    from synthpipe.benchmark.cli import main

    good = _write(tmp_path, "good.json", profile())
    fill = {"dir": str(tmp_path), "good": good}
    code = None
    try:
        code = main(["simulate", *[a.format(**fill) for a in argv]])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message.format(**fill) in err.splitlines()[-1], err
    assert "Traceback" not in err and capsys.readouterr().out == ""


def test_predictions_refuse_device_and_micro_batch_counts_out_of_range() -> None:
    with pytest.raises(ValueError, match="from 1 to 256; got 0"):
        sim.predict_table(profile(), devices=[0])
    with pytest.raises(ValueError, match="from 1 to 256; got 1000"):
        sim.predict_table(profile(), devices=[2, 1000])
    with pytest.raises(ValueError, match="3 does not divide the profile's batch of 256"):
        sim.predict_table(profile(), devices=[2], microbatches=[3])
    assert {r["devices"] for r in sim.predict_table(profile(), devices=[1, 2])} == {1, 2}


# -- data parallel x pipeline parallel ------------------------------------------------------------

def test_ring_all_reduce_moves_two_n_minus_one_over_n_of_the_bytes() -> None:
    ring = sim.RingAllReduce(bandwidth=1e9, latency=1e-5)
    assert ring(1e9, 4) == pytest.approx(2 * 3 / 4 + 6e-5)
    assert ring(1e9, 1) == 0.0
    assert sim.layouts(4) == [(4, 1), (2, 2), (1, 4)]


def test_layouts_split_the_global_batch_and_pay_the_all_reduce_on_the_critical_path() -> None:
    p, ring, nbytes = profile(), sim.RingAllReduce(bandwidth=1e8, latency=0.0), 4e7  # 0.4 s for all of it at dp 2
    ddp, reduce_s = sim.predict_layout(p, 4, 1, "single", ring, nbytes)
    assert reduce_s == pytest.approx(2 * 3 / 4 * 0.4)
    assert ddp.step_s == pytest.approx(1.0 / 4 + 2.0 / 4 + reduce_s)  # a quarter of the batch per replica
    dni, reduce_s = sim.predict_layout(p, 2, 2, "dni", ring, nbytes)
    assert reduce_s == pytest.approx(2 * 1 / 2 * 0.2)  # each stage averages half the model over 2 replicas
    assert dni.step_s == pytest.approx(1.0 / 4 + 2.0 / 4 + reduce_s)  # half the batch on half the model
    rows = sim.predict_layouts(p, [4], ring, nbytes)
    assert {(r["layout"], r["method"]) for r in rows} >= {("dp4xpp1", "ddp"), ("dp2xpp2", "dni"),
                                                          ("dp2xpp2", "1f1b"), ("dp1xpp4", "dni")}
    free = {r["layout"]: r for r in sim.predict_layouts(p, [4], sim.RingAllReduce(1e30, 0.0), nbytes)
            if r["method"] in ("ddp", "dni")}
    assert all(r["speedup"] == pytest.approx(4.0) for r in free.values()), free  # no cost: every layout x4


def test_simulate_command_predicts_layouts_with_the_stated_bandwidth(tmp_path, capsys) -> None:
    import argparse
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile(param_bytes=8 << 20)))
    parser = add_simulate_arguments(argparse.ArgumentParser())
    args = ["--profile", str(path), "--devices", "4", "--layouts", "--bandwidth", "2.5", "--latency-us", "5"]
    assert run_simulate(parser.parse_args(args)) == 0
    out = capsys.readouterr().out
    assert "8.0 MiB of gradients; ring all-reduce, 2.5 GB/s per link, 5 us per step" in out
    assert "| 4 | dp2xpp2 | dni |" in out and "| 4 | dp4xpp1 | ddp |" in out


# -- forward unlocking (dni-inputs): fill time, run-ahead bound, stragglers ------------------
def _updates(events: list, schedule: str, p: int) -> list[list[float]]:
    return [sim.update_times(events, schedule, r) for r in range(p)]


@pytest.mark.parametrize("p", [2, 4, 8])
def test_forward_unlocking_fills_in_one_hop_not_a_chain_of_forwards(p: int) -> None:
    stages = equal(p, 1.0, 2.0)
    ev = sim.trace("dni-inputs", stages)
    # every rank's first update is its own predicted step: forward + backward = 3, no wait
    assert [u[0] for u in _updates(ev, "dni-inputs", p)] == pytest.approx([3.0] * p)
    # the data crosses once, from rank 0 to each rank, whatever the depth
    ev = sim.trace("dni-inputs", stages, transfer=0.25, data_transfer=0.5)
    assert [u[0] for u in _updates(ev, "dni-inputs", p)] == pytest.approx([3.0] + [3.5] * (p - 1))
    # plain DNI: the last rank's first update waits for the p - 1 forwards above it
    ev = sim.trace("dni", stages)
    assert _updates(ev, "dni", p)[-1][0] == pytest.approx((p - 1) * 1.0 + 3.0)
    # the engine sizes I_r from the first real input: the first step then waits the whole chain
    ev = sim.trace("dni-inputs", stages, first_real=True)
    last = _updates(ev, "dni-inputs", p)[-1][0]
    assert last > (p - 1) * 1.0 + 3.0 - 1e-9


def test_forward_unlocking_costs_a_second_forward_and_an_input_backward() -> None:
    # rank r > 0: predicted forward + backward + update (1 + 2 + 0.5) and the real forward
    # + input-only backward (1 + 2 * (1 - 0.25)) + input synthesizer (0.4) + comm (0.2)
    stages = [StageCost(1.0, 2.0, update=0.5, comm=0.2, weight_fraction=0.25, input_synth=0.4) for _ in range(3)]
    pred = simulate("dni-inputs", stages)
    per_rank = 3.5 + 2.5 + 0.4 + 0.2
    assert pred.step_s == pytest.approx(per_rank)
    assert pred.busy_s[1:] == pytest.approx([per_rank, per_rank])
    assert pred.busy_s[0] == pytest.approx(stages[0].total)  # rank 0 works as in dni


@pytest.mark.parametrize("lag", [0, 1, 2, 4])
def test_predicted_steps_never_run_more_than_lag_ahead_of_the_real_chain(lag: int) -> None:
    p = 4
    # rank 1 three times slower: the real chain of ranks 2 and 3 waits for it, their
    # predicted steps would run away without the bound
    ev = sim.trace("dni-inputs", equal(p), steps=30, lag=lag, slowdown=sim.straggler(1, 3.0))
    for r in range(2, p):
        real_done = sorted(e.finish for e in ev if e.rank == r and e.kind == "R")
        ahead = [e.step - sum(f <= e.start + 1e-12 for f in real_done)
                 for e in ev if e.rank == r and e.kind == "P"]
        assert max(ahead) <= lag
        if r == p - 1:  # (no synthesizer to wait for on the last rank: the bound is what binds)
            assert max(ahead) == lag
    with pytest.raises(ValueError, match="lag must be a whole number >= 0"):
        simulate("dni-inputs", equal(2), lag=-1)


@pytest.mark.parametrize("schedule", ["dni", "dni-inputs"])
def test_a_persistent_straggler_bounds_the_step_at_its_own_work(schedule: str) -> None:
    p = 4
    base = simulate(schedule, equal(p), steps=48)
    slow = simulate(schedule, equal(p), steps=48, slowdown=sim.straggler(1, 2.0))
    # every rank does the same work; the real chain must pass through rank 1 every step
    assert slow.step_s == pytest.approx(2.0 * base.step_s)
    assert slow.busy_s[1] == pytest.approx(2.0 * base.busy_s[1])


@pytest.mark.parametrize("schedule", ["dni", "dni-inputs"])
def test_an_intermittent_straggler_costs_only_its_own_extra_work_with_slack(schedule: str) -> None:
    p, every, f = 4, 8, 3.0
    base = simulate(schedule, equal(p), steps=48).step_s
    # rank 1 three times slower in one step of 8: it does (7 + 3) / 8 of its work per step
    one = simulate(schedule, equal(p), steps=48, slowdown=sim.straggler(1, f, every)).step_s
    assert one == pytest.approx(base * (every - 1 + f) / every)
    # the same extra work on every rank, each in its own steps, is absorbed the same way
    spread = simulate(schedule, equal(p), steps=48, slowdown=sim.rotating_straggler(f, every)).step_s
    assert spread == pytest.approx(base * (every - 1 + f) / every)
    # with one target in flight a rank waits for the next one's step: the straggles add up
    tight = simulate(schedule, equal(p), steps=48, max_inflight=1, slowdown=sim.rotating_straggler(f, every)).step_s
    assert tight > spread * (1 + 1e-6)


def test_a_flushed_pipeline_pays_every_straggle_in_its_own_step() -> None:
    p, m, every, f = 4, 4, 4, 2.0
    base = simulate("1f1b", equal(p), microbatches=m, steps=8).step_s
    always = simulate("1f1b", equal(p), microbatches=m, steps=8, slowdown=sim.straggler(1, f)).step_s
    once = simulate("1f1b", equal(p), microbatches=m, steps=8, slowdown=sim.straggler(1, f, every)).step_s
    # steps are independent (each flushes): one slow step in `every` costs its own step time
    assert once == pytest.approx(((every - 1) * base + always) / every)
    # a straggle on a different rank in every step: every step is slow
    spread = simulate("1f1b", equal(p), microbatches=m, steps=8, slowdown=sim.rotating_straggler(f, every)).step_s
    assert spread > once * (1 + 1e-6)
    dni = simulate("dni", equal(p), steps=48)
    dni_spread = simulate("dni", equal(p), steps=48, slowdown=sim.rotating_straggler(f, every))
    assert dni_spread.step_s / dni.step_s < spread / base


def test_straggler_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="straggler factor must be a finite number > 0"):
        sim.straggler(1, 0.0)
    with pytest.raises(ValueError, match="straggler every must be a whole number >= 1"):
        sim.rotating_straggler(2.0, 0)
    with pytest.raises(ValueError, match=r"slowdown\(0, 0\) must be a finite number > 0"):
        simulate("dni", equal(2), slowdown=lambda r, k: math.nan)
    with pytest.raises(ValueError, match="max_inflight must be a whole number >= 1"):
        simulate("dni-inputs", equal(2), max_inflight=0)


def test_unlock_table_from_a_free_profile() -> None:
    rows = sim.unlock_table(profile(), devices=[2, 4], factors=[2.0])
    by = {(r["devices"], r["schedule"]): r for r in rows}
    assert {r["schedule"] for r in rows} == set(sim.UNLOCK_METHODS)
    for n in (2, 4):
        dni, unl = by[(n, "dni")], by[(n, "dni-inputs")]
        assert dni["method"] == "cdni" and unl["method"] == "cdni + inputs"
        # stage: forward 1/n, backward 2/n; dni's last rank waits n - 1 forwards first
        assert dni["fill_s"] == pytest.approx((n - 1) / n + 3.0 / n)
        assert unl["fill_s"] == pytest.approx(3.0 / n)
        assert unl["fill_engine_s"] > unl["fill_s"] and dni["fill_engine_s"] is None
        # a second forward and half a backward per step on ranks > 0
        assert unl["step_s"] == pytest.approx(5.0 / n)
        for r in (dni, unl):
            assert r["persistent_2x"] == pytest.approx(2.0)
            assert r["intermittent_2x"] == pytest.approx(9 / 8)
    md = sim.unlock_markdown(rows)
    assert md.count("\n") == len(rows) + 1 and "| 4 | cdni + inputs | 1 | 1250.0 | 750.0 (" in md


def test_simulate_command_prints_the_unlock_table(tmp_path, capsys) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile(input_synth_s=0.0, data_bytes=1024)))
    import argparse
    parser = add_simulate_arguments(argparse.ArgumentParser())
    assert run_simulate(parser.parse_args(["--profile", str(path), "--devices", "2", "--unlock"])) == 0
    out = capsys.readouterr().out
    assert "Forward unlocking" in out and "| 2 | cdni + inputs |" in out
    assert run_simulate(parser.parse_args(["--profile", str(path), "--devices", "2", "--unlock", "--json"])) == 0
    rows = json.loads(capsys.readouterr().out)["unlock"]
    assert [r["schedule"] for r in rows] == list(sim.UNLOCK_METHODS)
    path.write_text(json.dumps(profile(input_synth_s=-1.0)))
    assert run_simulate(parser.parse_args(["--profile", str(path), "--unlock"])) == 2
    assert "'input_synth_s' must be a finite number >= 0" in capsys.readouterr().err
