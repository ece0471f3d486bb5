"""The shared training step (engine/step.py) and the gradient-source seam (engine/sources)."""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn as nn

import synthpipe as sp
from synthpipe.engine.config import TrainConfig
from synthpipe.engine.sources import SOURCES, GradientSource, make_source, register
from synthpipe.engine.step import LiveStats, StageStep
from synthpipe.stages.stage import NonFiniteError, Stage, adam

from reference import assert_states_close, plain_backprop


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5))


def make_batches(n: int = 6, batch: int = 8, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 12, generator=g), torch.randint(0, 5, (batch,), generator=g)) for _ in range(n)]


class RecordingLinks:
    """Links that record what a step sends and hand back given gradients."""

    def __init__(self, grads: dict[int, tuple] | None = None):
        self.sent: list[tuple[str, int]] = []
        self.grads = grads or {}
        self.polls = 0

    def send_activation(self, step: int, outputs: tuple, y: Any) -> None:
        self.sent.append(("activation", step))

    def send_gradient(self, step: int, grads: tuple, skipped: bool) -> None:
        self.sent.append(("skipped" if skipped else "gradient", step))

    def wait_gradient(self, step: int) -> tuple[tuple, bool]:
        self.sent.append(("waited", step))
        return self.grads[step], False

    def wait_received(self, step: int) -> None:
        raise AssertionError("nothing to wait for")

    def poll(self) -> None:
        self.polls += 1


def middle_stage(gradients: str) -> tuple[Stage, StageStep, RecordingLinks]:
    config = TrainConfig(gradients=gradients, progress=False)
    stage = Stage(1, 3, nn.Linear(4, 4), adam(1e-2), synthesizer=sp.Synthesizer("linear"))
    links = RecordingLinks({0: (torch.ones(2, 4),)})
    return stage, StageStep(stage, config, make_source(stage, config), links), links


def test_backprop_waits_for_the_gradient_of_its_own_step_and_sends_the_input_gradient_back():
    stage, step, links = middle_stage("backprop")
    before = stage.module.weight.detach().clone()
    assert step.waits(0)
    step.run(0, (torch.randn(2, 4),), torch.zeros(2, dtype=torch.long))
    assert links.sent == [("activation", 0), ("waited", 0), ("gradient", 0)]
    assert not torch.equal(stage.module.weight, before)


def test_synthetic_steps_at_once_and_caches_the_activation_for_its_target():
    stage, step, links = middle_stage("synthetic")
    assert not step.waits(0)
    step.run(0, (torch.randn(2, 4),), torch.zeros(2, dtype=torch.long))
    assert links.sent == [("activation", 0), ("gradient", 0)] and links.polls == 1
    assert step.source.in_flight() == 1  # waiting for its target
    step.received(0, (torch.ones(2, 4),), False, stats=[0.5, 0.0, 7.0, 9.0])
    assert step.stats.loss == 0.5 and step.stats.synth_losses[0] == 7.0
    assert math.isnan(step.stats.synth_losses[1])  # its own boundary's value is its own, not the message's


def test_a_nonfinite_synthetic_gradient_is_named_and_a_skip_leaves_the_stage_as_it_was():
    stage, step, links = middle_stage("synthetic")
    x, y = (torch.full((2, 4), math.inf),), torch.zeros(2, dtype=torch.long)
    step.source.gradient = lambda *a: (torch.full((2, 4), math.nan),)  # type: ignore[method-assign]
    with pytest.raises(NonFiniteError, match="stage 1: the synthetic gradient is not finite at step 0"):
        step.run(0, x, y)
    step.config = TrainConfig(nonfinite="skip", progress=False)
    before = stage.module.weight.detach().clone()
    assert step.run(1, (torch.randn(2, 4),), y) is None
    assert torch.equal(stage.module.weight, before) and links.sent[-1] == ("skipped", 1)


def test_live_stats_travel_as_a_flat_list_and_keep_the_own_boundary():
    stats = LiveStats.empty(4)
    stats.synth_losses[1] = 3.0
    stats.merge([2.0, 5.0, 1.0, 99.0, 4.0], own_boundary=1)
    assert stats.to_list() == [2.0, 5.0, 1.0, 3.0, 4.0]


@pytest.fixture
def zero_source():
    """A new gradient source, defined here in a few lines: the output gradient is zero."""
    @register("zero-test")
    class Zero(GradientSource):
        sends_back = False

        def gradient(self, step: int, outputs: tuple, y: Any) -> tuple:
            return tuple(torch.zeros_like(o) for o in outputs)
    yield Zero
    del SOURCES["zero-test"]


def test_a_new_source_plugs_into_the_trainer_without_engine_changes(zero_source):
    model = make_model()
    first_before = {k: v.clone() for k, v in model[0].state_dict().items()}
    trainer = sp.Trainer(sp.split(model, n_stages=2), nn.CrossEntropyLoss(), gradients="zero-test", progress=False)
    trainer.fit(make_batches())
    state = trainer.state_dict()
    assert torch.equal(state["0.weight"], first_before["weight"])  # a zero gradient leaves stage 0 as it was
    assert not torch.equal(state["4.weight"], make_model().state_dict()["4.weight"])  # the last stage trained


def test_an_unknown_source_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"gradients must be one of \(.*'synthetic'.*\), got 'dni'"):
        sp.Trainer(sp.split(make_model(), n_stages=2), nn.CrossEntropyLoss(), gradients="dni")


@pytest.mark.parametrize("n_stages", [2, 3])
def test_the_reference_runner_through_the_shared_step_still_equals_backprop(n_stages):
    batches = make_batches()
    trainer = sp.Trainer(sp.split(make_model(), n_stages=n_stages), nn.CrossEntropyLoss(), adam(1e-2),
                         gradients="backprop", progress=False)
    trainer.fit(batches)
    assert_states_close(trainer.state_dict(), plain_backprop(make_model(), batches, adam(1e-2)), atol=1e-6)
