"""Synthetic inputs (stages/input_synth.py, ``synthetic_inputs=True``): forward-unlocked training."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import synthpipe as sp
from synthpipe import data, models
from synthpipe.engine.config import TrainConfig
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
    """The paper's feed-forward complete unlock: every stage on a predicted input and a synthetic gradient."""
    train, test = data.mnist1d(num_samples=10000)
    torch.manual_seed(0)
    trainer = sp.Trainer(sp.split(models.paper_mlp(depth=3), n_stages=3), nn.CrossEntropyLoss(),
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


def refused_across_ranks(rank: int) -> str:
    try:
        frozen_trainer()
    except ValueError as e:
        return str(e)
    return "not refused"


@pytest.mark.timeout(120)
def test_synthetic_inputs_are_refused_across_processes():
    results = run_ranks(refused_across_ranks, 3, timeout=90)
    assert all("synthetic_inputs=True runs in the single-process trainer only" in m for m in results), results


def learning_trainer() -> sp.Trainer:
    return sp.Trainer(sp.split(make_model(), balance=[2, 2, 1]), nn.CrossEntropyLoss(),
                      lambda p: torch.optim.Adam(p, lr=1e-2), synthesizer=SYNTH, gradients="synthetic",
                      synthetic_inputs=True, input_synth_hidden=8, progress=False)


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
