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
from synthpipe.engine.reference import evaluate_model
from synthpipe.engine.data_parallel import layout, merge_cache_states, split_cache_state
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
