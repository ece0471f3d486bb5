"""Data parallel x pipeline parallel: dp pipelines of pp stages on a ("dp", "pp") device mesh
(engine/data_parallel.py, engine/sharding.py), on CPU with gloo."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import synthpipe as sp
from synthpipe.engine.data_parallel import (
    layout,
    merge_cache_states,
    merge_replay_states,
    split_cache_state,
    split_replay_state,
)
from synthpipe.engine.reference import evaluate_model
from synthpipe.engine.sharding import shard

from multiprocess import free_port, rank_env, run_ranks
from reference import assert_states_close, plain_backprop

pytestmark = pytest.mark.timeout(240)

DP, PP = 2, 2


def make_model(seed: int = 0) -> nn.Sequential:
    """No BatchNorm: per-replica batch statistics differ from the global batch's by design."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def make_batches(n: int, batch: int = 4, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 6, generator=g), torch.randint(0, 3, (batch,), generator=g)) for _ in range(n)]


def global_batches(batches: list, dp: int = DP) -> list:
    """The global batch of each step: the dp consecutive per-replica batches, concatenated."""
    return [(torch.cat([x for x, _ in batches[i:i + dp]]), torch.cat([y for _, y in batches[i:i + dp]]))
            for i in range(0, len(batches) - len(batches) % dp, dp)]


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def trainer_for(model: nn.Module, **options) -> sp.Trainer:
    options.setdefault("progress", False)
    return sp.Trainer(sp.split(model, balance=[2, 3]), loss_fn=nn.CrossEntropyLoss(), optimizer=adam, **options)


# -- unit: layout, sharding, dp-neutral caches ------------------------------------------------

def test_layout_puts_the_pipeline_innermost_and_refuses_a_world_that_is_not_a_multiple():
    coords = [(lay.dp_rank, lay.pp_rank) for lay in (layout(8, 4, None, r) for r in range(8))]
    assert coords == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert layout(8, 4, None, 6).describe(6) == "rank 6 (dp 1, pp 2)"
    with pytest.raises(ValueError, match="the job has 6 processes but the model has 4 stages"):
        layout(6, 4, None, 0)
    with pytest.raises(ValueError, match="dp=3 pipelines of 2 stages need 6 processes, but the job has 4"):
        layout(4, 2, 3, 0)


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_dataloader_is_sharded_like_distributed_sampler_every_sample_once(shuffle):
    ids = torch.arange(23)
    loader = DataLoader(TensorDataset(ids), batch_size=3, shuffle=shuffle)
    for epoch in range(2):
        shares = []
        for d in range(DP):
            part = shard(loader, DP, d, even=True)
            part.sampler.set_epoch(epoch)
            shares.append([int(i) for (b,) in part for i in b])
        assert len(shares[0]) == len(shares[1]) == 11  # the last 23 % 2 sample is dropped for equal shares
        assert not set(shares[0]) & set(shares[1])
        assert len(set(shares[0]) | set(shares[1])) == 22
        assert len(shard(loader, DP, 0, even=True)) == len(shard(loader, DP, 1, even=True)) == 4
        if shuffle and epoch == 0:
            first = shares
        elif shuffle:
            assert shares != first, "set_epoch changes the shuffle"
    evaluated = [int(i) for d in range(DP) for (b,) in shard(loader, DP, d, even=False) for i in b]
    assert sorted(evaluated) == list(range(23)), "evaluation sees every sample once"


def test_a_list_of_batches_gives_each_replica_every_dp_th_batch():
    batches = list(range(7))
    assert [list(shard(batches, 2, d)) for d in range(2)] == [[0, 2, 4], [1, 3, 5]]
    assert [len(shard(batches, 2, d)) for d in range(2)] == [3, 3]
    assert [list(shard(batches, 2, d, even=False)) for d in range(2)] == [[0, 2, 4, 6], [1, 3, 5]]
    assert list(shard(iter(batches), 3, 2)) == [2, 5]  # a generator: no length needed


def test_target_caches_merge_into_the_global_batch_and_split_back():
    def entry(step, h, y, target):
        return {"step": step, "h": (h,), "y": y, "target": (target,), "skipped": False}
    g = torch.Generator().manual_seed(0)
    per_example = torch.randn(4, 5, generator=g)  # the targets are per-example gradients / batch
    h, y = torch.randn(4, 5, generator=g), torch.arange(4)
    halves = [[entry(3, h[i:i + 2], y[i:i + 2], per_example[i:i + 2] / 2)] for i in (0, 2)]
    merged = merge_cache_states(halves)
    assert torch.equal(merged[0]["h"][0], h) and torch.equal(merged[0]["y"], y)
    assert torch.allclose(merged[0]["target"][0], per_example / 4)
    for d in range(2):
        back = split_cache_state(merged, 2, d)[0]
        assert torch.allclose(back["target"][0], halves[d][0]["target"][0])
        assert torch.equal(back["h"][0], halves[d][0]["h"][0])
    with pytest.raises(ValueError, match="batch of 4, which does not split into 3 equal shares"):
        split_cache_state(merged, 3, 0)


def test_replay_buffers_merge_into_the_global_batch_and_split_back():
    g = torch.Generator().manual_seed(1)
    per_example = [torch.randn(4, 5, generator=g) for _ in range(2)]  # two kept targets, newest first
    h = [torch.randn(4, 5, generator=g) for _ in range(2)]
    halves = [[{"h": (h[k][i:i + 2],), "y": torch.arange(i, i + 2), "target": (per_example[k][i:i + 2] / 2,)}
               for k in range(2)] for i in (0, 2)]
    merged = merge_replay_states(halves)
    assert len(merged) == 2 and set(merged[0]) == {"h", "y", "target"}
    for k in range(2):
        assert torch.equal(merged[k]["h"][0], h[k]) and torch.equal(merged[k]["y"], torch.arange(4))
        assert torch.allclose(merged[k]["target"][0], per_example[k] / 4)
    for d in range(2):
        back = split_replay_state(merged, 2, d)
        for k in range(2):
            assert torch.equal(back[k]["h"][0], halves[d][k]["h"][0])
            assert torch.allclose(back[k]["target"][0], halves[d][k]["target"][0])
    assert merge_replay_states([[], []]) == []
    with pytest.raises(ValueError, match=r"keep \[2, 1\] replayed targets"):
        merge_replay_states([halves[0], halves[1][:1]])


# -- multi-process ----------------------------------------------------------------------------

def fit_transparent(rank: int, batches: list, eval_batches: list) -> dict:
    dp_rank = rank // PP
    # Replica 1 builds other weights: it must start from replica 0's.
    trainer = trainer_for(make_model(seed=0 if dp_rank == 0 else 100 + rank), gradients="backprop")
    assert (trainer.dp, trainer.layout.dp_rank, trainer.layout.pp_rank) == (DP, dp_rank, rank % PP)
    history = trainer.fit(batches)
    metrics = trainer.evaluate(eval_batches)
    state = trainer.state_dict()
    trainer.close()
    return {"state": state, "metrics": metrics, "losses": [s["loss"] for s in history.steps],
            "samples": history.epochs[0]["samples"]}


def test_dp2_pp2_backprop_equals_single_process_training_on_the_global_batch():
    batches, eval_batches = make_batches(8), make_batches(5, seed=2)  # 5: one pipeline evaluates a batch more
    results = run_ranks(fit_transparent, DP * PP, batches, eval_batches)
    expected = plain_backprop(make_model(), global_batches(batches), adam)
    for r in results:
        assert_states_close(r["state"], expected, atol=1e-5)
    assert any(not torch.equal(expected[k], make_model().state_dict()[k]) for k in expected), "nothing trained"
    model = make_model()
    model.load_state_dict(expected)
    truth = evaluate_model(model, eval_batches, "cpu")
    for r in results:
        assert r["metrics"]["samples"] == 20, "evaluation covers the whole test set"
        assert r["samples"] == 32, "the epoch's samples are every pipeline's"
        assert r["metrics"]["loss"] == pytest.approx(truth["loss"], abs=1e-5)
        assert r["metrics"]["accuracy"] == pytest.approx(truth["accuracy"], abs=1e-6)


SYNTH = {"gradients": "synthetic", "delay": 1, "synth_lr": 1e-2,
         "synthesizer": sp.Synthesizer("linear", conditional=True, num_classes=3)}


def fit_synthetic(rank: int, batches: list, options: dict) -> dict:
    trainer = trainer_for(make_model(), **options)
    history = trainer.fit(batches)
    synth = trainer.runner.stage.synth
    out = {"state": trainer.state_dict(), "losses": [s["loss"] for s in history.steps],
           "synth": {k: v.clone() for k, v in synth.state_dict().items()} if synth is not None else None}
    trainer.close()
    return out


def test_fixed_delay_synthetic_dp2_pp2_equals_the_reference_trainer_on_the_global_batch():
    batches = make_batches(12)
    results = run_ranks(fit_synthetic, DP * PP, batches, SYNTH)
    reference = trainer_for(make_model(), **SYNTH)
    history = reference.fit(global_batches(batches))
    expected = reference.state_dict()
    synth = reference.runner.stages[0].synth.state_dict()
    assert any(v.abs().sum() > 0 for v in synth.values()), "the synthesizer never trained"
    for rank, r in enumerate(results):
        assert_states_close(r["state"], expected, atol=1e-5)
        assert r["losses"] == pytest.approx([s["loss"] for s in history.steps], abs=1e-5), f"rank {rank}"
        if rank % PP == 0:
            assert_states_close(r["synth"], synth, atol=1e-5)


class Probe(nn.Module):
    """Records the sample ids (column 0) it sees and drops that column."""

    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.extend(int(i) for i in x[:, 0])
        return x[:, 1:]


def fit_shuffled_loader(rank: int, n: int, epochs: int) -> dict:
    torch.manual_seed(10 + rank)  # the lazily built MLP synthesizers start from different weights here
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], torch.randn(n, 6, generator=g)], 1)
    loader = DataLoader(TensorDataset(x, torch.randint(0, 3, (n,), generator=g)), batch_size=4, shuffle=True)
    model = nn.Sequential(Probe(), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    trainer = sp.Trainer(sp.split(model, balance=[3, 3]), nn.CrossEntropyLoss(), adam, progress=False,
                         synthesizer=sp.Synthesizer("mlp", hidden=8, depth=1), max_inflight=2)  # free-running
    probe = next((m for m in trainer.runner.stage.module.modules() if isinstance(m, Probe)), None)
    seen = []
    for epoch in range(epochs):
        trainer.fit(loader, epochs=epoch + 1)
        seen.append(list(probe.seen) if probe is not None else None)
        if probe is not None:
            probe.seen.clear()
    synth = trainer.runner.stage.synth
    out = {"seen": seen, "state": trainer.state_dict(), "step": trainer.step,
           "synth": {k: v.clone() for k, v in synth.state_dict().items()} if synth is not None else None}
    trainer.close()
    return out


def test_every_sample_is_seen_once_per_epoch_across_replicas_and_replicas_stay_identical():
    n = 30  # 15 per pipeline: batches of 4, 4, 4, 3 on each
    results = run_ranks(fit_shuffled_loader, DP * PP, n, 2)
    for epoch in range(2):
        shares = [results[d * PP]["seen"][epoch] for d in range(DP)]
        assert len(shares[0]) == len(shares[1]) == n // DP
        assert sorted(shares[0] + shares[1]) == list(range(n)), f"epoch {epoch}"
    assert results[0]["seen"][0] != results[0]["seen"][1], "each epoch is shuffled anew"
    assert [r["step"] for r in results] == [8] * 4
    for r in results[1:]:
        assert_states_close(r["state"], results[0]["state"], atol=0)
    for stage in range(PP - 1):  # free-running synthesizers, built lazily: the same on every replica
        assert results[stage]["synth"] is not None
        # (their BatchNorm's running statistics are each replica's own, by design)
        params = [{k: v for k, v in results[d * PP + stage]["synth"].items() if "running" not in k
                   and "num_batches" not in k} for d in range(DP)]
        assert any("weight" in k for k in params[0])
        assert_states_close(params[1], params[0], atol=0)


def fit_resumable(rank: int, batches: list, max_steps: int, resume: str | None, checkpoint: str | None) -> dict:
    trainer = trainer_for(make_model(), **SYNTH)
    trainer.fit(batches, max_steps=max_steps, resume=resume, checkpoint=checkpoint)
    synth = trainer.runner.stage.synth
    out = {"state": trainer.state_dict(), "step": trainer.step,
           "synth": {k: v.clone() for k, v in synth.state_dict().items()} if synth is not None else None}
    trainer.close()
    return out


def test_a_checkpoint_saved_at_dp2_resumes_at_dp1_and_back_as_an_uninterrupted_run(tmp_path):
    batches = make_batches(18)  # 9 global steps
    first, second = str(tmp_path / "dp2"), str(tmp_path / "dp1")
    run_ranks(fit_resumable, DP * PP, batches, 3, None, first)
    run_ranks(fit_resumable, PP, global_batches(batches), 6, first, second)  # one pipeline, global batches
    results = run_ranks(fit_resumable, DP * PP, batches, 9, second, None)
    reference = trainer_for(make_model(), **SYNTH)
    reference.fit(global_batches(batches))
    expected, synth = reference.state_dict(), reference.runner.stages[0].synth.state_dict()
    for r in results:
        assert r["step"] == 9
        assert_states_close(r["state"], expected, atol=1e-5)
    assert_states_close(results[0]["synth"], synth, atol=1e-5)
    assert_states_close(results[PP]["synth"], synth, atol=1e-5)


def fit_with_a_nan_on_one_replica(rank: int, batches: list) -> dict:
    trainer = trainer_for(make_model(), nonfinite="skip", **SYNTH)
    history = trainer.fit(batches)
    out = {"losses": [s["loss"] for s in history.steps], "state": trainer.state_dict()}
    trainer.close()
    return out


def test_a_step_skipped_on_one_replica_is_skipped_on_all():
    batches = make_batches(8)
    x, y = batches[5]  # replica 1's batch of step 2
    batches[5] = (torch.full_like(x, float("nan")), y)
    results = run_ranks(fit_with_a_nan_on_one_replica, DP * PP, batches)
    assert [v == v for v in results[0]["losses"]] == [True, True, False, True]
    for r in results:
        assert all(bool(torch.isfinite(v).all()) for v in r["state"].values())
        assert_states_close(r["state"], results[0]["state"], atol=0)


def wrong_world(rank: int) -> str:
    try:
        trainer_for(make_model())
    except ValueError as e:
        return str(e)
    return "no error"


def test_a_world_that_is_not_a_multiple_of_the_stages_is_refused_with_the_numbers():
    messages = run_ranks(wrong_world, 3)
    assert all("the job has 3 processes but the model has 2 stages" in m for m in messages), messages


# -- two nodes, and a killed rank -------------------------------------------------------------------

NODE_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.nn as nn, synthpipe as sp
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    batches = torch.load(sys.argv[1])
    trainer = sp.Trainer(sp.split(model, balance=[2, 3]), nn.CrossEntropyLoss(),
                         lambda p: torch.optim.Adam(p, lr=1e-2), gradients="backprop", progress=False)
    trainer.fit(batches)
    out = {"node": int(os.environ["GROUP_RANK"]), "dp": trainer.layout.dp_rank, "pp": trainer.layout.pp_rank,
           "state": trainer.state_dict()}
    trainer.close()
    torch.save(out, os.path.join(sys.argv[2], f"rank{trainer.rank}.pt"))
""")


def test_two_nodes_on_one_machine_run_dp2_pp2_with_each_pipeline_inside_a_node(tmp_path):
    batches = make_batches(6)
    torch.save(batches, tmp_path / "batches.pt")
    (tmp_path / "node.py").write_text(NODE_SCRIPT)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(i),
                               "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
                               str(tmp_path / "node.py"), str(tmp_path / "batches.pt"), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    expected = plain_backprop(make_model(), global_batches(batches), adam)
    for rank in range(DP * PP):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert (r["dp"], r["pp"]) == divmod(rank, PP)
        assert r["node"] == r["dp"], f"rank {rank}: its pipeline spans nodes"
        assert_states_close(r["state"], expected, atol=1e-5)


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.nn as nn, synthpipe as sp
    torch.set_num_threads(1)
    marker = sys.argv[1]

    class Marker(nn.Module):
        steps = 0
        def forward(self, h):
            Marker.steps += 1
            if Marker.steps == 5:
                open(marker + os.environ["RANK"], "w").close()
            return h

    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), Marker(), nn.Linear(8, 3))
    def batches():
        g = torch.Generator().manual_seed(int(os.environ["RANK"]))
        while True:
            yield torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
    trainer = sp.Trainer(sp.split(model, balance=[2, 2]), nn.CrossEntropyLoss(), progress=False,
                         failure_timeout=float(sys.argv[2]))
    trainer.fit(batches(), max_steps=10**9)
""")


def test_a_killed_rank_in_replica_1_stops_every_rank_naming_it_and_its_coordinates(tmp_path):
    timeout, victim = 4.0, 3  # rank 3: replica 1's last stage
    (tmp_path / "rank.py").write_text(KILL_SCRIPT)
    marker, port = str(tmp_path / "marker"), free_port()
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "rank.py"), marker, str(timeout)],
                              env={**os.environ, **rank_env(r, DP * PP, port), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(DP * PP)]
    deadline = time.monotonic() + 90
    while not all(os.path.exists(marker + str(r)) for r in (1, 3)):  # the Marker is in stage 1 of each replica
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail(f"the job did not start training: {[p.communicate()[1][-1500:] for p in procs]}")
        time.sleep(0.1)
    procs[victim].send_signal(signal.SIGKILL)
    start, bound = time.monotonic(), timeout + 15  # detection plus teardown, on a busy 2-core machine
    for rank, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=max(0.1, start + bound - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail(f"rank {rank} still running {bound} s after rank {victim} was killed")
        if rank != victim:
            assert p.returncode not in (0, None), f"rank {rank} exited {p.returncode}"
            assert "rank 3 (dp 1, pp 1)" in err, f"rank {rank} does not name rank 3 and its place: {err[-1500:]}"


def test_the_launcher_accepts_a_multiple_of_the_stages_and_refuses_the_rest():
    from synthpipe.launch import train
    from synthpipe.launch.config import load_config

    train.preflight(load_config(None, {"n_stages": 2}), 4)  # 2 pipelines of 2 stages
    with pytest.raises(train.LaunchError, match="the job has 4 processes but the model has 3 stages"):
        train.preflight(load_config(None, {"n_stages": 3}), 4)


HEAD3 = sp.AuxHead("linear", num_classes=3)
OWN_UPDATES = [("delayed", {}), ("delayed", {"staleness": "predict"}), ("interlocking", {"aux_head": HEAD3}),
               ("local", {"aux_head": HEAD3}), ("corrected", {"synth_lr": 1e-2})]


def fit_source(rank: int, batches: list, gradients: str, options: dict) -> dict:
    trainer = trainer_for(make_model(), gradients=gradients, **options)
    history = trainer.fit(batches)
    out = {"state": trainer.state_dict(), "losses": [s["loss"] for s in history.steps]}
    trainer.close()
    return out


@pytest.mark.parametrize("gradients,options", OWN_UPDATES,
                         ids=[f"{g}-{'-'.join(o) or 'plain'}" for g, o in OWN_UPDATES])
def test_every_source_at_dp2_pp2_equals_the_reference_trainer_on_the_global_batch(gradients, options):
    """Replicas of a stage average their gradients before every update, also where the
    source runs the update itself (delayed, corrected, interlocking): they never drift apart."""
    batches = make_batches(12)
    results = run_ranks(fit_source, DP * PP, batches, gradients, options)
    reference = trainer_for(make_model(), gradients=gradients, **options)
    history = reference.fit(global_batches(batches))
    expected = reference.state_dict()
    assert any(not torch.equal(expected[k], make_model().state_dict()[k]) for k in expected if k.startswith("0.")), \
        "stage 0 never trained"
    for rank, r in enumerate(results):
        assert_states_close(r["state"], expected, atol=1e-5)
        assert r["losses"] == pytest.approx([s["loss"] for s in history.steps], abs=1e-5), f"rank {rank}"
