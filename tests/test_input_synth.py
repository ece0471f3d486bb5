"""Synthetic inputs (stages/input_synth.py, ``synthetic_inputs=True``): forward-unlocked training."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

import synthpipe as sp
from synthpipe import data, models
from synthpipe.engine.config import TrainConfig
from synthpipe.engine.synthetic_inputs import meta_input
from synthpipe.stages.input_synth import InputSynthesizer
from synthpipe.stages.stage import StageInputError

from multiprocess import run_ranks


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 5))


def make_batches(n: int = 6, batch: int = 16, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 12, generator=g), torch.randint(0, 5, (batch,), generator=g)) for _ in range(n)]


SYNTH = sp.Synthesizer("linear", conditional=True, num_classes=5)


def frozen_trainer(**options) -> sp.Trainer:
    """Stages that never change (SGD, lr 0), so the real chain is the initial model's."""
    options.setdefault("progress", False)
    return sp.Trainer(sp.split(make_model(), balance=[2, 2, 1]), nn.CrossEntropyLoss(),
                      lambda p: torch.optim.SGD(p, lr=0.0), synthesizer=SYNTH, gradients="synthetic",
                      synthetic_inputs=True, input_synth_hidden=8, **options)


def test_each_input_synthesizer_regresses_on_the_real_input_and_its_stage_trains_on_the_prediction():
    trainer = frozen_trainer()
    runner = trainer.runner
    seen: dict[int, list] = {1: [], 2: []}
    predicted: dict[int, list] = {1: [], 2: []}
    trained_on: dict[int, list] = {1: [], 2: []}
    for r, synth in runner.input_synths.items():
        def train(x, real, _r=r, _inner=synth.train):
            seen[_r].append(real[0].clone())
            return _inner(x, real)

        def predict(x, _r=r, _inner=synth.predict):
            out = _inner(x)
            predicted[_r].append(out[0].clone())
            return out
        synth.train, synth.predict = train, predict
        stage_step = runner.steps[r]

        def begin(step, inputs, y, _r=r, _inner=stage_step.begin):
            trained_on[_r].append(inputs[0].clone())
            return _inner(step, inputs, y)
        stage_step.begin = begin
    batches = make_batches()
    trainer.fit(batches)
    model = make_model()
    for (x, _), real1, real2 in zip(batches, seen[1], seen[2], strict=True):
        h0 = model[1](model[0](x))
        assert torch.allclose(real1, h0, atol=1e-6), "stage 1's input synthesizer regresses on the real h_0"
        assert torch.allclose(real2, model[3](model[2](h0)), atol=1e-6), "stage 2's on the real h_1"
    for r in (1, 2):
        assert len(trained_on[r]) == len(batches) == len(predicted[r])
        for used, guess, real in zip(trained_on[r], predicted[r], seen[r], strict=True):
            assert torch.equal(used, guess), f"stage {r} trains on its predicted input"
            assert not torch.allclose(used, real, atol=1e-3), "the prediction is not the real input"


def test_input_synthesizer_regression_lowers_its_error_on_a_fixed_target():
    synth = InputSynthesizer(1, lambda p: torch.optim.Adam(p, lr=1e-2), hidden=32)
    x = torch.randn(64, 10)
    real = (torch.tanh(x @ torch.randn(10, 6)),)
    losses = [synth.train((x,), real) for _ in range(200)]
    mse = float(((synth.predict((x,))[0] - real[0]) ** 2).mean())
    assert losses[-1] < losses[0] / 10 and mse == pytest.approx(losses[-1], rel=0.2, abs=1e-3)
    state = synth.state_dict()
    again = InputSynthesizer(1, lambda p: torch.optim.Adam(p, lr=1e-2), hidden=32)
    again.load_state_dict(state)
    assert torch.equal(again.predict((x,))[0], synth.predict((x,))[0])


def test_forward_unlocked_training_learns_mnist1d():
    """The paper's feed-forward complete unlock: every stage on a predicted input and a synthetic gradient.

    (128 hidden units, not the paper's 256: half the time, and 66-67% on seeds 0 and 1.)"""
    train, test = data.mnist1d(num_samples=10000)
    torch.manual_seed(0)
    trainer = sp.Trainer(sp.split(models.paper_mlp(hidden=128, depth=3), n_stages=3), nn.CrossEntropyLoss(),
                         lambda p: torch.optim.Adam(p, lr=1e-3),
                         synthesizer=sp.Synthesizer("linear", conditional=True, num_classes=10),
                         gradients="synthetic", synthetic_inputs=True, progress=False)
    history = trainer.fit(data.loader(train, 64, shuffle=True), epochs=20)
    accuracy = trainer.evaluate(data.loader(test, 500))["accuracy"]
    assert history.steps[-1]["step"] == 20 * 125 - 1
    assert accuracy >= 0.6, f"forward-unlocked training reached only {accuracy:.3f} (chance is 0.1)"


def test_synthetic_inputs_are_refused_by_name_where_they_cannot_apply():
    with pytest.raises(ValueError, match="stage 0 reads the data itself"):
        InputSynthesizer(0, lambda p: torch.optim.Adam(p))
    with pytest.raises(ValueError, match=r"synthetic_inputs=True needs at least 2 stages.*stage 0"):
        sp.Trainer([make_model()], nn.CrossEntropyLoss(), synthesizer=SYNTH, synthetic_inputs=True, progress=False)
    with pytest.raises(ValueError, match="it needs gradients='synthetic', got gradients='backprop'"):
        TrainConfig(gradients="backprop", synthetic_inputs=True)
    with pytest.raises(ValueError, match="synthetic_inputs=True cannot run warmup_steps=3"):
        TrainConfig(synthetic_inputs=True, warmup_steps=3)
    with pytest.raises(ValueError, match="synthetic_inputs must be True or False"):
        TrainConfig(synthetic_inputs="yes")


def test_a_boundary_an_input_synthesizer_cannot_predict_is_named():
    synth = InputSynthesizer(2, lambda p: torch.optim.Adam(p))
    with pytest.raises(StageInputError, match="input tensor 1 of stage 2 .* not a floating batch tensor"):
        synth.train((torch.randn(4, 3),), (torch.randn(4, 5), torch.ones(4, dtype=torch.long)))
    synth.train((torch.randn(4, 3),), (torch.randn(4, 5),))
    with pytest.raises(StageInputError, match="the data has 7 features per example .* built for 3"):
        synth.predict((torch.randn(4, 7),))


def refused_with_replicas(rank: int) -> str:
    try:
        sp.Trainer(sp.split(make_model(), balance=[3, 2]), nn.CrossEntropyLoss(), synthesizer=SYNTH,
                   gradients="synthetic", synthetic_inputs=True, progress=False)
    except ValueError as e:
        return str(e)
    return "not refused"


@pytest.mark.timeout(120)
def test_synthetic_inputs_with_replicas_are_refused_on_every_rank():
    results = run_ranks(refused_with_replicas, 4, timeout=90)
    assert all("synthetic_inputs=True runs one pipeline, not dp=2" in m for m in results), results


class SlowStart(nn.Module):
    """Stage 0's first forward takes half a second."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 1:
            time.sleep(0.5)
        return x


def first_step_across_ranks(rank: int, batches: list) -> dict:
    trainer = learning_trainer()
    if rank == 0:
        trainer.runner.stage.module = nn.Sequential(SlowStart(), trainer.runner.stage.module)
    trainer.fit(batches)
    worker = trainer.runner
    out = {"before_build": worker.reals_before_build, "received": worker.reals_received}
    trainer.close()
    return out


@pytest.mark.timeout(120)
def test_a_rank_sizes_its_input_synthesizer_without_waiting_for_the_first_real_input():
    results = run_ranks(first_step_across_ranks, 3, make_batches(n=3), timeout=90)
    for rank in (1, 2):
        assert results[rank]["before_build"] == 0, "built from the meta run's shapes, before any real input"
        assert results[rank]["received"] == 3


def test_meta_input_gives_the_boundary_shapes_or_none():
    model = nn.Sequential(nn.Linear(12, 24), nn.BatchNorm1d(24), nn.Tanh(), nn.Linear(24, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    h = meta_input([model[:2], model[2:]], (torch.randn(8, 12),))
    assert h is not None and [(t.shape, t.dtype, t.device.type) for t in h] == [((8, 16), torch.float32, "meta")]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "nothing real ran"

    class Selects(nn.Module):
        def forward(self, x):
            return x[x > 0]  # (a data-dependent shape: meta cannot say)
    assert meta_input([Selects()], (torch.randn(8, 12),)) is None


class Slow(nn.Module):
    """Stage 1 takes its time: stage 2, whose data comes straight from rank 0, runs ahead on predicted inputs."""

    def forward(self, x):
        time.sleep(0.05)
        return x


def unlocked_across_ranks(rank: int, batches: list, options: dict, evaluate: bool, slow: bool = False) -> dict:
    trainer = learning_trainer(**options)
    if slow and rank == 1:
        trainer.runner.stage.module = nn.Sequential(Slow(), trainer.runner.stage.module)
    history = trainer.fit(batches, epochs=2, eval_loader=batches[:2] if evaluate else None)
    metrics = trainer.evaluate(batches[:3])
    state = trainer.state_dict()
    worker = trainer.runner
    synth = worker.input_synth
    out = {"model": state, "losses": [s["loss"] for s in history.steps], "metrics": metrics,
           "input": None if synth is None else synth.predict((batches[0][0],))[0],
           "most_unreal": worker.most_unreal, "lag": worker.unlock_lag,
           "left": (len(worker._unreal), len(worker._reals), worker.outstanding)}
    trainer.close()
    return out


@pytest.mark.timeout(180)
def test_synthetic_inputs_across_processes_with_a_fixed_delay_equal_the_single_process_trainer():
    batches = make_batches(n=8)
    options = {"delay": 2}
    results = run_ranks(unlocked_across_ranks, 3, batches, options, True, timeout=150)
    reference = learning_trainer(**options)
    history = reference.fit(batches, epochs=2, eval_loader=batches[:2])
    expected = reference.state_dict()
    assert any(not torch.equal(v, make_model().state_dict()[k]) for k, v in expected.items()), "nothing trained"
    for r in results:
        for k, v in expected.items():
            assert torch.allclose(r["model"][k], v, atol=1e-5), k
        assert r["metrics"]["accuracy"] == pytest.approx(reference.evaluate(batches[:3])["accuracy"])
        assert r["most_unreal"] == 0 and r["lag"] == 0, "each real input runs right after its step"
        assert r["left"] == (0, 0, 0), "nothing is left waiting after the fit"
    for rank in (1, 2):
        assert torch.allclose(results[rank]["input"], reference.runner.input_synths[rank].predict((batches[0][0],))[0],
                              atol=1e-5), f"stage {rank}'s input synthesizer"
    assert results[0]["losses"] == pytest.approx([s["loss"] for s in history.steps], abs=1e-5)


@pytest.mark.timeout(180)
def test_free_running_ranks_run_at_most_max_inflight_batches_ahead_of_their_real_inputs():
    batches = make_batches(n=12)
    results = run_ranks(unlocked_across_ranks, 3, batches, {"max_inflight": 2}, True, True, timeout=150)
    for rank in (1, 2):
        assert results[rank]["lag"] == 2 and results[rank]["most_unreal"] <= 2, results[rank]["most_unreal"]
        assert results[rank]["left"] == (0, 0, 0), "every real input ran before the fit ended"
    assert results[2]["most_unreal"] == 2, "behind a slow stage 1, stage 2 runs as far ahead as allowed"
    losses = results[0]["losses"]
    assert len(losses) == 24 and all(v == v for v in losses), "every step has a loss"
    assert results[0]["metrics"] == results[2]["metrics"], "every rank gets the same evaluation"


def learning_trainer(**options) -> sp.Trainer:
    return sp.Trainer(sp.split(make_model(), balance=[2, 2, 1]), nn.CrossEntropyLoss(),
                      lambda p: torch.optim.Adam(p, lr=1e-2), synthesizer=SYNTH, gradients="synthetic",
                      synthetic_inputs=True, input_synth_hidden=8, progress=False, **options)


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    batches = make_batches(n=8)
    whole = learning_trainer()
    whole.fit(batches, epochs=2)
    first = learning_trainer()
    first.fit(batches, epochs=1)
    first.save(str(tmp_path))
    resumed = learning_trainer().load(str(tmp_path))
    resumed.fit(batches, epochs=2)
    for k, v in whole.state_dict().items():
        assert torch.allclose(v, resumed.state_dict()[k], atol=1e-6), k
    x = batches[0][0]
    for r in (1, 2):
        assert torch.allclose(whole.runner.input_synths[r].predict((x,))[0],
                              resumed.runner.input_synths[r].predict((x,))[0], atol=1e-6), f"stage {r}"


def resumed_across_ranks(rank: int, batches: list, path: str) -> dict:
    first = learning_trainer(delay=2)
    first.fit(batches, epochs=1)
    first.save(path)
    first.close()
    resumed = learning_trainer(delay=2).load(path)
    resumed.fit(batches, epochs=2)
    synth = resumed.runner.input_synth
    out = {"model": resumed.state_dict(), "input": None if synth is None else synth.predict((batches[0][0],))[0]}
    resumed.close()
    return out


@pytest.mark.timeout(180)
def test_a_run_across_processes_resumes_its_input_synthesizers(tmp_path):
    batches = make_batches(n=8)
    results = run_ranks(resumed_across_ranks, 3, batches, str(tmp_path), timeout=150)
    whole = learning_trainer(delay=2)
    whole.fit(batches, epochs=2)
    for k, v in whole.state_dict().items():
        assert torch.allclose(results[0]["model"][k], v, atol=1e-5), k
    for r in (1, 2):
        assert torch.allclose(results[r]["input"], whole.runner.input_synths[r].predict((batches[0][0],))[0],
                              atol=1e-5), f"stage {r}'s input synthesizer"
