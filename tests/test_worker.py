"""The multi-process engine on CPU with gloo: one process per stage (engine/worker.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import synthpipe as sp

from multiprocess import run_ranks
from reference import assert_states_close, plain_backprop

pytestmark = pytest.mark.timeout(180)


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.BatchNorm1d(32),
                         nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))


def make_batches(n: int = 8, batch: int = 16, last: int | None = None, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    sizes = [batch] * n
    if last is not None:
        sizes[-1] = last
    return [(torch.randn(b, 12, generator=g), torch.randint(0, 5, (b,), generator=g)) for b in sizes]


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def trainer_for(n_stages: int, **options) -> sp.Trainer:
    options.setdefault("progress", False)
    return sp.Trainer(sp.split(make_model(), n_stages=n_stages), loss_fn=nn.CrossEntropyLoss(),
                      optimizer=adam, **options)


def fit_and_state(rank: int, n_stages: int, batches: list, options: dict) -> dict:
    trainer = trainer_for(n_stages, **options)
    history = trainer.fit(batches, epochs=1)
    state = trainer.state_dict()
    synth = trainer.runner.stage.synth
    out = {"model": state, "history": history.steps,
           "synth": {k: v.clone() for k, v in synth.state_dict().items()} if synth is not None else None}
    trainer.close()
    return out


@pytest.mark.parametrize("n_stages", [2, 3])
def test_backprop_mode_across_ranks_equals_single_process_backprop(n_stages):
    batches = make_batches()
    results = run_ranks(fit_and_state, n_stages, n_stages, batches, {"gradients": "backprop"})
    expected = plain_backprop(make_model(), batches, adam)
    for r in results:
        assert_states_close(r["model"], expected, atol=1e-5)
    changed = any(not torch.equal(expected[k], make_model().state_dict()[k]) for k in expected)
    assert changed, "training did not change the parameters"


def test_fixed_delay_synthetic_mode_equals_the_single_process_trainer():
    batches = make_batches(n=10)
    options = {"gradients": "synthetic", "delay": 2,
               "synthesizer": sp.Synthesizer("linear", conditional=True, num_classes=5), "synth_lr": 1e-2}
    results = run_ranks(fit_and_state, 3, 3, batches, options)
    reference = trainer_for(3, **options)
    history = reference.fit(batches)
    expected = reference.state_dict()
    for r in results:
        assert_states_close(r["model"], expected, atol=1e-6)
    for rank in range(2):
        synth = reference.runner.stages[rank].synth.state_dict()
        assert_states_close(results[rank]["synth"], synth, atol=1e-6)
        assert any(v.abs().sum() > 0 for k, v in synth.items() if "out" in k), "synthesizer never trained"
    assert [s["step"] for s in results[0]["history"]] == [s["step"] for s in history.steps]
    assert [s["loss"] for s in results[0]["history"]] == pytest.approx([s["loss"] for s in history.steps], abs=1e-5)


def test_variable_batch_size_and_free_running_synthetic_mode():
    batches = make_batches(n=9, last=5)
    options = {"gradients": "synthetic", "synthesizer": sp.Synthesizer("mlp", hidden=16, depth=1), "max_inflight": 2}
    results = run_ranks(fit_and_state, 3, 3, batches, options)
    steps = results[0]["history"]
    assert [s["step"] for s in steps] == list(range(9))
    assert all(s["loss"] == s["loss"] for s in steps), "every step has the last stage's loss"
    assert any(v == v for s in steps for v in s["synth_loss"]), "synthesizers were trained"


class SkipNet(nn.Module):
    """A skip connection over the split point: the boundary carries two tensors."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(12, 16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 5)
        self.proj = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(torch.tanh(self.mid(h))) + self.proj(h)  # h skips stage 1


def skipnet_stages() -> list:
    return sp.split(SkipNet(), points=["mid", "out"], example_input=torch.randn(4, 12))


def fit_skipnet(rank: int, batches: list, mode: str) -> dict:
    trainer = sp.Trainer(skipnet_stages(), nn.CrossEntropyLoss(), adam, gradients=mode, progress=False, delay=1,
                         synthesizer=sp.Synthesizer("linear"))
    trainer.fit(batches)
    own = trainer.runner.stage
    widths = [s for s in own.synth.shapes] if own.synth is not None else None
    state = trainer.state_dict()
    trainer.close()
    return {"state": state, "synth_shapes": widths}


def test_a_boundary_carrying_a_tuple_of_tensors():
    batches = make_batches(n=6, last=7)
    stages = skipnet_stages()
    with torch.no_grad():
        assert len(stages[1](stages[0](batches[0][0]))) == 2, "the split should put two tensors on boundary 1"
    results = run_ranks(fit_skipnet, 3, batches, "backprop")
    expected = plain_backprop(SkipNet(), batches, adam)
    for r in results:
        assert_states_close(r["state"], expected, atol=1e-5)
    synthetic = run_ranks(fit_skipnet, 3, batches, "synthetic")
    assert synthetic[1]["synth_shapes"] == [(16,), (16,)], "one synthesizer per boundary tensor"


def long_run(rank: int, steps: int) -> dict:
    trainer = trainer_for(3, synthesizer=sp.Synthesizer("linear"), max_inflight=3)
    worker = trainer.runner
    sending = [c for c in (worker.ch.act_out, worker.ch.grad_out) if c is not None]
    cache_sizes, sends = [], []
    original = worker._train

    def watched(step, x, y):
        out = original(step, x, y)
        cache_sizes.append(worker.source.in_flight())
        sends.append(max(c.sends_in_flight for c in sending))  # during the fit, at every step
        return out
    worker._train = watched

    def batches():
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            yield torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)
    trainer.fit(batches())
    after = sum(c.sends_in_flight for c in sending)
    trainer.close()
    return {"max_cache": max(cache_sizes), "sends": sends, "after": after}


def test_memory_stays_flat_over_a_long_run():
    # Memory is held by counts: cached activations and send buffers per channel. Both stay
    # bounded by max_inflight at every step, whatever the run's length (RSS would hide a
    # leak of small tensors in allocator noise; benchmarks/soak.py measures RSS).
    steps = 600
    results = run_ranks(long_run, 3, steps, timeout=240)
    for rank, r in enumerate(results):
        assert r["max_cache"] <= 3, f"rank {rank} cached {r['max_cache']} activations (max_inflight 3)"
        assert len(r["sends"]) == steps
        worst = max(r["sends"])
        assert worst <= 3 + 2, (f"rank {rank} held the buffers of {worst} messages on one channel "
                                f"(at step {r['sends'].index(worst)}; max_inflight 3)")
        assert r["after"] == 0


def wrong_world(rank: int) -> str:
    try:
        trainer_for(3)
    except ValueError as e:
        return str(e)
    return "no error"


def test_world_size_different_from_stage_count_is_an_error():
    messages = run_ranks(wrong_world, 2)
    assert all("2 processes but the model has 3 stages" in m for m in messages), messages


def fit_on_gpus(rank: int, batches: list) -> dict:
    trainer = trainer_for(2, gradients="backprop")  # device cuda:LOCAL_RANK, backend nccl
    assert trainer.device == torch.device("cuda", rank)
    assert torch.distributed.get_backend() == "nccl"
    trainer.fit(batches)
    state = trainer.state_dict()
    trainer.close()
    return {"model": state}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs for NCCL")
def test_nccl_transport_on_two_gpus_is_transparent():
    batches = make_batches()
    results = run_ranks(fit_on_gpus, 2, batches)
    expected = plain_backprop(make_model(), batches, adam)
    for r in results:
        assert_states_close(r["model"], expected, atol=1e-4)


def norm_model() -> nn.Sequential:
    """BatchNorm in each of 3 stages (balance [3, 3, 4])."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 32), nn.BatchNorm1d(32),
                         nn.Tanh(), nn.Linear(32, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 5))


def fit_with_a_nan_batch(rank: int, batches: list, mode: str) -> dict:
    trainer = sp.Trainer(sp.split(norm_model(), balance=[3, 3, 4]), loss_fn=nn.CrossEntropyLoss(), optimizer=adam,
                         gradients=mode, nonfinite="skip", synthesizer=sp.Synthesizer("linear"), delay=1,
                         progress=False)
    module = trainer.runner.stage.module
    losses = [s["loss"] for s in trainer.fit(batches[:2]).steps]
    before = {k: v.clone() for k, v in module.state_dict().items()}
    losses += [s["loss"] for s in trainer.fit(batches[2:3], epochs=2).steps]
    after_skip = {k: v.clone() for k, v in module.state_dict().items()}
    losses += [s["loss"] for s in trainer.fit(batches[3:], epochs=3).steps]
    finite = all(bool(torch.isfinite(v).all()) for v in trainer.state_dict().values())
    trainer.close()
    return {"finite": finite, "losses": losses, "before": before, "after_skip": after_skip}


@pytest.mark.parametrize("mode", ["backprop", "synthetic"])
def test_nonfinite_steps_are_skipped_on_every_rank_and_change_nothing(mode):
    batches = make_batches(n=5)
    x, y = batches[2]
    batches[2] = (torch.full_like(x, float("nan")), y)
    results = run_ranks(fit_with_a_nan_batch, 3, batches, mode)
    for rank, r in enumerate(results):
        assert [v == v for v in r["losses"]] == [True, True, False, True, True], f"rank {rank}"
        assert r["finite"], f"rank {rank}"
        assert any("running_mean" in k for k in r["before"]), f"rank {rank} has no BatchNorm"
        for k, v in r["before"].items():  # parameters and running statistics alike
            assert torch.equal(r["after_skip"][k], v), f"rank {rank}: {k} changed in the skipped step"


def different_splits(rank: int) -> str:
    stages = sp.split(make_model(), balance=[2, 6] if rank == 0 else [3, 5])
    try:
        sp.Trainer(stages, nn.CrossEntropyLoss(), progress=False)
    except ValueError as e:
        return str(e)
    return "no error"


def test_ranks_that_split_the_model_differently_are_stopped():
    messages = run_ranks(different_splits, 2)
    assert "rank 0 and rank 1 split the model differently (stage 0" in messages[0], messages[0]
    assert "rank 1 and rank 0 split the model differently" in messages[1], messages[1]


def different_options(rank: int) -> str:
    options = {"gradients": "backprop"} if rank == 1 else {"warmup_steps": 5}
    try:
        sp.Trainer(sp.split(make_model(), n_stages=2), nn.CrossEntropyLoss(), progress=rank == 0, **options)
    except ValueError as e:
        return str(e)
    return "no error"


def test_ranks_given_different_training_options_are_stopped():
    messages = run_ranks(different_options, 2)
    assert ("rank 0 and rank 1 were given different training options (gradients='synthetic' here and "
            "'backprop' there, warmup_steps=5 here and 0 there)") in messages[0], messages[0]
    assert "rank 1 and rank 0 were given different training options" in messages[1], messages[1]


def two_trainers_in_a_row(rank: int, batches: list) -> dict:
    first = trainer_for(2, gradients="backprop")
    first.fit(batches[:3])
    first.close()
    group_kept = torch.distributed.is_initialized()
    second = trainer_for(2, gradients="backprop")  # same processes, same MASTER_PORT
    second.fit(batches)
    state = second.state_dict()
    second.close()
    return {"group_kept": group_kept, "state": state}


@pytest.mark.parametrize("attempt", range(3))  # the old re-initialisation hung in most attempts
def test_a_trainer_after_a_closed_one_reuses_the_process_group(attempt):
    batches = make_batches()
    results = run_ranks(two_trainers_in_a_row, 2, batches, timeout=60)
    expected = plain_backprop(make_model(), batches, adam)
    for r in results:
        assert r["group_kept"]
        assert_states_close(r["state"], expected, atol=1e-5)


def evaluate_with_a_frozen_norm(rank: int, batches: list) -> dict:
    model = make_model()
    model[4].eval()  # a frozen BatchNorm (fine-tuning habit): evaluate must not unfreeze it
    trainer = sp.Trainer(sp.split(model, balance=[4, 4]), nn.CrossEntropyLoss(), adam, progress=False)
    trainer.fit(batches)
    metrics = trainer.evaluate(batches)
    empty = trainer.evaluate([])
    result = {"modes": [m.training for m in model.modules()], "metrics": metrics, "empty": empty}
    trainer.close()
    return result


def test_evaluate_across_ranks_restores_every_layers_mode_and_reports_nothing_as_nan():
    results = run_ranks(evaluate_with_a_frozen_norm, 2, make_batches(n=3), timeout=120)
    expected = [True, True, True, True, True, False, True, True, True]
    assert [r["modes"] for r in results] == [expected, expected]
    assert results[0]["metrics"] == results[1]["metrics"] and results[0]["metrics"]["samples"] == 48
    for r in results:
        assert r["empty"]["samples"] == 0 and r["empty"]["loss"] != r["empty"]["loss"]  # NaN, not 0.0

